"""Recipes: what to quantize and how, as a validated tree of dataclasses.

A recipe is loaded from a preset name (``"minmax-w8a8"``), a TOML file, a dict, or built
directly. Every key is checked: an unknown key is named together with the valid ones, and
values outside their domain (bits outside 2..16, an unknown observer) are rejected with the
valid choices listed. Methods (uniform, DAQ, DFSQ, ...) register an options dataclass and a
default pass pipeline with :func:`register_method`; their options live in ``[options]``.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxquant.calibration import MIN_PATCH_SIDE
from fxquant.dataclass_tables import build_dataclass, coerce_value, drop_none
from fxquant.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "recipes"

MIN_BITS, MAX_BITS = 2, 16
WEIGHT_OBSERVERS = ("minmax", "symmetric")
ACTIVATION_OBSERVERS = ("minmax", "percentile", "mse")
GRANULARITIES = ("per-tensor", "per-channel")
# conv_transpose2d: quantized as the conv + pixel shuffle the deconv-to-conv pass makes of it
OP_TYPES = ("conv2d", "conv_transpose2d")
# Named so the error can say it is known but has no quantized layer (no fake-quant
# weights, no integer kernel) yet: offering it would leave it silently in float.
UNSUPPORTED_OP_TYPES = ("linear",)
# Methods whose quantizing pass (``quantize``, ``nonuniform-quant``) takes per-layer widths
# (layers.first_last_bits, layers.tail_bits).
LAYER_BITS_METHODS = ("uniform", "odm", "i2nq")


def check_pass_options(pass_name: str, bits: dict[str, int | None],
                       choices: dict[str, tuple[object, tuple[str, ...]]] | None = None) -> None:
    """A pass's overrides of the recipe: bit-widths in range and names among their choices
    (``None``: not overridden), each error naming ``<pass>.<option>``."""
    for key, value in bits.items():
        if value is not None:
            _check_bits(value, f"{pass_name}.{key}")
    for key, (value, valid) in (choices or {}).items():
        if value is not None:
            _check_choice(value, valid, f"{pass_name}.{key}")


def _check_bits(bits: int, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise RecipeError(f"{where} = {bits!r} is not an integer; use an integer in "
                          f"{MIN_BITS}..{MAX_BITS}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"{where} = {bits} is impossible; use an integer in "
                          f"{MIN_BITS}..{MAX_BITS}")


def check_field_types(config: Any, where: str) -> None:
    """Every field of dataclass ``config`` holds a value of its annotated type (an int-valued
    float is accepted as an int, an int as a float, and stored converted), so that a config
    built or edited in Python fails here instead of producing a file that cannot be loaded."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in hints:
            value = coerce_value(getattr(config, f.name), hints[f.name], f"{where}.{f.name}")
            object.__setattr__(config, f.name, value)  # options dataclasses may be frozen


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise RecipeError(f"{where}: '{value}' is not valid; choose one of {', '.join(choices)}")


@dataclass
class WeightConfig:
    """Weight quantizer: uniform, per output channel by default.

    ``observer = "minmax"`` is the asymmetric min/max grid of the DFSQ code (the grid is
    aligned to multiples of the step, the range need not contain 0); ``"symmetric"`` is
    max-abs with levels ``-(2^(b-1)-1)..2^(b-1)-1``.
    """

    bits: int = 8
    granularity: str = "per-channel"
    observer: str = "minmax"

    def __post_init__(self) -> None:  # a config built in Python is checked like a parsed one
        self.validate()

    def validate(self, where: str = "weights") -> None:
        check_field_types(self, where)
        _check_bits(self.bits, f"{where}.bits")
        _check_choice(self.granularity, GRANULARITIES, f"{where}.granularity")
        _check_choice(self.observer, WEIGHT_OBSERVERS, f"{where}.observer")


@dataclass
class ActivationConfig:
    """Activation quantizer for conv inputs: static uniform per tensor by default.

    ``observer`` picks how the static range is calibrated: ``minmax``, ``percentile``
    (the ``percentile``-th and ``100 - percentile``-th percentiles), or ``mse`` (the clipping
    range minimising the expected squared quantization error on the calibration histogram).
    """

    bits: int = 8
    granularity: str = "per-tensor"
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:  # a config built in Python is checked like a parsed one
        self.validate()

    def validate(self, where: str = "activations") -> None:
        check_field_types(self, where)
        _check_bits(self.bits, f"{where}.bits")
        _check_choice(self.granularity, GRANULARITIES, f"{where}.granularity")
        _check_choice(self.observer, ACTIVATION_OBSERVERS, f"{where}.observer")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"{where}.percentile = {self.percentile} must lie in (50, 100]")


