"""IMDN ×4 daq-w4a4 at 256²: FP32 eager vs lowered cpu (compiled) with 2 and 1 int8 weight
planes, and lowered cpu eager (1 plane); 5 interleaved rounds, medians of the times and of
the per-round FP32/variant ratios (fxquant.bench.interleaved). Needs $FXQUANT_DATA.

    python tools/daq_bench_planes.py
"""
import statistics, torch, fxquant
from fxquant.bench import interleaved
from fxquant.workflow import prepare
zoo = prepare("imdn", 4, "daq-w4a4")
fake = zoo.quant_model
x = torch.rand(1, 3, 256, 256)
v = {"fp32_eager": zoo.float_model.eval(),
     "cpu compiled, 2 planes": fxquant.lowered_copy(fake, "cpu", compile=True, planes=2),
     "cpu compiled, 1 plane": fxquant.lowered_copy(fake, "cpu", compile=True, planes=1),
     "cpu eager, 1 plane": fxquant.lowered_copy(fake, "cpu", planes=1)}
with torch.inference_mode():
    for m in v.values():
        m(x)
times = interleaved({k: (lambda m=m: m(x)) for k, m in v.items()}, 5)
base = times["fp32_eager"]
for k, t in times.items():
    print(f"| {k} | {1e3*statistics.median(t):.1f} ms | {statistics.median([b/a for b, a in zip(base, t)]):.2f}× |")
