"""Deployment formats: ONNX (structure, checker, dynamic sizes, ONNX Runtime against fxquant's
own fake-quant and reference models, integer kernels in the graph ONNX Runtime runs),
and the errors for what cannot export (torch.export and TorchScript: test_export_torch.py)."""

from __future__ import annotations

import collections

import pytest
import torch

import fxquant
from fxquant.deploy import ExportError, export
from fxquant.deploy.torch_export import load_program
from fxquant.lower.conv import ReferenceConv2d

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'fxquant[deploy]')")
pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (fxquant[deploy])")

from fxquant.deploy.onnx import to_onnx  # noqa: E402
from fxquant.deploy.ort import OrtRunner, optimized_counts, runner_for, session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def compiled(model, calib, recipe):
    return fxquant.compile(model, recipe, calib=calib)


def ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def ort_run(model, x, optimization="all"):
    return OrtRunner(session(model.SerializeToString(), threads=1, optimization=optimization))(x)


def test_symmetric_weights_structure(tiny_sr, calib):
    """TinySR: float head, two blocks conv-ReLU-conv (+ skip), float tail. The first conv of
    each block feeds (through the ReLU) the second conv's quantizer: QDQ form, ReLU dropped;
    the second conv's output is read by the residual add: ConvInteger form."""
    model = to_onnx(compiled(tiny_sr, calib, "mse-w8a8-sym"))
    onnx.checker.check_model(model, full_check=True)
    counts = ops(model)
    assert counts["QuantizeLinear"] == 4 and counts["ConvInteger"] == 2
    # QDQ convs: DQ of input codes, int8 weights and int32 bias each
    assert counts["DequantizeLinear"] == 6 and counts["Conv"] == 4  # 2 QDQ + float head/tail
    assert counts["Relu"] == 0 and counts["DepthToSpace"] == 1
    assert model.opset_import[0].version == 13
    inits = {i.name: i for i in model.graph.initializer}
    types = collections.Counter(i.data_type for i in inits.values())
    assert types[onnx.TensorProto.INT32] == 4  # 2 biases and their zero points
    reference = fxquant.lowered_copy(compiled(tiny_sr, calib, "mse-w8a8-sym"), "reference")
    weight_codes = [m.weight_codes for m in reference.modules() if isinstance(m, ReferenceConv2d)]
    weights = []
    for node in model.graph.node:
        source = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is not None:  # weights and biases (int32, zero point 0): per output channel
            assert [a.i for a in node.attribute if a.name == "axis"] == [0]
            zero_point = onnx.numpy_helper.to_array(inits[node.input[2]])
            if source.data_type == onnx.TensorProto.INT32:
                assert not zero_point.any()
                continue
            # weights as uint8 k + 128, zero point 128: ONNX Runtime runs u8 × u8, whose
            # pair sums cannot saturate on CPUs without VNNI (u8 × s8 ones can)
            assert source.data_type == onnx.TensorProto.UINT8 and (zero_point == 128).all()
            weights.append(torch.from_numpy(onnx.numpy_helper.to_array(source).astype("int64")))
        if node.op_type == "DepthToSpace":
            assert [a.s for a in node.attribute if a.name == "mode"] == [b"CRD"]
    # the two QDQ convs are the first conv of each block (ConvInteger keeps its own weights)
    assert len(weights) == 2
    assert all(torch.equal(w - 128, k.long()) for w, k in zip(weights, weight_codes[0::2]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


@pytest.mark.parametrize("recipe", ["mse-w8a8-sym", "minmax-w8a8", "percentile-w8a8", "minmax-w4a4"])
def test_ort_matches_the_reference_lowering_at_two_sizes(tiny_sr, calib, recipe):
    gm = compiled(tiny_sr, calib, recipe)
    reference = fxquant.lowered_copy(gm, "reference")
    model = to_onnx(gm)
    for shape in [(1, 3, 12, 10), (2, 3, 17, 9)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        y = ort_run(model, x)
        with torch.no_grad():
            ref, fake = reference(x), gm(x)
        assert y.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
        span = float(fake.max() - fake.min())
        # the same integer arithmetic: equal but for a rare code flip at a rounding tie
        assert float((y - ref).abs().mean()) < 1e-4 * span
        assert float((y - fake).abs().max()) < 1e-2 * span


def test_integer_kernels_in_the_graph_ort_runs(tiny_sr, calib):
    for recipe, qlinear, integer in (("mse-w8a8-sym", 2, 2), ("minmax-w8a8", 0, 8)):
        model = to_onnx(compiled(tiny_sr, calib, recipe))
        for optimization in ("all", "extended"):
            counts = optimized_counts(model.SerializeToString(), optimization=optimization)
            # asymmetric weights: a centring-sum ConvInteger beside each main one
            assert counts["QLinearConv"] == qlinear and counts["ConvInteger"] == integer
            assert counts["Conv"] + counts["FusedConv"] == 2  # the float head and tail only


def test_qdq_form(tiny_sr, calib):
    gm = compiled(tiny_sr, calib, "mse-w8a8-sym")
    model = to_onnx(gm, form="qdq")
    counts = ops(model)
    assert counts["ConvInteger"] == 0 and counts["Conv"] == 6 and counts["DequantizeLinear"] == 12
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        fake = gm(x)
    assert float((ort_run(model, x) - fake).abs().max()) < 1e-2 * float(fake.max() - fake.min())
    with pytest.raises(ExportError, match=r"conv 'blocks\.0\.0' has asymmetric.*mse-w8a8-sym"):
        to_onnx(compiled(tiny_sr, calib, "minmax-w8a8"), form="qdq")
    with pytest.raises(ExportError, match="4-bit activation quantizer.*form='integer'"):
        to_onnx(compiled(tiny_sr, calib, "minmax-w4a4"), form="qdq")


def test_export_writes_a_file_that_ort_and_the_checker_read(tiny_sr, calib, tmp_path):
    gm = compiled(tiny_sr, calib, "mse-w8a8")
    path = tmp_path / "tiny.onnx"
    fxquant.export(gm, path, format="onnx", example_inputs=(torch.rand(1, 3, 8, 8),))
    onnx.checker.check_model(str(path), full_check=True)
    x = torch.rand(1, 3, 20, 16)
    with torch.no_grad():
        expected = fxquant.lowered_copy(gm, "reference")(x)
    y = OrtRunner(session(path))(x)
    assert float((y - expected).abs().mean()) < 1e-5
    assert not list(tmp_path.glob("*tmp*"))  # written atomically, nothing left behind
    runner = runner_for(gm)  # the eval --runtime onnxruntime path: a temp file, then removed
    assert torch.allclose(runner(x), y)


@pytest.mark.parametrize("recipe,kind", [("daq-w4a4", "daq"), ("dfsq-w4a4", "subset")])
def test_onnx_refuses_dynamic_quantizers_naming_them(tiny_sr, calib, recipe, kind):
    gm = compiled(tiny_sr, calib, recipe)
    with pytest.raises(ExportError, match=rf"quantizer '[\w.]+' \({kind}, recipe '{recipe}'\).*"
                                          "no static ONNX"):
        to_onnx(gm)


def test_i2nq_levels_on_the_uint8_grid_export_as_a_table_lookup(tiny_sr, calib):
    """I²NQ's codes: the half-step bucket (Div, Ceil, Add, Clip, as the lowering computes it
    in float32) gathers each value's uint8 grid code, read by ConvInteger: the reference
    lowering, in ONNX Runtime, to float rounding (ORT's 'all' level also reorders the float
    head conv, which may flip a code at a bucket edge; 'extended' keeps the exporter's ops)."""
    gm = compiled(tiny_sr, calib, "i2nq-w4a4")
    reference = fxquant.lowered_copy(gm, "reference")
    model = to_onnx(gm)
    counts = ops(model)
    assert counts["Gather"] == counts["Ceil"] == 4 and counts["ConvInteger"] >= 4
    assert counts["QuantizeLinear"] == 0
    for shape in [(1, 3, 12, 10), (2, 3, 17, 9)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = reference(x)
        assert float((ort_run(model, x, optimization="extended") - ref).abs().max()) < 1e-5
    with pytest.raises(ExportError, match=r"\(nonuniform, recipe 'i2nq-w4a4'\).*form='integer'"):
        to_onnx(gm, form="qdq")
    with pytest.raises(ExportError, match="refused the model.*integer form"):
        to_onnx(compiled(tiny_sr, calib, "i2nq-w4a4-float"))


def test_onnx_refuses_other_inputs(tiny_sr, calib):
    with pytest.raises(ExportError, match="compiled by fxquant.compile"):
        to_onnx(tiny_sr)
    gm = compiled(tiny_sr, calib, "mse-w8a8-sym")
    with pytest.raises(ExportError, match="already lowered"):
        to_onnx(fxquant.lowered_copy(gm, "cpu"))
    with pytest.raises(ExportError, match="form 'qlinear' unknown; valid: integer, qdq"):
        to_onnx(gm, form="qlinear")
    with pytest.raises(ExportError, match="format 'tflite' unknown"):
        export(gm, "x.tflite", format="tflite")


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_modes_export_as_a_pad_of_the_codes(calib, tmp_path, mode):
    """A conv with reflect/circular padding lowers to a pad of its uint8 codes
    (fxquant/lower/padding.py); ONNX (both forms) and torch.export write that pad too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding="same"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    exports_like_the_reference(compiled(model, calib, "mse-w8a8-sym"), tmp_path,
                               [(1, 3, 12, 10), (2, 3, 9, 13)])


def exports_like_the_reference(gm, tmp_path, shapes) -> tuple:
    """ONNX (both forms, at the first of ``shapes``) and torch.export (at each) give the
    reference lowering's output; returns that lowering and its output at the first shape."""
    reference = fxquant.lowered_copy(gm, "reference")
    x = torch.rand(*shapes[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference(x)
    span = float(ref.max() - ref.min())
    for form in ("integer", "qdq"):
        y = ort_run(to_onnx(gm, form=form), x)
        assert y.shape == ref.shape and float((y - ref).abs().max()) < 1e-4 * span
    path = tmp_path / "model.pt2"
    export(gm, path, format="torch-export", target="reference")
    loaded = load_program(path)
    for shape in shapes:
        x = torch.rand(*shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), reference(x))
    return reference, ref


def test_a_quantized_transposed_conv_exports_as_conv_and_shuffle(calib, tmp_path):
    """``op_types`` with conv_transpose2d: the deconv-to-conv conv, its pixel shuffle and its
    crop (k=9, s=3 needs one) export in both ONNX forms and through torch.export."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(8, 8, 9, stride=3, padding=4, output_padding=2),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    gm = fxquant.compile(model, fxquant.Recipe.from_dict({
        **fxquant.load_preset("mse-w8a8-sym").to_dict(),
        "layers": {"op_types": ["conv2d", "conv_transpose2d"]}}), calib=calib)
    reference, ref = exports_like_the_reference(gm, tmp_path, [(1, 3, 7, 6), (2, 3, 5, 8)])
    assert isinstance(reference.get_submodule("2"), ReferenceConv2d)
    assert ref.shape == (1, 3, 21, 18)


@pytest.mark.slow
@pytest.mark.data
def test_zoo_model_ort_psnr_matches_fake_quant(data):
    from fxquant.workflow import evaluate_sets, prepare

    zoo = prepare("fsrcnn", 4, "mse-w8a8-sym", data_root=data)
    model = to_onnx(zoo.quant_model)
    counts = optimized_counts(model.SerializeToString())
    assert counts["ConvInteger"] + counts["QLinearConv"] == 6 and counts["Conv"] == 1
    scores = {name: evaluate_sets(run, zoo.spec, 4, ["Set5"], data_root=data, limit=2)["Set5"].psnr
              for name, run in (("fake", zoo.quant_model),
                                ("ort", OrtRunner(session(model.SerializeToString()))))}
    assert abs(scores["ort"] - scores["fake"]) < 0.02, scores


def test_bench_ort_int8_variant_runs_beside_the_lowered_ones(tiny_sr, calib):
    from fxquant.bench import build_all, interleaved

    x = torch.rand(1, 3, 16, 16)
    built, missing = build_all(tiny_sr, x, list(calib.split(1)), calib, "mse-w8a8-sym", None,
                               ["fp32_eager", "lowered reference", "ort_int8", "ort_fp32"])
    assert [v.name for v in built] == ["fp32_eager", "lowered reference", "ort_int8", "ort_fp32"]
    assert not missing
    fns = {v.name: v.fn for v in built}
    times = interleaved({name: (lambda f=f: f(x)) for name, f in fns.items()}, rounds=2, warmup=1)
    assert all(len(t) == 2 for t in times.values())
    with torch.inference_mode():
        ort, ref = fns["ort_int8"](x), fns["lowered reference"](x)
    assert float((ort - ref).abs().mean()) < 1e-4
    with torch.inference_mode():
        assert torch.allclose(fns["ort_fp32"](x), fns["fp32_eager"](x), atol=1e-5)


@pytest.mark.parametrize("recipe", ["daq-w4a4", "dfsq-w4a4"])
def test_fake_quant_form_exports_dynamic_statistics_as_graph_ops(tiny_sr, calib, recipe):
    """DAQ's per-(image, channel) ranges and DFSQ's per-input normalization are computed by
    ONNX ops on each input: ORT matches the fake-quant model at another batch and size."""
    gm = compiled(tiny_sr, calib, recipe)
    model = to_onnx(gm, form="fake-quant")
    assert model.opset_import[0].version == 13
    counts = ops(model)
    assert counts["ReduceMean"] + counts["ReduceMax"] + counts["ReduceMin"] > 0  # statistics
    assert counts["QuantizeLinear"] == counts["ConvInteger"] == 0
    x = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fake = gm(x)
    assert float((ort_run(model, x) - fake).abs().max()) < 1e-5


def test_cli_help_lists_export_and_runtime(capsys):
    from fxquant.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--format {onnx,torch-export,torchscript}" in text and "--form {integer,qdq,fake-quant}" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--runtime {torch,onnxruntime}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--out", "m.pt2"], "--out m.pt2 ends in .pt2, the suffix of --format torch-export; give "
                         "a .onnx path for --format onnx, or --format torch-export"),
    (["--format", "torchscript", "--out", "m.onnx"], "ends in .onnx, the suffix of --format onnx"),
    (["--format", "torchscript", "--form", "qdq", "--out", "m.ts"],
     "--form applies to --format onnx; torchscript takes --target"),
    (["--target", "cpu", "--out", "m.onnx"], "--target applies to --format torch-export and "
                                             "torchscript"),
])
def test_cli_export_refuses_flags_its_format_would_ignore(argv, says, capsys, monkeypatch):
    from fxquant.cli import main

    def no_compile(*args, **kwargs):
        raise AssertionError("the flags must be checked before the model is compiled")

    monkeypatch.setattr("fxquant.workflow.prepare", no_compile)
    assert main(["export", "--model", "fsrcnn", "--scale", "4", *argv]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.parametrize("recipe, says", [("fp", "--recipe fp has none"),
                                          ("daq-w4a4", "no static ONNX")])
def test_eval_in_onnxruntime_fails_before_evaluating_what_it_cannot_export(data, capsys,
                                                                         monkeypatch, recipe,
                                                                         says):
    from fxquant.cli import main

    def no_eval(*args, **kwargs):
        raise AssertionError("nothing may be evaluated before the export is known to work")

    monkeypatch.setattr("fxquant.workflow.evaluate_sets", no_eval)
    assert main(["eval", "--model", "fsrcnn", "--scale", "2", "--recipe", recipe,
                 "--runtime", "onnxruntime", "--limit", "1"]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.data
def test_cli_export_and_eval_with_onnxruntime(data, tmp_path, capsys):
    import json

    from fxquant.cli import main

    out = tmp_path / "fsrcnn.onnx"
    assert main(["export", "--model", "fsrcnn", "--scale", "4", "--recipe", "mse-w8a8-sym",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.exists() and summary["nodes"]["ConvInteger"] == 6 and summary["opset"] == 13
    assert summary["max_abs_diff"] < 1e-2
    assert main(["export", "--model", "fsrcnn", "--scale", "4", "--recipe", "mse-w8a8-sym",
                 "--format", "torch-export", "--target", "reference", "--out",
                 str(tmp_path / "f.pt2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == 0
    assert main(["export", "--model", "fsrcnn", "--scale", "4", "--recipe", "dfsq-w4a4",
                 "--format", "torchscript", "--out", str(tmp_path / "f.ts"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] < 1e-5
    assert main(["export", "--model", "fsrcnn", "--scale", "4", "--recipe", "daq-w4a4",
                 "--out", str(tmp_path / "daq.onnx")]) == 2
    assert "daq" in capsys.readouterr().err and not (tmp_path / "daq.onnx").exists()
    # a saved model: --recipe is refused, --scale must be the file's; no --recipe at all
    # compiles with the default (mse-w8a8-sym), as the first export above did explicitly
    saved = str(tmp_path / "f.fxq")
    assert main(["compile", "--model", "fsrcnn", "--scale", "4", "--recipe", "mse-w8a8-sym",
                 "--out", saved]) == 0
    capsys.readouterr()
    for flags, says in ((["--recipe", "mse-w8a8-sym"], "--recipe cannot go with --compiled"),
                        (["--scale", "2"], "--scale 2 does not match")):
        assert main(["export", "--compiled", saved, *flags, "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
    assert main(["export", "--compiled", saved, "--scale", "4", "--out",
                 str(tmp_path / "saved.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == summary["nodes"]
    assert main(["export", "--model", "fsrcnn", "--scale", "4", "--out",
                 str(tmp_path / "default.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == summary["nodes"]
    assert main(["eval", "--model", "fsrcnn", "--scale", "4", "--recipe", "mse-w8a8-sym",
                 "--limit", "1", "--runtime", "onnxruntime", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"] == "onnxruntime"
    scores = report["datasets"]["Set5"]
    assert abs(scores["quant"]["psnr"] - scores["fp"]["psnr"]) < 0.5
