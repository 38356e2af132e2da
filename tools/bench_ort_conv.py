"""One 3×3 conv (64→64, 1×64×128², 2 threads) in ONNX Runtime, four ways: ConvInteger with
int8 weights, ConvInteger with the same weights as uint8 + zero point 128, QLinearConv (a
DQ → Conv → Q group ONNX Runtime fuses), and a float Conv. Interleaved rounds in one process;
medians and the ratio to the float conv.

    python tools/bench_ort_conv.py [--rounds 20] [--size 128] [--channels 64]

Why fxquant's ONNX export stores ConvInteger weights as uint8 (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _session(nodes, inits, channels, size, threads):
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, channels, size, size])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sessions(channels: int, size: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (channels, channels, 3, 3)).astype(np.int8)
    x_q = [nh.from_array(np.array(0.05, np.float32), "sx"), nh.from_array(np.array(128, np.uint8), "zx")]
    quantize = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"])]
    conv_int = [h.make_node("ConvInteger", ["xq", "W", "zx", "zw"], ["a"], pads=[1] * 4),
                h.make_node("Cast", ["a"], ["y"], to=T.FLOAT)]
    u8 = (w.astype(np.int16) + 128).astype(np.uint8)
    qdq = [h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
           h.make_node("DequantizeLinear", ["W", "sw", "zw"], ["wd"], axis=0),
           h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1] * 4),
           h.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
           h.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    return {
        "ConvInteger u8×s8": _session(quantize + conv_int, x_q + [
            nh.from_array(w, "W"), nh.from_array(np.array(0, np.int8), "zw")], channels, size, threads),
        "ConvInteger u8×u8 (zp 128)": _session(quantize + conv_int, x_q + [
            nh.from_array(u8, "W"), nh.from_array(np.array(128, np.uint8), "zw")], channels, size, threads),
        "QLinearConv (DQ→Conv→Q)": _session(quantize + qdq, x_q + [
            nh.from_array(w, "W"), nh.from_array(np.full(channels, 0.01, np.float32), "sw"),
            nh.from_array(np.zeros(channels, np.int8), "zw"),
            nh.from_array(np.array(0.1, np.float32), "sy"), nh.from_array(np.array(128, np.uint8), "zy")],
            channels, size, threads),
        "float Conv": _session([h.make_node("Conv", ["x", "Wf"], ["y"], pads=[1] * 4)],
                               [nh.from_array(w.astype(np.float32), "Wf")], channels, size, threads),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    runs = sessions(args.channels, args.size, args.threads)
    feed = {"x": np.random.default_rng(1).random((1, args.channels, args.size, args.size)).astype(np.float32)}
    for sess in runs.values():
        for _ in range(3):
            sess.run(None, feed)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, sess in runs.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    base = times["float Conv"]
    print(f"| ONNX Runtime {ort.__version__}, {args.channels}→{args.channels} 3×3 at "
          f"{args.size}², {args.threads} threads | median ms | ratio to float Conv (median) |")
    print("|---|---|---|")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base))
        print(f"| {name} | {1e3 * statistics.median(t):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
