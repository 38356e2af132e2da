"""Bad input to ``fxquant.compile`` / ``fxquant.load`` / ``Recipe`` stops with an error naming
the thing, instead of a silently wrong model (issue 14's silent-garbage list)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import CalibrationError, CheckpointError, FxquantError, RecipeError
from fxquant.recipe import ActivationConfig, LayerConfig, Recipe, WeightConfig


def patches(n=4, side=16, scale=1.0):
    torch.manual_seed(0)
    return torch.rand(n, 3, side, side) * scale


# ------------------------------------------------------------------ nothing quantized
def test_an_include_glob_matching_nothing_is_an_error_naming_the_rule(tiny_sr):
    recipe = Recipe(layers=LayerConfig(include=["no_such_layer.*"]))
    with pytest.raises(FxquantError, match=r"nothing was quantized.*not matched by layers\.include"):
        fxquant.compile(tiny_sr, recipe, calib=patches())


def test_a_pipeline_without_a_quantizing_pass_is_an_error_naming_the_pipeline(tiny_sr):
    with pytest.raises(FxquantError, match=r"pipeline 'trace,verify' inserts no quantizer"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(), pipeline="trace,verify")


def test_a_model_without_supported_layers_is_an_error():
    model = nn.Sequential(nn.ReLU(), nn.PixelShuffle(1)).eval()
    with pytest.raises(FxquantError, match="no layer fxquant can quantize"):
        fxquant.compile(model, "minmax-w8a8", calib=patches())


def test_a_float_result_is_accepted_when_asked_for(tiny_sr):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(), pipeline="trace,verify",
                         allow_unquantized=True)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(gm(x), tiny_sr(x))


FIRST_LAST_FLOAT = [name for name in fxquant.available_presets()
                    if fxquant.load_preset(name).layers.keep_first_last
                    and not fxquant.load_preset(name).layers.first_last_bits]


@pytest.mark.parametrize("preset", FIRST_LAST_FLOAT)
def test_every_preset_names_the_rule_when_it_leaves_every_layer_float(preset):
    """A net whose only convs are its first and last, which every preset but the -all ones
    keeps float: each method's passes have nothing to do (no error of their own, no training)
    and compile names the rule; asked to, it returns the float network."""
    two_convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 3, 3, padding=1)).eval()
    with pytest.raises(FxquantError, match="nothing was quantized.*keep_first_last"):
        fxquant.compile(two_convs, preset, calib=patches())
    gm = fxquant.compile(two_convs, preset, calib=patches(), allow_unquantized=True)
    x = patches(1)
    with torch.no_grad():  # equalizing presets rescale the float weights: equal up to rounding
        torch.testing.assert_close(gm(x), two_convs(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ calibration data
def test_an_input_range_upside_down_is_named(tiny_sr):
    with pytest.raises(CalibrationError, match=r"input_range must be \(low, high\) with low < "
                                               r"high, got \(1, 0\)"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(), input_range=(1, 0))


def test_calibration_data_that_requires_grad_calibrates_as_its_values(tiny_sr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on .item() of a tensor in a graph
        tracked = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches().requires_grad_())
    plain = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches())
    for key, value in plain.state_dict().items():
        assert torch.equal(tracked.state_dict()[key], value), key


def test_concrete_args_the_forward_does_not_take_are_named(tiny_sr):
    with pytest.raises(FxquantError, match=r"concrete_args names 'scale', which \w+\.forward "
                                           r"does not take \(its arguments: x\)"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(), concrete_args={"scale": 4})


def test_0_255_calibration_for_a_0_1_model_is_an_error_saying_to_rescale(tiny_sr):
    with pytest.raises(CalibrationError, match=r"spans \[.*\].*\[0, 1\].*divide by 255"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(scale=255.0))


def test_the_input_range_can_be_declared(tiny_sr):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(scale=255.0), input_range=(0, 255))
    assert fxquant.checks.quantized_modules(gm)


@pytest.mark.parametrize("data, match", [
    (torch.zeros(4, 3, 16, 16), "constant"),
    (torch.rand(4, 3, 1, 1), "1 pixels on a side"),
    (torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), r"dtype uint8.*/ 255"),
    (torch.empty(4, 3, 16, 16, device="meta"), "meta tensor"),
])
def test_degenerate_calibration_is_an_error(tiny_sr, data, match):
    with pytest.raises(CalibrationError, match=match):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=data)


def test_small_patches_warn():
    from fxquant.calibration import prepare_calibration

    with pytest.warns(UserWarning, match="only 5 pixels on a side"):
        prepare_calibration(torch.rand(2, 3, 5, 5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_calibrate_like_float32(tiny_sr, dtype):
    data = patches()
    ref = fxquant.compile(tiny_sr, "minmax-w8a8", calib=data.to(dtype).float())
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=data.to(dtype))
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(gm(x), ref(x))


def test_a_generator_is_read_once_and_calibrates_like_the_list(tiny_sr):
    data = patches(8)
    reads = []

    def batches():
        reads.append(1)
        yield from data.split(4)

    # dfsq reads the calibration data in several passes (observe/calibrate and folding)
    ref = fxquant.compile(tiny_sr, "dfsq-static-w4a4", calib=list(data.split(4)))
    gm = fxquant.compile(tiny_sr, "dfsq-static-w4a4", calib=batches())
    assert reads == [1]
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(gm(x), ref(x))


# ------------------------------------------------------------------ weights and files
def test_single_images_instead_of_batches_are_named(tiny_sr):
    with pytest.raises(CalibrationError, match=r"batch 0 has shape \(3, 12, 12\), one C×H×W "
                                               r"image; batches are N×C×H×W"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=[torch.rand(3, 12, 12)] * 4)


def test_nan_weights_are_named(tiny_sr):
    with torch.no_grad():
        tiny_sr.blocks[0][0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FxquantError, match=r"NaN/inf values in 'blocks\.0\.0\.weight' \(1\)"):
        fxquant.compile(tiny_sr, "daq-w4a4", calib=patches())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_models_that_are_not_float32_are_named(tiny_sr, dtype):
    model = type(tiny_sr)().to(dtype)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(FxquantError, match=f"fxquant quantizes float32 models; 'head.weight' "
                                           rf"\({name}\), .* and 7 more are not float32: pass "
                                           r"model.float\(\)"):
        fxquant.compile(model, "minmax-w8a8", calib=patches())
    assert next(model.parameters()).dtype == dtype  # the user's model is left as it was


def test_lowering_a_lowered_model_names_what_to_lower(tiny_sr):
    lowered = fxquant.lowered_copy(fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches()),
                                   "reference")
    with pytest.raises(FxquantError, match="already lowered \\(target 'reference'\\); lower "
                                           "the compiled fake-quant model instead"):
        fxquant.lowered_copy(lowered, "cpu")


def test_a_compiled_file_with_nan_scales_does_not_load(tiny_sr, tmp_path):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches())
    path = tmp_path / "m.fxq"
    fxquant.save(gm, path)
    payload = torch.load(path, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("scale"))
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"NaN/inf values in '{key}'"):
        fxquant.load(path, model=type(tiny_sr)().eval())


def test_loading_into_a_network_of_another_width_names_the_tensor(tmp_path):
    from tests.test_compile import MyOwnSR

    gm = fxquant.compile(MyOwnSR().eval(), "minmax-w8a8", calib=patches())
    fxquant.save(gm, tmp_path / "m.fxq")
    wider = MyOwnSR()
    wider.mid = nn.Conv2d(16, 24, 3, padding=1)
    wider.last = nn.Conv2d(24, 27, 3, padding=1)
    with pytest.raises(CheckpointError, match=r"different network: 'mid\.weight' has shape "
                                              r"\(16, 16, 3, 3\) in the file but \(24, 16, 3, 3\)"):
        fxquant.load(tmp_path / "m.fxq", model=wider.eval())


def test_loading_into_a_shallower_network_names_the_tensors_that_differ(tiny_sr, tmp_path):
    """A net whose only convs are first and last: the file's recipe quantizes nothing on it,
    and the error says the network differs (not "nothing was quantized")."""
    fxquant.save(fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches()), tmp_path / "m.fxq")
    shallow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 3, 3, padding=1)).eval()
    with pytest.raises(CheckpointError, match=r"does not match the model given, a different "
                                              r"network: \d+ tensors of the file have no place "
                                              r"in the graph .*'head\.weight'.*that graph "
                                              r"has 4 tensors the file does not hold"):
        fxquant.load(tmp_path / "m.fxq", model=shallow)


@pytest.mark.parametrize("action", ["save", "lowered_copy", "transformed_copy", "export"])
def test_what_takes_a_compiled_model_refuses_the_float_one_by_name(tiny_sr, tmp_path, action):
    calls = {"save": lambda: fxquant.save(tiny_sr, tmp_path / "m.fxq"),
             "lowered_copy": lambda: fxquant.lowered_copy(tiny_sr),
             "transformed_copy": lambda: fxquant.transformed_copy(tiny_sr, "verify"),
             "export": lambda: fxquant.export(tiny_sr, tmp_path / "m.onnx")}
    with pytest.raises(FxquantError, match=f"{action}.* takes a model compiled by "
                                           r"fxquant.compile \(or fxquant.load\); got a "):
        calls[action]()
    assert list(tmp_path.iterdir()) == []


def test_compiling_a_compiled_model_is_an_error(tiny_sr):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches())
    with pytest.raises(FxquantError, match="already compiled by fxquant .recipe 'minmax-w8a8'"):
        fxquant.compile(gm, "minmax-w8a8", calib=patches())


def test_the_float_model_is_left_as_it_was(tiny_sr):
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    fxquant.compile(tiny_sr, "mse-w4a4", calib=patches())
    assert all(torch.equal(before[k], v) for k, v in tiny_sr.state_dict().items())


# ------------------------------------------------------------------ recipes built in Python
@pytest.mark.parametrize("build, match", [
    (lambda: WeightConfig(bits=4.5), r"weights\.bits must be an integer, got 4\.5"),
    (lambda: WeightConfig(bits=True), r"weights\.bits must be an integer, got True"),
    (lambda: ActivationConfig(bits=1), r"activations\.bits = 1 is impossible"),
    (lambda: ActivationConfig(observer="max"), r"'max' is not valid"),
    (lambda: LayerConfig(include="body.*"), r"layers\.include must be a list"),
    (lambda: Recipe(method="nope"), r"method: 'nope' is not valid"),
    (lambda: Recipe(weights={"bits": 4}), r"weights must be a WeightConfig"),
])
def test_recipes_built_in_python_are_validated_on_construction(build, match):
    with pytest.raises(RecipeError, match=match):
        build()


def test_a_recipe_edited_after_construction_is_validated_on_compile(tiny_sr):
    recipe = Recipe()
    recipe.weights.bits = 4.5
    with pytest.raises(RecipeError, match=r"weights\.bits must be an integer, got 4\.5"):
        fxquant.compile(tiny_sr, recipe, calib=patches())


def test_an_integral_float_bit_width_is_stored_as_an_int():
    assert WeightConfig(bits=4.0).bits == 4 and isinstance(WeightConfig(bits=4.0).bits, int)


def test_no_warning_for_ordinary_calibration(tiny_sr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=patches(side=24))
