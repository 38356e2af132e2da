"""Shared fixtures: the data root, small SR-shaped models, and the golden-dump flag."""

from __future__ import annotations

import os
from pathlib import Path

# The gpu target's Triton kernels run on the CPU through the interpreter here. Triton reads
# the switch when it is imported, so it is set before anything can import it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fxquant.paths import DATA_ENV, data_root  # noqa: E402

GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/* from the current output instead of comparing")


@pytest.fixture(scope="session")
def data() -> Path:
    if not os.environ.get(DATA_ENV):
        pytest.skip(f"{DATA_ENV} is not set: this test needs the shared data root "
                    "(../shared/data; `make test` sets it)")
    return data_root()


@pytest.fixture
def golden(request):
    """``golden(name, text)`` compares with tests/golden/<name>, or rewrites it with --regen-golden."""
    regen = request.config.getoption("--regen-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if regen or not path.exists():
            if not regen:
                pytest.fail(f"golden file {path} is missing: run pytest --regen-golden")
            path.write_text(text)
            return
        assert text == path.read_text(), f"{name} differs from its golden file (regenerate " \
                                         "with pytest --regen-golden if the change is intended)"

    return check


class TinySR(nn.Module):
    """An EDSR-shaped network: head, two residual blocks (conv-ReLU-conv + skip), pixel-shuffle tail."""

    def __init__(self, channels: int = 8, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3, padding=1)) for _ in range(2))
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        h = self.head(x)
        for block in self.blocks:
            h = h + block(h)
        return torch.nn.functional.pixel_shuffle(self.tail(h), self.scale)


@pytest.fixture
def tiny_sr() -> TinySR:
    torch.manual_seed(0)
    return TinySR().eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))



@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: under ``pytest -n 2`` on 2 shared cores,
    two OpenMP threads per worker spin-wait and make small convs 30-100x slower. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