@dataclass
class LayerConfig:
    """Which layers are quantized.

    ``include``/``exclude`` are glob patterns on qualified module names (``body.*.conv1``);
    ``op_types`` restricts the layer kinds. As in all four SR papers, the first and last conv
    of the network stay full precision unless ``keep_first_last`` is false.
    ``first_last_bits`` (0: off) quantizes those two convs instead, weights and input, at
    that many bits, whatever the body's width: a 4-bit body with an 8-bit head and tail
    runs entirely as integer convs. ``tail_bits`` (0: off) gives the convs of the upsampling
    tail (every conv after the first upsampling op, and a sub-pixel upsampler's conv;
    :func:`fxquant.graph.upsampling_tail`) that many bits, weights and input: the
    published 4-bit SR results keep that tail at 8 bits or float (EDSR's ``tail``; OAQ's
    head/tail-8-bit setting). Both apply to the ``quantize`` and ``nonuniform-quant``
    pipelines; DAQ and DFSQ refuse them.
    """

    op_types: list[str] = field(default_factory=lambda: ["conv2d"])
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    keep_first_last: bool = True
    first_last_bits: int = 0
    tail_bits: int = 0

    def __post_init__(self) -> None:  # a config built in Python is checked like a parsed one
        self.validate()

    def validate(self, where: str = "layers") -> None:
        check_field_types(self, where)
        if self.tail_bits:
            _check_bits(self.tail_bits, f"{where}.tail_bits")
        if not self.op_types:
            raise RecipeError(f"{where}.op_types is empty; give at least one of "
                              f"{', '.join(OP_TYPES)}")
        for op in self.op_types:
            if op in UNSUPPORTED_OP_TYPES:
                raise RecipeError(f"{where}.op_types: '{op}' layers cannot be quantized yet "
                                  f"(no quantized weights or integer kernel; they stay float "
                                  f"islands); valid: {', '.join(OP_TYPES)}")
            _check_choice(op, OP_TYPES, f"{where}.op_types")
        if self.first_last_bits:
            _check_bits(self.first_last_bits, f"{where}.first_last_bits")
            if not self.keep_first_last:
                raise RecipeError(f"{where}.first_last_bits = {self.first_last_bits} needs "
                                  f"{where}.keep_first_last = true: with it false the first "
                                  "and last convs are quantized like the body already")


@dataclass
class CalibrationConfig:
    """Calibration data drawn by the CLI and the results command: seeded LR patches.

    The default mixes T91 and General100: static ranges from more varied content clip test
    images less (docs/methods/uniform.md). ``stream`` cuts each batch from the image files
    when a pass reads it (:class:`fxquant.data.CalibrationPatches`) instead of holding every
    patch in memory: the same values, for calibration sets too large to hold; slower, as
    patches are cut again on every read.
    """

    num_patches: int = 64
    patch_size: int = 48
    batch_size: int = 8
    seed: int = 0
    sets: list[str] = field(default_factory=lambda: ["T91", "General100"])
    stream: bool = False

    def __post_init__(self) -> None:  # a config built in Python is checked like a parsed one
        self.validate()

    def validate(self, where: str = "calibration") -> None:
        check_field_types(self, where)
        for name in ("num_patches", "patch_size", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} = {getattr(self, name)} must be >= 1")
        if self.patch_size < MIN_PATCH_SIDE:  # refused by the calibration check anyway, later
            raise RecipeError(f"{where}.patch_size = {self.patch_size} must be >= "
                              f"{MIN_PATCH_SIDE}: a 3x3 conv on a smaller patch sees mostly "
                              "zero padding")
        if not self.sets:
            raise RecipeError(f"{where}.sets is empty; name at least one training set, e.g. T91")


@dataclass
class TracingConfig:
    """Escape hatches for models FX cannot trace as written.

    ``leaf_modules`` lists qualified names or class names kept as opaque calls.
    """

    leaf_modules: list[str] = field(default_factory=list)


