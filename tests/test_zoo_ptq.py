"""Uniform PTQ on the pretrained zoo, on real Set5 images (slow: full Set5 at x4)."""

from __future__ import annotations

import pytest

from fxquant.workflow import evaluate_sets, prepare

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.mark.parametrize("model", ["imdn", "pan", "carn_m"])
def test_w8a8_costs_at_most_0_05_db_on_set5_x4(model, data):
    models = prepare(model, 4, "mse-w8a8", data_root=data)
    fp = evaluate_sets(models.runner("fp"), models.spec, 4, ["Set5"], data_root=data)["Set5"]
    quant = evaluate_sets(models.runner("quant"), models.spec, 4, ["Set5"], data_root=data)["Set5"]
    assert fp.psnr == pytest.approx(models.spec.published_set5[4], abs=0.01)
    assert fp.psnr - quant.psnr <= 0.05
    assert fp.psnr - quant.psnr > 0.0  # quantization is not free: the graph really was quantized


def test_w4a4_is_lossy_but_not_broken_on_imdn(data):
    models = prepare("imdn", 4, "mse-w4a4", data_root=data)
    quant = evaluate_sets(models.runner("quant"), models.spec, 4, ["Set5"], data_root=data,
                          limit=2)["Set5"]
    fp = evaluate_sets(models.runner("fp"), models.spec, 4, ["Set5"], data_root=data,
                       limit=2)["Set5"]
    assert 0.1 < fp.psnr - quant.psnr < 8.0  # measured: 4.6 dB on all of Set5; minmax loses 9.7
