"""The I²NQ passes (``observe{observer=samples}``, ``nonuniform-quant``, ``fswa``) on a tiny SR
network: graph structure, what FSWA does to the output error, save/load, integer lowering
against fake-quant, determinism and the errors for impossible recipes."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import PassError, RecipeError
from fxquant.lower import CpuConv2d, ReferenceConv2d
from fxquant.lower.codebook import CodebookQuantize
from fxquant.lower.compare import layer_agreement
from fxquant.quant import QuantConv2d
from fxquant.quant.nonuniform import NonUniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(bits: int = 4, **options):
    r = fxquant.load_preset(f"i2nq-w{bits}a{bits}")
    for key, value in options.items():
        setattr(r.options, key, value)
    return r.validate()


def test_structure_a_level_table_in_front_of_every_quantized_conv(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, recipe(), calib=calib)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    block = ["NonUniformQuantizer", "QuantConv2d", "ReLU", "NonUniformQuantizer", "QuantConv2d"]
    assert kinds == ["Conv2d", *block, *block, "Conv2d"]
    q = gm.get_submodule("blocks_0_0_input_quantizer")
    assert q.levels.shape == (8, 16) and q.integer_grid().bits == 8
    # the post-ReLU input has a level at exactly 0 in every channel
    relu_input = gm.get_submodule("blocks_0_2_input_quantizer")
    assert bool((relu_input.levels == 0).any(1).all())
    history = dict(gm.fxquant_history)
    assert history["fswa"]["layers"] == 4 and history["fswa"]["output_error_ratio"] < 1


def test_fswa_lowers_the_error_and_off_keeps_the_float_weights(tiny_sr, calib):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny_sr(x)
    errors = {}
    for mode in ("off", "scale", "adjust"):
        gm = fxquant.compile(tiny_sr, recipe(3, fswa=mode), calib=calib)
        with torch.no_grad():
            errors[mode] = float((gm(x) - ref).pow(2).mean())
        conv = gm.get_submodule("blocks.0.0")
        same = torch.equal(conv.weight, tiny_sr.blocks[0][0].weight)
        assert same == (mode != "adjust")
    assert errors["adjust"] < errors["off"]
    assert errors["scale"] < errors["off"]


def test_compile_is_deterministic_and_leaves_the_float_model_alone(tiny_sr, calib):
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    a = fxquant.compile(tiny_sr, recipe(), calib=calib).state_dict()
    b = fxquant.compile(tiny_sr, recipe(), calib=calib).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, before[k]) for k, v in tiny_sr.state_dict().items())


def test_saved_model_loads_with_its_levels_and_grid(tiny_sr, calib, tmp_path):
    gm = fxquant.compile(tiny_sr, recipe(), calib=calib)
    path = tmp_path / "i2nq.pt"
    fxquant.save(gm, path)
    fresh = type(tiny_sr)().eval()
    loaded = fxquant.load(path, model=fresh)
    q = loaded.get_submodule("blocks_1_0_input_quantizer")
    assert isinstance(q, NonUniformQuantizer) and q.integer_grid() is not None
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    lowered = fxquant.lowered_copy(loaded, "reference")  # the loaded copy still lowers
    assert any(isinstance(m, CodebookQuantize) for m in lowered.modules())


@pytest.mark.parametrize("target,cls", [("reference", ReferenceConv2d), ("cpu", CpuConv2d)])
@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
def test_lowered_integer_model_matches_fake_quant(tiny_sr, calib, target, cls, granularity):
    r = recipe()
    r.activations.granularity = granularity
    gm = fxquant.compile(tiny_sr, r, calib=calib)
    low = fxquant.lowered_copy(gm, target)
    assert sum(isinstance(m, cls) for m in low.modules()) == 4
    assert sum(isinstance(m, CodebookQuantize) for m in low.modules()) == 4
    assert not any(isinstance(m, (QuantConv2d, NonUniformQuantizer)) for m in low.modules())
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    agreement = layer_agreement(gm, low, [x])
    assert len(agreement) == 4 and all(a.max_steps <= 1 for a in agreement), agreement
    with torch.no_grad():
        fake, out = gm(x), low(x)
    assert float((out - fake).abs().max()) < 1e-2 * float(fake.max() - fake.min())


def test_codes_are_the_grid_codes_of_the_fake_quant_levels(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, recipe(), calib=calib)
    q = gm.get_submodule("blocks_0_0_input_quantizer")
    codes = CodebookQuantize.from_quantizer(q, channels_last=False)
    x = torch.randn(2, 8, 6, 6) * 2
    grid = q.integer_grid()
    dequantized = (codes(x).double() - float(grid.zero_point)) * float(grid.scale)
    assert torch.equal(dequantized.float(), q.fake_quant(x))


class SubPixelTail(torch.nn.Module):
    """TinySR's head and residual body with a two-conv sub-pixel tail before the last conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1))
        self.up = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.hr = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.last = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = h + self.body(h)
        h = torch.nn.functional.pixel_shuffle(self.up(h), 2)
        return self.last(torch.nn.functional.leaky_relu(self.hr(h), 0.2))


