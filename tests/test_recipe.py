"""Recipes: presets, TOML round trips, and the errors a mistyped recipe gets."""

from __future__ import annotations

import pytest

from fxquant import Recipe, RecipeError, available_presets, load_preset, resolve_recipe


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_loads_and_round_trips_through_toml(name):
    recipe = load_preset(name)
    assert recipe.name == name
    assert recipe.description and "\n" not in recipe.description  # `fxquant recipes` shows it
    again = Recipe.from_toml(recipe.to_toml())
    assert again == recipe


def test_presets_cover_the_uniform_baselines():
    assert {"minmax-w8a8", "minmax-w4a4", "percentile-w4a4", "mse-w4a4"} <= set(available_presets())


def test_resolve_accepts_name_path_dict_and_object(tmp_path):
    path = tmp_path / "r.toml"
    load_preset("minmax-w4a4").save(path)
    from_path = resolve_recipe(path)
    from_str_path = resolve_recipe(str(path))
    from_dict = resolve_recipe({"weights": {"bits": 4}, "activations": {"bits": 4}})
    assert from_path == from_str_path == load_preset("minmax-w4a4")
    assert from_dict.weights.bits == 4 and from_dict.activations.bits == 4
    assert resolve_recipe(from_dict) is from_dict


def test_misspelt_key_is_named_with_the_valid_keys():
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({"weights": {"bitz": 4}})
    message = str(err.value)
    assert "'bitz'" in message and "weights" in message
    assert "bits" in message and "granularity" in message and "observer" in message


def test_misspelt_top_level_key_lists_sections():
    with pytest.raises(RecipeError, match=r"unknown key 'activation'.*activations"):
        Recipe.from_dict({"activation": {"bits": 4}})


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
@pytest.mark.parametrize("section", ["weights", "activations"])
def test_impossible_bit_widths_are_rejected(section, bits):
    with pytest.raises(RecipeError, match=rf"{section}.bits = {bits} is impossible.*2\.\.16"):
        Recipe.from_dict({section: {"bits": bits}})


@pytest.mark.parametrize("bits", [2, 16])
def test_bit_width_bounds_are_inclusive(bits):
    assert Recipe.from_dict({"weights": {"bits": bits}}).weights.bits == bits


def test_wrong_types_and_choices_say_what_is_valid():
    with pytest.raises(RecipeError, match="must be an integer"):
        Recipe.from_dict({"weights": {"bits": "four"}})
    with pytest.raises(RecipeError, match="choose one of minmax, percentile, mse"):
        Recipe.from_dict({"activations": {"observer": "kl"}})
    with pytest.raises(RecipeError, match="choose one of conv2d, conv_transpose2d"):
        Recipe.from_dict({"layers": {"op_types": ["conv3d"]}})
    # known, refused rather than left float silently
    with pytest.raises(RecipeError, match="'linear' layers cannot be quantized yet.*conv2d"):
        Recipe.from_dict({"layers": {"op_types": ["conv2d", "linear"]}})
    with pytest.raises(RecipeError, match="method.*uniform"):
        Recipe.from_dict({"method": "nope"})


@pytest.mark.parametrize("calibration, match", [
    ({"batch_size": 0}, "calibration.batch_size = 0 must be >= 1"),
    ({"patch_size": 2}, "calibration.patch_size = 2 must be >= 3: a 3x3 conv"),
])
def test_calibration_sizes_are_bounded(calibration, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"calibration": calibration})
    assert Recipe.from_dict({"calibration": {"patch_size": 3}}).calibration.patch_size == 3


def test_unknown_preset_lists_presets():
    with pytest.raises(RecipeError, match="minmax-w8a8"):
        load_preset("minmax-w9a9")


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[weights\nbits = 4")
    with pytest.raises(RecipeError, match="broken.toml is not valid TOML"):
        Recipe.load(path)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe("no/such/recipe.toml")


def test_pipeline_defaults_to_the_method_and_can_be_given():
    assert Recipe().pipeline_spec == "trace,observe,calibrate,quantize,verify"
    assert Recipe(pipeline="trace,verify").pipeline_spec == "trace,verify"


def test_a_binary_recipe_file_is_a_recipe_error(tmp_path):
    path = tmp_path / "model.toml"  # e.g. a checkpoint passed as --recipe by mistake
    path.write_bytes(b"PK\x03\x04\x00\xff\xfe binary")
    with pytest.raises(RecipeError, match=r"model\.toml is not UTF-8 text .*TOML text file"):
        resolve_recipe(str(path))


def test_saving_a_recipe_into_a_missing_folder_is_a_clear_error(tmp_path):
    from fxquant.errors import FxquantError

    with pytest.raises(FxquantError, match="folder .*missing does not exist"):
        Recipe().save(tmp_path / "missing" / "r.toml")
    Recipe().save(tmp_path / "r.toml")
    assert Recipe.load(tmp_path / "r.toml") == Recipe()
