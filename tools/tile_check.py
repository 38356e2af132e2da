"""Tiled against whole-image upscaling on a 512×512 LR crop (Urban100 img_004), ×4, with the
tiling `fxquant upscale` picks by default at ``--tile 256`` (interior crops for local models,
cross-faded windows for models with image-wide statistics): the numbers of
docs/performance.md "Upscaling large images".

    python tools/tile_check.py [--data ROOT] [--tile 256]
"""

from __future__ import annotations

import argparse

import numpy as np

from fxquant.data import load_image, to_tensor, to_y_tensor
from fxquant.models import build_model
from fxquant.paths import data_root
from fxquant.upscale import default_tiling, receptive_radius, upscale_tiled
from fxquant.workflow import prepare


def models(root):
    carn = build_model("carn_m", 4, pretrained=True, data_root=root)
    yield "CARN-M fp", (lambda x: carn(x, 4)), 3
    yield "PAN fp", build_model("pan", 4, pretrained=True, data_root=root), 3
    yield "FSRCNN fp (Y)", build_model("fsrcnn", 4, pretrained=True, data_root=root), 1
    yield "IMDN fp", build_model("imdn", 4, pretrained=True, data_root=root), 3
    yield "IMDN mse-w8a8", prepare("imdn", 4, "mse-w8a8", data_root=root).quant_model, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--tile", type=int, default=256, help="LR tile side (default 256)")
    args = parser.parse_args(argv)
    root = data_root(args.data)
    image = load_image(root / "benchmark/Urban100/HR/img_004.png")[:512, :512]
    print("| model | measured radius | local | overlap | max | mean | pixels > 1 level |")
    print("|---|---|---|---|---|---|---|")
    for name, fn, channels in models(root):
        x = to_tensor(image) if channels == 3 else to_y_tensor(image)
        radius, local = receptive_radius(fn, channels, 4)
        tile, overlap, blend = default_tiling(radius, local, args.tile)
        whole = upscale_tiled(fn, x, 4, 0, 0).astype(float)
        diff = np.abs(upscale_tiled(fn, x, 4, tile, overlap, blend=blend).astype(float) - whole)
        print(f"| {name} | {radius} | {'yes' if local else 'no'} | {overlap} | {diff.max():.0f} "
              f"| {diff.mean():.3f} | {100 * (diff > 1).mean():.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