def test_tail_bits_give_the_upsampling_tail_8_bit_levels_and_weights_and_it_lowers(calib):
    """A 4-bit body with an 8-bit tail: 256 levels per channel on the shared uint8 grid and
    8-bit weights for the tail convs; the lowered model agrees with fake-quant as at 4 bits."""
    model = SubPixelTail().eval()
    r = recipe()
    r.layers.tail_bits = 8
    gm = fxquant.compile(model, r.validate(), calib=calib)
    convs = {n: m for n, m in gm.named_modules() if isinstance(m, QuantConv2d)}
    assert {n: m.weight_quantizer.bits for n, m in convs.items()} == {
        "body.0": 4, "body.2": 4, "up": 8, "hr": 8}
    levels = {n: gm.get_submodule(f"{n.replace('.', '_')}_input_quantizer").levels.shape
              for n in convs}
    assert levels == {"body.0": (8, 16), "body.2": (8, 16), "up": (8, 256), "hr": (8, 256)}
    assert type(gm.get_submodule("last")) is torch.nn.Conv2d
    assert dict(gm.fxquant_history)["nonuniform-quant"]["layer_bits"] == {"up": 8, "hr": 8}
    low = fxquant.lowered_copy(gm, "cpu")
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    agreement = layer_agreement(gm, low, [x])
    assert len(agreement) == 4 and all(a.max_steps <= 1 for a in agreement), agreement


def test_layer_widths_above_the_integer_grid_are_refused(calib):
    r = recipe()
    r.layers.tail_bits = 10
    with pytest.raises(RecipeError, match=r"1024 levels \(10 bits\) do not fit on a 8-bit grid"
                                          ".*layers.tail_bits"):
        fxquant.compile(SubPixelTail().eval(), r.validate(), calib=calib)


@pytest.mark.parametrize("pipeline, method", [("trace,daq", "DAQ"),
                                              ("trace,dfsq-observe", "DFSQ")])
def test_passes_with_one_width_refuse_layer_widths_instead_of_ignoring_them(calib, pipeline,
                                                                          method):
    r = fxquant.load_preset("mse-w4a4")
    r.layers.tail_bits = 8
    with pytest.raises(RecipeError, match=f"{method} quantizes every selected layer at the "
                                          r"recipe's bit-widths.*exclude those layers \(hr, up\)"):
        fxquant.compile(SubPixelTail().eval(), r.validate(), calib=calib, pipeline=pipeline)


def test_float_levels_are_refused_by_lower_with_the_option_to_set(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, recipe(integer_grid=0), calib=calib)
    with pytest.raises(PassError, match="integer_grid = 8"):
        fxquant.lowered_copy(gm, "reference")


def test_impossible_recipes_are_named():
    with pytest.raises(RecipeError, match="levels.*lloyd-max"):
        recipe(levels="kmeans")
    with pytest.raises(RecipeError, match="integer_grid"):
        recipe(integer_grid=4)
    with pytest.raises(RecipeError, match="fswa"):
        recipe(fswa="yes")
    with pytest.raises(RecipeError, match="fswa_min_ratio"):
        recipe(fswa_min_ratio=0)


def test_pipeline_without_sample_observers_is_refused(tiny_sr, calib):
    with pytest.raises(RecipeError, match="observer=samples"):
        fxquant.compile(tiny_sr, recipe(), calib=calib,
                        pipeline="trace,observe,calibrate,nonuniform-quant")
    with pytest.raises(PassError, match="quantizing pass"):
        fxquant.compile(tiny_sr, recipe(), calib=calib, pipeline="trace,fswa")


