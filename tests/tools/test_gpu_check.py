"""tools/gpu_check.py's bookkeeping, checked without a GPU: a failing stage keeps the others'
results, the tile sweep's winner, the tile switch, and the Markdown it writes."""

from __future__ import annotations

import json

import pytest


def test_a_failing_stage_records_its_error_and_the_run_goes_on(load_tool, tmp_path):
    tool = load_tool("gpu_check")
    result, saved = {"stage_seconds": {}}, []

    def boom():
        raise RuntimeError("triton could not compile")

    tool.run_stage(result, "tiles", boom, lambda r: saved.append(json.dumps(r)))
    tool.run_stage(result, "layers", lambda: [{"x": 1}], lambda r: saved.append(json.dumps(r)))
    assert result["tiles"]["error"] == "RuntimeError: triton could not compile"
    assert "boom" in result["tiles"]["traceback"]
    assert result["layers"] == [{"x": 1}]
    assert len(saved) == 2 and "triton could not compile" in saved[0]  # saved after each stage


def test_the_fastest_bit_exact_tile_wins(load_tool):
    tool = load_tool("gpu_check")
    sweep = [{"variant": "triton_int8_32x32x32", "median_ms": 0.30, "bit_exact": True},
             {"variant": "triton_int8_128x64x32", "median_ms": 0.10, "bit_exact": False},
             {"variant": "triton_int8_64x64x64", "median_ms": 0.20, "bit_exact": True},
             {"variant": "cudnn_fp32", "median_ms": 0.05, "bit_exact": None}]
    assert tool.fastest_tile(sweep) == (64, 64, 64)  # not the wrong one, not cuDNN
    assert tool.fastest_tile({"error": "x"}) is None
    assert tool.fastest_tile(sweep[1:2]) is None


def test_the_tile_switch_restores_the_default_even_when_the_call_raises(load_tool):
    tool = load_tool("gpu_check")
    from fxquant.lower import triton_conv

    default = triton_conv.BLOCK_M, triton_conv.BLOCK_N, triton_conv.BLOCK_K
    seen = tool.with_tile((128, 64, 32), lambda: (triton_conv.BLOCK_M, triton_conv.BLOCK_N,
                                                  triton_conv.BLOCK_K))()
    assert seen == (128, 64, 32)

    def fails():
        raise ValueError("no")

    with pytest.raises(ValueError):
        tool.with_tile((64, 64, 64), fails)()
    assert (triton_conv.BLOCK_M, triton_conv.BLOCK_N, triton_conv.BLOCK_K) == default


def test_the_markdown_names_a_failed_stage_and_renders_the_others(load_tool):
    tool = load_tool("gpu_check")
    result = {"device_name": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "seconds": 9.0,
              "layers": [{"layer": "64->64 k3 g1", "epilogue": "conv", "bit_exact": True,
                          "max_abs_diff": 0.0, "differing": 0.0}],
              "tiles": {"error": "RuntimeError: out of resources"},
              "models": [{"model": "imdn", "recipe": "daq-w4a4", "gpu_vs_reference_psnr":
                          float("inf"), "bit_exact": True, "max_abs_diff": 0.0,
                          "sqnr_vs_fp_db": 30.0}],
              "upscale": {"image": "Set5 baby x4", "model": "imdn", "recipe": "mse-w8a8-sym",
                          "max_grey_level_diff": 1, "differing": 0.00025},
              "set5": [{"model": "imdn", "scale": 4, "recipe": "daq-w4a4", "fake-quant": 29.1279,
                        "reference": 29.1224, "gpu": 29.1292}],
              "bench": [{"model": "imdn", "input": [1, 3, 128, 128], "variant": "triton_int8",
                         "median_ms": 2.5, "speedup_vs_fp32": 1.2},
                        {"model": "imdn", "input": [1, 3, 128, 128], "variant": "fp16_cudagraph",
                         "median_ms": 1.0, "speedup_vs_fp32": 3.0, "graph_equals_eager": False},
                        {"model": "imdn", "input": [1, 3, 128, 128], "variant": "x_cudagraph",
                         "median_ms": None, "speedup_vs_fp32": None,
                         "error": "RuntimeError: y\nSearch for more"}],
              "profile": {"model": "imdn", "input": [1, 3, 128, 128], "calls": 5,
                          "clock": "device", "ops": [{"op": "int8_conv_kernel",
                                                      "calls_per_run": 12.8,
                                                      "self_ms_per_run": 0.992,
                                                      "cpu_ms_per_run": 0.0}]}}
    text = tool.markdown(result)
    assert "on NVIDIA H200 (torch 2.11.0, triton 3.6.0" in text
    assert "**Stage tiles failed**: RuntimeError: out of resources" in text
    assert "| imdn | 1×3×128×128 | triton_int8 | 2.5 | 1.2 |" in text
    assert "1/1 random layer/epilogue cases bit-exact" in text
    assert "| imdn | daq-w4a4 | inf | True | 0 | 30.00 |" in text
    assert "| daq-w4a4 | 29.1279 | 29.1224 | 29.1292 | +0.0068 |" in text
    assert "| fp16_cudagraph (output ≠ eager's) | 1.0 | 3.0 |" in text
    assert "| x_cudagraph | failed: RuntimeError: y Search for more | |" in text  # one row
    assert "over 5 calls, per call, the ops with the most self time on the device" in text
    assert "| `int8_conv_kernel` | 12.8 | 0.992 | 0.000 |" in text
    assert ("`fxquant upscale --lower gpu` against `--lower reference` (Set5 baby x4, imdn "
            "mse-w8a8-sym): largest difference 1 grey levels, 0.025 % of values differ.") in text


def test_without_cuda_it_says_how_to_check_the_script(load_tool, capsys):
    tool = load_tool("gpu_check")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert tool.main([]) == 2
    assert "--device cpu --smoke under TRITON_INTERPRET=1" in capsys.readouterr().err


def test_a_saved_result_renders_again_and_a_foreign_file_is_refused(load_tool, tmp_path, capsys):
    tool = load_tool("gpu_check")
    saved = tmp_path / "gpu_check.json"
    saved.write_text(json.dumps({"device_name": "NVIDIA H200", "torch": "2.11.0",
                                 "layers": {"error": "RuntimeError: x", "traceback": ""}}))
    assert tool.main(["--render", str(saved)]) == 0
    assert "**Stage layers failed**: RuntimeError: x" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    assert tool.main(["--render", str(other)]) == 2
    assert f"cannot render {other}: it is not a result this script wrote" in \
        capsys.readouterr().err


def test_the_cpu_runs_only_the_smoke_check_and_only_under_the_interpreter(load_tool, capsys,
                                                                          monkeypatch):
    tool = load_tool("gpu_check")
    with pytest.raises(SystemExit):
        tool.main(["--device", "cpu"])
    assert "add --smoke (tiny shapes) or run on a CUDA GPU" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert tool.main(["--device", "cpu", "--smoke"]) == 2
    assert "the gpu target cannot run here: no CUDA device (set TRITON_INTERPRET=1" in \
        capsys.readouterr().err


def test_render_names_a_missing_or_non_json_file(load_tool, tmp_path, capsys):
    tool = load_tool("gpu_check")
    assert tool.main(["--render", str(tmp_path / "none.json")]) == 2
    assert f"cannot read {tmp_path / 'none.json'}: No such file or directory" in \
        capsys.readouterr().err
    text = tmp_path / "notes.json"
    text.write_text("GPU notes")
    assert tool.main(["--render", str(text)]) == 2
    assert f"{text} is not JSON" in capsys.readouterr().err
