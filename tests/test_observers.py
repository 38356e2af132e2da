"""Observers record what calibration shows them and reject non-finite activations."""

from __future__ import annotations

import pytest
import torch

from fxquant import CalibrationError
from fxquant.observers import HistogramObserver, MinMaxObserver, MomentsObserver, make_activation_observer
from fxquant.quant.subset import SampleObserver


def test_minmax_per_tensor_and_per_channel():
    x1 = torch.tensor([[[[1.0]], [[-2.0]]]])
    x2 = torch.tensor([[[[3.0]], [[0.5]]]])
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver(per_channel=True)
    for x in (x1, x2):
        assert torch.equal(per_tensor(x), x)
        per_channel(x)
    assert (float(per_tensor.min_val), float(per_tensor.max_val)) == (-2.0, 3.0)
    assert per_channel.min_val.tolist() == [1.0, -2.0]
    assert per_channel.max_val.tolist() == [3.0, 0.5]


def test_histogram_keeps_every_count_when_the_range_grows():
    observer = HistogramObserver(bins=64)
    observer(torch.linspace(0, 1, 1000))
    observer(torch.linspace(-5, 9, 500))
    assert float(observer.hist.sum()) == 1500
    assert (observer.lo, observer.hi) == (-5.0, 9.0)
    assert (observer.min_val, observer.max_val) == (-5.0, 9.0)


def test_moments_match_torch():
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    observer = MomentsObserver()
    observer(x[:2])
    observer(x[2:])
    flat = x.transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(observer.mean, flat.mean(1))
    assert torch.allclose(observer.var, flat.var(1, unbiased=False))
    assert torch.cat(observer.image_means).shape == (3, 4)


def test_non_finite_activation_names_the_node():
    observer = MinMaxObserver("body_0_conv1")
    with pytest.raises(CalibrationError, match="'body_0_conv1' is not finite"):
        observer(torch.tensor([1.0, float("nan")]))


OBSERVERS = {  # the ones that find non-finite values through their own min and max
    "minmax": lambda: MinMaxObserver("n"),
    "minmax per channel": lambda: MinMaxObserver("n", per_channel=True),
    "samples": lambda: SampleObserver("n", 3, max_samples=64),
    "samples static": lambda: SampleObserver("n", 3, mode="static", max_samples=64),
    "samples post-ReLU": lambda: SampleObserver("n", 3, post_relu=True, max_samples=64),
}


@pytest.mark.parametrize("kind", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 0, 0, 0), (1, 2, 4, 3)])
def test_every_non_finite_value_is_refused_before_anything_is_recorded(kind, bad, where):
    observer = OBSERVERS[kind]()
    good = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    observer(good)
    def state(value):
        if isinstance(value, torch.Generator):  # a refused batch draws no sample keys
            return value.get_state()
        return value.clone() if isinstance(value, torch.Tensor) else value

    before = {k: state(v) for k, v in vars(observer).items() if not k.startswith("_")}
    x = good.clone()
    x[where] = bad
    for layout in (torch.contiguous_format, torch.channels_last):
        with pytest.raises(CalibrationError, match="'n' is not finite"):
            observer(x.contiguous(memory_format=layout))
    for key, value in before.items():
        now = state(getattr(observer, key))
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key


def test_percentile_per_channel_is_refused():
    with pytest.raises(CalibrationError, match="per tensor only"):
        make_activation_observer("percentile", "n", per_channel=True)
