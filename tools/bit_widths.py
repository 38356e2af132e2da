"""Which convs a recipe quantizes at which width, and their share of the multiply-adds.

    python tools/bit_widths.py --models pan,carn_m,imdn,edsr_baseline --scale 4 \
        --recipe i2nq-w4a4-tail8-recon-256

For each model: the recipe's layer selection (``[layers]``: include/exclude, keep_first_last,
first_last_bits, tail_bits) on the traced zoo network, and the MACs of each conv call on one
1×3×S×S input (S = --size), summed per weight width; "float" are the convs left unquantized.
Reads no weights and calibrates nothing: the selection is a graph property.
"""

from __future__ import annotations

import argparse

import torch


def mac_shares(model_name: str, scale: int, recipe, size: int) -> dict[str, tuple[int, int]]:
    """``{width: (conv calls, MACs)}`` with width ``"4"``, ``"8"``, … or ``"float"``."""
    from fxquant.graph import conv_nodes, select_layers
    from fxquant.models import build_model, get_spec
    from fxquant.tracing import trace

    model = build_model(model_name, scale).eval()
    gm = trace(model, recipe.tracing.leaf_modules,
               {"scale": scale} if get_spec(model_name).takes_scale else None)
    selection = select_layers(gm, recipe.layers)
    chosen = {n.name for n in selection.nodes}
    width = {n.name: str(selection.bits.get(n.name, recipe.weights.bits)) if n.name in chosen
             else "float" for n in conv_nodes(gm)}
    macs: dict[str, int] = {}
    handles = []
    for node in conv_nodes(gm):
        def count(module, args, out, name=node.name):
            macs[name] = macs.get(name, 0) + out.numel() * module.weight[0].numel()
        handles.append(gm.get_submodule(node.target).register_forward_hook(count))
    with torch.no_grad():
        gm(torch.rand(1, 3, size, size))
    for handle in handles:
        handle.remove()
    totals: dict[str, tuple[int, int]] = {}
    for name, value in macs.items():
        calls, total = totals.get(width[name], (0, 0))
        totals[width[name]] = (calls + 1, total + value)
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="comma-separated zoo names")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipe", required=True, help="preset name or recipe file")
    parser.add_argument("--size", type=int, default=48, help="LR input side (default 48)")
    args = parser.parse_args(argv)
    from fxquant.recipe import resolve_recipe

    recipe = resolve_recipe(args.recipe)  # a misspelt recipe or model: run_tool names it
    rows = {name: mac_shares(name, args.scale, recipe, args.size)
            for name in (n.strip() for n in args.models.split(","))}
    print("| model | width | conv calls | MACs (M) | share of quantized MACs |")
    print("|---|---|---:|---:|---:|")
    for name, totals in rows.items():
        quantized = sum(m for w, (_, m) in totals.items() if w != "float") or 1
        for w in sorted(totals, key=lambda w: (w == "float", w.zfill(3))):
            calls, m = totals[w]
            share = "—" if w == "float" else f"{100 * m / quantized:.1f} %"
            print(f"| {name} | {w} | {calls} | {m / 1e6:.1f} | {share} |")
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
