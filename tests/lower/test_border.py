"""The border strips of a constant plane's conv (fxquant/lower/border.py): runs of border
rows and columns, and the tap masks kept per input size."""

import torch

from fxquant.lower.border import add_border, border_masks, border_strips
from fxquant.lower.folded import CpuDaqConv2d


def test_strips_are_runs_of_consecutive_border_rows_and_columns():
    # 5×5, stride 1, padding 2 on 9 rows: taps fall in the padding for rows 0, 1, 7, 8;
    # columns: 3×3, padding 1 on 6 columns: 0 and 5
    rows = border_masks(9, 9, 5, 1, 2, 1, torch.float32, "cpu")
    cols = border_masks(6, 6, 3, 1, 1, 1, torch.float32, "cpu")
    strips = border_strips(rows, cols)
    assert strips.rows == ((0, 2, 0), (7, 9, 2))
    assert strips.cols == ((0, 1, 0), (5, 6, 1))
    assert torch.equal(strips.row_taps, (rows - 1)[:, [0, 1, 7, 8]])
    assert torch.equal(strips.col_taps, (cols - 1)[:, [0, 5]])


def test_no_padding_has_no_strips():
    rows = border_masks(8, 6, 3, 1, 0, 1, torch.float32, "cpu")
    strips = border_strips(rows, rows)
    assert strips.rows == () and strips.cols == ()
    y = torch.randn(1, 2, 6, 6)
    assert torch.equal(add_border(y.clone(), torch.randn(1, 2, 3, 3), rows, rows, strips), y)


def test_tap_masks_are_kept_per_input_size_and_match_a_fresh_computation():
    layer = CpuDaqConv2d(4, 3, (3, 3), (2, 2), (1, 1), (1, 1), 1, False)
    first = layer.tap_masks((9, 7), torch.float32, "cpu")
    assert layer.tap_masks((9, 7), torch.float32, "cpu") is first
    other = layer.tap_masks((8, 7), torch.float32, "cpu")
    assert other is not first
    assert torch.equal(first[0], border_masks(9, 5, 3, 2, 1, 1, torch.float32, "cpu"))
    assert torch.equal(other[0], border_masks(8, 4, 3, 2, 1, 1, torch.float32, "cpu"))
    assert torch.equal(first[1], other[1])  # same width
    strips = layer.strips((9, 7), torch.float32, "cpu")
    assert layer.strips((9, 7), torch.float32, "cpu") is strips
    # stride 2: output row 0 reads padding row −1, row 4 reads input row 9 (past 0..8)
    assert strips.rows == ((0, 1, 0), (4, 5, 1)) and strips.cols == ((0, 1, 0), (3, 4, 1))


def test_offset_plane_stays_exact_across_alternating_input_sizes():
    """The kept masks of one size never serve another: the interior value plus the strips
    equals the full separable offset plane (float64) at each size, in turn."""
    torch.manual_seed(0)
    layer = CpuDaqConv2d(4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, False)
    weight, offset = torch.randn(3, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 1, 1)
    for size in [(6, 5), (4, 9), (6, 5), (4, 9)]:
        full = layer.offset_term(offset, weight, size)
        v, rows, cols = layer.offset_taps(offset, weight, size)
        y = v.sum((2, 3))[:, :, None, None].expand_as(full).contiguous()
        out = add_border(y, v, rows, cols, layer.strips(size, rows.dtype, rows.device))
        assert out.shape == full.shape
        assert float((out - full).abs().max()) <= 1e-12 * float(v.abs().sum((2, 3)).max())


def test_masks_made_while_tracing_are_not_kept():
    """Under torch.compile (or torch.export) the masks are traced values: none is kept on the
    module for a later eager call."""
    layer = CpuDaqConv2d(4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, False)
    traced = torch.compile(lambda: layer.tap_masks((6, 5), torch.float32, "cpu")[0].sum(),
                           backend="eager", fullgraph=True)
    assert float(traced()) == float(border_masks(6, 6, 3, 1, 1, 1, torch.float32, "cpu").sum())
    assert not layer.__dict__.get("_tap_masks")