@dataclass
class UniformOptions:
    """The uniform baselines have no method-specific options."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    options: type
    pipeline: str
    description: str


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, options: type, pipeline: str, description: str) -> None:
    """Make a quantization method available to recipes (``method = name``)."""
    _METHODS[name] = MethodInfo(name, options, pipeline, description)


def methods() -> dict[str, MethodInfo]:
    return dict(_METHODS)


register_method("uniform", UniformOptions, "trace,observe,calibrate,quantize,verify",
                "uniform fake-quant: per-channel weights, static per-tensor activations")


@dataclass
class Recipe:
    """A complete quantization recipe. See ``docs/recipes.md`` for every key."""

    name: str = "custom"
    description: str = ""
    method: str = "uniform"
    pipeline: str = ""
    weights: WeightConfig = field(default_factory=WeightConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    layers: LayerConfig = field(default_factory=LayerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None and self.method in _METHODS:
            self.options = _METHODS[self.method].options()
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> "Recipe":
        for name in ("name", "description", "method", "pipeline"):
            if not isinstance(getattr(self, name), str):
                raise RecipeError(f"{name} must be a string, got {getattr(self, name)!r}")
        _check_choice(self.method, tuple(_METHODS), "method")
        for name, section in (("weights", WeightConfig), ("activations", ActivationConfig),
                              ("layers", LayerConfig), ("calibration", CalibrationConfig),
                              ("tracing", TracingConfig)):
            if not isinstance(getattr(self, name), section):
                raise RecipeError(f"{name} must be a {section.__name__}, got "
                                  f"{type(getattr(self, name)).__name__}")
        self.weights.validate()
        self.activations.validate()
        self.layers.validate()
        for key in ("first_last_bits", "tail_bits"):
            if getattr(self.layers, key) and self.method not in LAYER_BITS_METHODS:
                raise RecipeError(f"layers.{key} applies to the quantize and nonuniform-quant "
                                  f"passes (methods {', '.join(LAYER_BITS_METHODS)}), not to "
                                  f"method '{self.method}', which quantizes every selected "
                                  "layer at one width")
        self.calibration.validate()
        expected = _METHODS[self.method].options
        if not isinstance(self.options, expected):
            raise RecipeError(f"options: expected {expected.__name__} for method "
                              f"'{self.method}', got {type(self.options).__name__}")
        check_field_types(self.options, "options")
        check_field_types(self.tracing, "tracing")
        validate_options = getattr(self.options, "validate", None)
        if validate_options is not None:
            validate_options("options")
        return self

    def options_for(self, options_type: type):
        """This recipe's method options when they are of ``options_type``, else that type's
        defaults: a method's pass run inside another method's pipeline gets its defaults."""
        return self.options if isinstance(self.options, options_type) else options_type()

    @property
    def pipeline_spec(self) -> str:
        """The pass pipeline: the explicit one, else the method's default; with
        ``conv_transpose2d`` among ``layers.op_types``, ``deconv-to-conv`` right after a
        leading ``trace`` (where the pipeline does not name it already)."""
        spec = self.pipeline or _METHODS[self.method].pipeline
        if ("conv_transpose2d" in self.layers.op_types and "deconv-to-conv" not in spec
                and (spec == "trace" or spec.startswith("trace,"))):
            spec = "trace,deconv-to-conv" + spec[len("trace"):]
        return spec

    # ----------------------------------------------------------------- conversion
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["options"] = dataclasses.asdict(self.options) if self.options is not None else {}
        return data

    def to_toml(self, omit: tuple = ()) -> str:
        """The recipe as TOML; ``omit`` lists ``(section, key, value)`` fields left out where
        they hold that value."""
        import tomli_w

        data = self.to_dict()
        for section, key, value in omit:
            if data[section].get(key) == value:
                del data[section][key]
        return tomli_w.dumps(drop_none(data))

    def save(self, path: str | Path) -> None:
        from fxquant.files import atomic_write_text

        atomic_write_text(path, self.to_toml(), "recipe")

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a table/dict, got {type(data).__name__}")
        data = dict(data)
        options = data.pop("options", {})
        recipe = build_dataclass(cls, data, "recipe")
        method = _METHODS.get(recipe.method)
        if method is None:
            _check_choice(recipe.method, tuple(_METHODS), "method")
        recipe.options = build_dataclass(method.options, options or {}, "options")
        return recipe.validate()

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{source} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {exc.start}); a "
                              f"recipe is a TOML text file (see docs/recipes.md)") from None
        except OSError as exc:
            raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
        return cls.from_toml(text, str(path))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> Recipe:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe preset '{name}'; presets: "
                          f"{', '.join(available_presets())} (or give a .toml path)")
    return Recipe.from_toml(path.read_text(), f"preset {name}")


RecipeLike = typing.Union[str, Path, dict, Recipe]


def resolve_recipe(recipe: RecipeLike) -> Recipe:
    """Turn a preset name, TOML path, dict or Recipe into a validated :class:`Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe.validate()
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith(".toml")):
        return Recipe.load(recipe)
    if isinstance(recipe, str):
        return load_preset(recipe)
    raise RecipeError(f"a recipe must be a preset name, a .toml path, a dict or a Recipe; "
                      f"got {type(recipe).__name__}")

