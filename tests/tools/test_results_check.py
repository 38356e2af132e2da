"""tools/results_check.py: filters that select no stored result are an error naming what is
stored (checking nothing used to print '0 entries' and exit 0, a pass)."""

from __future__ import annotations

import pytest

from fxquant.errors import FxquantError


@pytest.mark.parametrize("argv, match", [
    (["--models", "imdm"], r"no stored result matches x4 Set5, --models imdm; stored for x4 "
                           r"Set5: models .*imdn"),
    (["--recipes", "mse-w5a5"], r"--recipes mse-w5a5; .*recipes .*mse-w4a4"),
    (["--scale", "7"], r"x7 Set5; stored for x7 Set5: models none, recipes none"),
])
def test_a_filter_that_selects_nothing_is_named(load_tool, argv, match):
    with pytest.raises(FxquantError, match=match):
        load_tool("results_check").main(argv)
