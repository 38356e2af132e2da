"""Fixtures for the data-layer tests: the shared data root, skipped when FXQUANT_DATA is unset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fxquant.paths import DATA_ENV, data_root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not os.environ.get(DATA_ENV):
        pytest.skip(f"{DATA_ENV} is not set: this test reads the shared data root "
                    "(benchmark/<Set>/HR, train/<Set>/HR)")
    return data_root()
