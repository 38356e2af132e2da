"""The table look-up shared by the non-uniform and subset quantizers: values in the input's
shape and layout, and a table gradient that is the same sum, bit for bit, as autograd's own
(index_select's backward)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.table_lookup import flat_index, lookup


def _case(seed: int, rows: int, width: int, channels_last: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 5, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    position = torch.randint(0, width, x.shape, generator=g).float()
    position = position + torch.arange(rows).view(1, -1, 1, 1) * width  # row offsets
    table = torch.randn(rows, width, generator=g, requires_grad=True)
    return x, flat_index(position, x), table, position.long()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), width=st.integers(2, 40),
       channels_last=st.booleans())
def test_lookup_values_layout_and_table_gradient_match_autograd(seed, rows, width, channels_last):
    x, index, table, position = _case(seed, rows, width, channels_last)
    values = lookup(table, index, x)
    assert values.shape == x.shape
    assert values.stride() == x.stride()  # the layout of the input it stands for
    assert torch.equal(values, table.detach().reshape(-1)[position])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    (mine,) = torch.autograd.grad((values * grad).sum(), table)
    # autograd's own backward of index_select (index_add_ in index order)
    reference = torch.index_select(table.reshape(-1), 0, index)
    order = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)
    (expected,) = torch.autograd.grad((reference * grad.permute(order).reshape(-1)).sum(), table)
    assert torch.equal(mine, expected)


def test_lookup_without_gradient_needs_no_autograd_node():
    x, index, table, _ = _case(0, 3, 8, True)
    with torch.no_grad():
        assert lookup(table, index, x).grad_fn is None
    assert lookup(table.detach(), index, x).grad_fn is None