def test_a_net_whose_only_convs_stay_float_gets_the_layer_rules_named(calib):
    """Both convs are first/last, kept float: the I²NQ passes have nothing to do, and compile
    says which rule left the layers out (not 'no sample observers' or 'no quantized convs')."""
    two_convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 3, 3, padding=1))
    with pytest.raises(fxquant.FxquantError, match="nothing was quantized.*keep_first_last"):
        fxquant.compile(two_convs, recipe(), calib=calib)
    gm = fxquant.compile(two_convs, recipe(), calib=calib, allow_unquantized=True)
    history = dict(gm.fxquant_history)
    assert history["nonuniform-quant"]["activation_quantizers"] == 0
    assert history["fswa"]["layers"] == 0
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(gm(x), two_convs(x))


def test_learnable_levels_and_flex_scales_receive_gradients(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, recipe(learnable=True), calib=calib)
    q = gm.get_submodule("blocks_0_0_input_quantizer")
    wq = gm.get_submodule("blocks.0.0").weight_quantizer
    assert isinstance(q.levels, torch.nn.Parameter) and q.levels.requires_grad
    assert isinstance(wq.scale, torch.nn.Parameter)
    gm(torch.rand(2, 3, 8, 8)).abs().mean().backward()
    assert q.levels.grad is not None and float(q.levels.grad.abs().sum()) > 0
    assert wq.scale.grad is not None and float(wq.scale.grad.abs().sum()) > 0


class Recursive(torch.nn.Module):
    """Two convs each called at two sites, interleaved (a, b, mix, a, b), and one after them
    (c): CARN-M's recursive residual blocks in small."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.head, self.tail = conv(3, 8, 3, padding=1), conv(8, 3, 3, padding=1)
        self.a, self.b, self.mix = conv(8, 8, 3, padding=1), conv(8, 8, 3, padding=1), conv(16, 8, 1)
        self.c = conv(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        y = self.b(torch.relu(self.a(h)))
        z = self.mix(torch.cat([h, y], 1))
        return self.tail(torch.relu(self.c(self.b(torch.relu(self.a(z))) + z))) + x


def fswa_by_prefix_runs(gm, batches, options):
    """FSWA as first written: for each conv node in graph order, every batch runs from the
    start until the conv's module is first called, its inputs summed into the Gram matrix,
    then the conv is fitted. The pass runs the batches once, in lockstep; it must fit the
    same weights bit for bit, shared modules included."""
    from fxquant.quant.fswa import adjust_weights, flex_scale, input_gram

    class Reached(Exception):
        pass

    for node in [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), QuantConv2d)]:
        conv, grams = gm.get_submodule(node.target), []

        def hook(module, args):
            grams.append(input_gram(module, args[0]))
            raise Reached

        handle = conv.register_forward_pre_hook(hook)
        with torch.no_grad():
            for batch in batches:
                try:
                    gm(*batch)
                except Reached:
                    pass
        handle.remove()
        gram = grams[0]
        for g in grams[1:]:
            gram = gram + g
        weight = conv.weight.detach().clone()
        with torch.no_grad():
            flex_scale(weight, conv.weight_quantizer, gram, options.fswa_ratios,
                       options.fswa_min_ratio)
            conv.weight.copy_(adjust_weights(weight, conv.weight_quantizer, gram,
                                             options.fswa_damp))


def test_fswa_fits_what_prefix_runs_fit_bit_for_bit_with_shared_convs():
    from fxquant.calibration import as_batches
    from fxquant.compiler import compiled_copy, transformed_copy
    from fxquant.passes.nonuniform_quant import I2NQOptions

    torch.manual_seed(0)
    model = Recursive().eval()
    # at 3 bits the second fit of b moves its weights, so the Gram matrix refreshed after
    # the restart that a's second fit causes is what b is fitted to
    calib = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    r = recipe(3)
    start = fxquant.compile(model, r, calib=calib, pipeline=(
        "trace,observe{observer=samples},calibrate,nonuniform-quant"))
    fitted = transformed_copy(start, "fswa", calib=calib)
    assert dict(fitted.fxquant_history)["fswa"]["layers"] == 6  # a, b, mix, a, b, c
    options = r.options_for(I2NQOptions)
    batches = as_batches(calib, r.calibration.batch_size)[:options.fswa_batches]
    assert len(batches) >= 3
    expected = compiled_copy(start)
    expected.eval()
    fswa_by_prefix_runs(expected, batches, options)
    for name, value in expected.state_dict().items():
        assert torch.equal(fitted.state_dict()[name], value), name
    assert not torch.equal(start.get_submodule("a").weight, expected.get_submodule("a").weight)
