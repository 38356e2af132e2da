"""``fxquant upscale``: super-resolve a user's images, large ones in overlapping tiles.

The model sees what it sees in evaluation (:func:`fxquant.evaluate.super_resolve`): an RGB
model gets the image as ``1×3×h×w`` in [0, 1] and its output is clamped, ×255 and rounded;
a Y-channel model (FSRCNN) gets the BT.601 luma and its Y output is recombined with
MATLAB-bicubic Cb/Cr. A grey image is an RGB image with three equal channels (a Y model's
output is then grey and saved as such); an alpha channel is upscaled with MATLAB bicubic and
re-attached.

Tiling (:func:`upscale_tiled`): the LR image is cut into windows of at most ``tile`` pixels a
side that overlap by ``2·overlap``; each window's output is cropped to its interior (the
``overlap`` LR pixels facing another window are dropped) and written into one preallocated
uint8 array. No blending is needed: when ``overlap`` is at least the model's receptive-field
radius, every kept output pixel saw exactly the input it sees in a whole-image run (a real
image border is a border of the window too), so tiled equals whole up to float rounding of
differently sized convolutions. Models with image-wide statistics (IMDN's contrast channel
attention, dynamic per-image quantizers such as DAQ) see per-window statistics instead, which
change a window's output a little whatever the overlap; for them the windows are cross-faded
over the overlap so that the seams show no more than that difference does (measured in
docs/performance.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fxquant.data.convert import rgb_to_ycbcr, to_tensor, to_y_tensor, ycbcr_to_rgb
from fxquant.data.imresize import imresize
from fxquant.errors import FxquantError
from fxquant.upscale_inputs import (SUFFIXES, InputImage, list_inputs, probe_input,
                                    read_input)
from fxquant.upscale_tiling import (DEFAULT_TILE, SRFunction, check_tiling, default_tiling,
                                    receptive_radius, seam_ramp, window_shapes, window_spans,
                                    window_step)

__all__ = ["upscale_tiled", "receptive_radius", "default_tiling", "read_input",
           "upscale_image", "SUFFIXES", "DEFAULT_TILE"]

_CHROMA_MARGIN = 4     # LR rows around a bicubic strip: the cubic kernel reaches 2 (+ rounding)
_STRIP = 256           # LR rows per strip of the bicubic chroma/alpha and recombination


def _to_pixels(out: torch.Tensor) -> np.ndarray:
    """A model output tile → uint8, the same elementwise arithmetic as ``super_resolve``."""
    if out.shape[1] == 1:  # Y plane: float64, ×255, clamp, round (the evaluation's Y path)
        values = torch.clamp(out[0, 0].double() * 255.0, 0, 255).round()
        return values.to(torch.uint8).numpy()
    values = torch.round(out[0].float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # to_uint8
    return values.permute(1, 2, 0).numpy()


def upscale_tiled(fn: SRFunction, lr: torch.Tensor, scale: int, tile: int, overlap: int, *,
                  blend: int = 0, progress: bool = False) -> np.ndarray:
    """``fn`` applied to ``lr`` (1×C×H×W) window by window; returns the uint8 output
    (H·s × W·s × 3 for C=3, H·s × W·s for C=1) converted as in evaluation.

    ``tile`` is the largest window side in LR pixels (0: the whole image in one call),
    ``overlap`` the LR pixels of context kept on each side of a window's interior. Each
    window's interior is written as it is (exact for a model whose receptive field fits in
    ``overlap``). ``blend`` > 0 instead cross-fades neighbouring windows over ``2·blend`` LR
    pixels around each seam (at most ``overlap``): for models with image-wide statistics,
    whose windows each see their own, so that no seam shows."""
    if lr.dim() != 4 or lr.shape[0] != 1:
        raise ValueError(f"upscale_tiled takes one 1×C×H×W image, got {tuple(lr.shape)}")
    _, channels, height, width = lr.shape
    check_tiling(tile, overlap)
    step = window_step(tile, overlap, height, width)
    half = min(blend, overlap, step // 2)
    rows, cols = window_spans(height, step, overlap), window_spans(width, step, overlap)
    shape = (height * scale, width * scale) + ((3,) if channels == 3 else ())
    result = np.empty(shape, dtype=np.uint8)
    band = np.zeros((0, width * scale, channels), np.float32)
    bar = tqdm(total=len(rows) * len(cols), desc="tiles", unit="tile", leave=False,
               disable=not progress or len(rows) * len(cols) == 1)
    with torch.inference_mode():
        for y0, y1, wy0, wy1 in rows:
            if half:  # a float band of HR rows for this row of windows; the seam rows above
                ry0, ry1 = max(0, y0 - half), min(height, y1 + half)  # are carried over
                ramp_y = seam_ramp(ry0, ry1, y0, y1, height, half, scale)
                band, carried = np.zeros(((ry1 - ry0) * scale, width * scale, channels),
                                         np.float32), band
                band[:carried.shape[0]] = carried
            for x0, x1, wx0, wx1 in cols:
                # a fresh contiguous tensor: a view's strides and offset into the image would
                # be guards of a compiled model, one compile per image width and window
                out = fn(lr[:, :, wy0:wy1, wx0:wx1].clone(memory_format=torch.contiguous_format))
                expected = (1, channels, (wy1 - wy0) * scale, (wx1 - wx0) * scale)
                if tuple(out.shape) != expected:
                    raise FxquantError(f"the model returned {tuple(out.shape)} for a "
                                       f"{wy1 - wy0}×{wx1 - wx0} input; expected {expected} "
                                       f"(x{scale}, {channels} channels)")
                if half:  # accumulate weight × value over this window's core ± half
                    rx0, rx1 = max(0, x0 - half), min(width, x1 + half)
                    region = out[0, :, (ry0 - wy0) * scale:(ry1 - wy0) * scale,
                                 (rx0 - wx0) * scale:(rx1 - wx0) * scale]
                    values = region.float().clamp(0.0, 1.0).mul(255.0).permute(1, 2, 0)
                    weight = ramp_y[:, None, None] * seam_ramp(rx0, rx1, x0, x1, width, half,
                                                           scale)[None, :, None]
                    band[:, rx0 * scale:rx1 * scale] += weight * values.numpy()
                else:
                    core = out[:, :, (y0 - wy0) * scale:(y1 - wy0) * scale,
                               (x0 - wx0) * scale:(x1 - wx0) * scale]
                    result[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = _to_pixels(core)
                bar.update()
            if half:  # rows no later window reaches are complete (their weights sum to 1)
                done = (y1 - half if y1 < height else height) - ry0
                pixels = np.clip(np.rint(band[:done * scale]), 0, 255).astype(np.uint8)
                target = result[ry0 * scale:(ry0 + done) * scale]
                target[...] = pixels.reshape(target.shape)
                band = band[done * scale:]
    bar.close()
    return result


def _bicubic_strips(plane: np.ndarray, scale: int,
                    apply: Callable[[int, int, np.ndarray], None]) -> None:
    """MATLAB-bicubic ×``scale`` of an H×W(×C) plane, ``_STRIP`` LR rows at a time: strips
    overlap by ``_CHROMA_MARGIN`` rows (the kernel's reach), so each kept row equals the
    whole-image resize; ``apply(r0, r1, hr_rows)`` gets HR rows ``r0·s .. r1·s``."""
    height, width = plane.shape[:2]
    for r0 in range(0, height, _STRIP):
        r1 = min(r0 + _STRIP, height)
        w0, w1 = max(0, r0 - _CHROMA_MARGIN), min(height, r1 + _CHROMA_MARGIN)
        up = imresize(plane[w0:w1], scale=float(scale),
                      output_shape=((w1 - w0) * scale, width * scale))
        apply(r0, r1, up[(r0 - w0) * scale:(r1 - w0) * scale])


def upscale_image(fn: SRFunction, image: InputImage, color: str, scale: int, tile: int,
                  overlap: int, *, blend: int = 0, progress: bool = False) -> np.ndarray:
    """The upscaled image as uint8: H·s×W·s×3 RGB, ×4 with alpha (RGBA), or H·s×W·s for a
    grey image through a Y-channel model."""
    if color == "y":
        y_sr = upscale_tiled(fn, to_y_tensor(image.rgb), scale, tile, overlap, blend=blend,
                             progress=progress)
        out = np.empty(y_sr.shape + (3,), dtype=np.uint8)
        chroma = rgb_to_ycbcr(image.rgb)[:, :, 1:]

        def combine(r0: int, r1: int, cbcr: np.ndarray) -> None:
            rows = slice(r0 * scale, r1 * scale)
            ycbcr = np.concatenate([y_sr[rows].astype(np.float64)[:, :, None], cbcr], axis=2)
            out[rows] = np.clip(np.rint(ycbcr_to_rgb(ycbcr)), 0, 255).astype(np.uint8)

        _bicubic_strips(chroma, scale, combine)
        if image.grey and image.alpha is None:
            return np.ascontiguousarray(out[:, :, 0])
    else:
        out = upscale_tiled(fn, to_tensor(image.rgb), scale, tile, overlap, blend=blend,
                            progress=progress)
    if image.alpha is None:
        return out
    alpha = np.empty(out.shape[:2], dtype=np.uint8)

    def put(r0: int, r1: int, rows: np.ndarray) -> None:
        alpha[r0 * scale:r1 * scale] = rows

    _bicubic_strips(image.alpha, scale, put)
    return np.concatenate([out, alpha[:, :, None]], axis=2)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as a PNG atomically (temporary file in the same folder, renamed)."""
    from fxquant.files import atomic_output

    with atomic_output(path, "upscaled image") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _check_out(source: Path, out: Path) -> bool:
    """Fail before any work when --out cannot be written; True when it is a folder."""
    from fxquant.files import check_output_dir, check_output_path

    if source.is_dir() or out.is_dir():
        check_output_dir(out, "output folder (--out)")
        return True
    if out.suffix.lower() != ".png":
        raise FxquantError(f"--out {out}: upscale writes PNG; give a .png file, or an existing "
                           "folder")
    check_output_path(out, "upscaled image (--out)")
    return False


def _outputs(images: list[Path], out: Path, to_folder: bool, scale: int) -> list[Path]:
    """``<out>/<stem>_x<s>.png`` into a folder (created if missing, in an existing folder),
    else the --out file itself."""
    if to_folder:
        out.mkdir(exist_ok=True)
    targets = [out / f"{p.stem}_x{scale}.png" for p in images] if to_folder else [out]
    for image, target in zip(images, targets):
        if target.resolve() == image.resolve():
            raise FxquantError(f"--out would overwrite the input {image}; choose another path")
    return targets


def lower_options(target: str, text: str | None) -> dict:
    """``fxquant.lowered_copy`` keywords for ``--lower TARGET --lower-options TEXT``; TEXT
    holds the lower pass's own options, ``key=value,...`` as in a pipeline (docs/passes.md),
    checked by the pass itself."""
    import dataclasses

    from fxquant.pipeline import parse_pipeline

    if not text:
        return {"target": target}
    if any(c in text for c in "{}"):
        raise FxquantError(f"--lower-options '{text}': give key=value,... without braces, "
                           "e.g. compile=true,planes=1")
    keys = {item.split("=", 1)[0].strip().replace("-", "_") for item in text.split(",")}
    if "target" in keys:
        raise FxquantError("--lower-options: the target is --lower's; give the other options "
                           "(compile, dynamic, fuse, planes, subset_codes)")
    (lower,) = parse_pipeline(f"lower{{target={target},{text}}}")
    return {f.name: getattr(lower, f.name) for f in dataclasses.fields(lower)}


def requested_lowering(args) -> dict:
    """``fxquant.lowered_copy`` keywords for ``--lower``/``--lower-options`` ({} without
    ``--lower``), checked before anything is compiled (which can take minutes)."""
    if args.lower_options and not args.lower:
        raise FxquantError("--lower-options needs --lower cpu|reference|gpu")
    return lower_options(args.lower, args.lower_options) if args.lower else {}


def sr_function(args, lowered: dict) -> tuple[SRFunction, SRFunction, object, int, str]:
    """The SR callable for the command line's model flags: ``--compiled FILE``, or ``--model``
    (zoo or own) compiled here with ``--recipe`` (``fp``: the float model), optionally
    ``--lower cpu|reference|gpu`` (gpu: on CUDA when torch sees a GPU, else under the Triton
    interpreter when ``TRITON_INTERPRET=1``, slowly) with the pass's ``--lower-options``
    (``lowered``: :func:`requested_lowering`).
    Returns ``(fn, probe, spec, scale, description)``: ``probe`` is what the receptive-field
    probe runs, ``fn`` itself or, for ``compile=true``, the same lowered model uncompiled (the
    same integer ops), so that the probe's three image sizes compile nothing."""
    import fxquant
    from fxquant.models.user import own_model_flags, source_from_args
    from fxquant.workflow import as_sr_function, load_compiled, prepare, refuse_with_compiled

    if args.compiled:
        refuse_with_compiled(recipe=args.recipe, checkpoint=args.checkpoint)
        models = load_compiled(args.compiled, model=args.model, scale=args.scale,
                               data_root=args.data, **own_model_flags(args))
        model, what = models.quant_model, f"{args.compiled}"
    else:
        if not args.model:
            raise FxquantError("give --compiled FILE, or --model (a zoo name or "
                               "file.py:Class) with --recipe PRESET (or --recipe fp)")
        if not args.recipe:
            raise FxquantError("give --recipe: a preset or .toml to compile the model here, or "
                               "`--recipe fp` for the float model")
        source = source_from_args(args)
        float_only = args.recipe == "fp"
        models = prepare(source, None, None if float_only else args.recipe,
                         data_root=args.data, progress=not args.quiet)
        model = models.float_model if float_only else models.quant_model
        what = f"{source.label} x{source.scale} {args.recipe}"
    if args.lower:
        if not isinstance(model, torch.fx.GraphModule) or \
                not getattr(model, "fxquant_recipe", None):
            raise FxquantError("--lower needs a quantized model: --compiled FILE or --recipe "
                               "PRESET, not --recipe fp")
        quantized, model = model, fxquant.lowered_copy(model, **lowered)
        what += f", lowered ({args.lower}" + (f"; {args.lower_options})" if args.lower_options
                                              else ")")
        if args.lower == "gpu" and torch.cuda.is_available():  # else the Triton interpreter
            fn = as_sr_function(model.to("cuda"), models.spec, models.scale)
            on_gpu = lambda x: fn(x.to("cuda")).cpu()  # noqa: E731  tiles go there and back
            return on_gpu, on_gpu, models.spec, models.scale, what + " on CUDA"
        if lowered.get("compile"):
            eager = fxquant.lowered_copy(quantized, **{**lowered, "compile": False,
                                                       "dynamic": False})
            return (as_sr_function(model, models.spec, models.scale),
                    as_sr_function(eager, models.spec, models.scale), models.spec,
                    models.scale, what)
    fn = as_sr_function(model, models.spec, models.scale)
    return fn, fn, models.spec, models.scale, what


def static_compile_note(lowered: dict, shapes: set[tuple[int, int]]) -> str | None:
    """What to say when ``--lower-options compile=true`` (static shapes) meets windows of
    several shapes: each compiles a graph of its own (tens of seconds on a few cores), and
    past Dynamo's limit the rest run uncompiled; ``dynamic=true`` compiles one for all
    (docs/performance.md, "Many input sizes": Set14 with IMDN x4, 340.1 s static against
    110.5 s)."""
    if len(shapes) < 2 or not lowered.get("compile") or lowered.get("dynamic"):
        return None
    from torch._dynamo import config as dynamo_config

    limit = dynamo_config.recompile_limit
    return (f"note: the windows come in {len(shapes)} shapes, and compile=true compiles a "
            f"graph for each" + (f" (the first {limit}; the rest run uncompiled)"
                                 if len(shapes) > limit else "")
            + ": add dynamic=true (--lower-options compile=true,dynamic=true) to compile one "
            "graph for every size")


def run(args) -> int:
    """``fxquant upscale`` (arguments parsed in :mod:`fxquant.cli`)."""
    source, out = Path(args.input), Path(args.out)
    images = list_inputs(source)
    sizes = [probe_input(path) for path in images]  # before compiling, which takes minutes
    if args.tile is not None and args.overlap is not None:
        check_tiling(args.tile, args.overlap)
    to_folder = _check_out(source, out)
    lowered = requested_lowering(args)
    fn, probe, spec, scale, what = sr_function(args, lowered)
    targets = _outputs(images, out, to_folder, scale)
    channels = spec.channels
    radius, local = receptive_radius(probe, channels, scale)
    tile, overlap, blend = default_tiling(radius, local, args.tile, args.overlap)
    if not args.quiet:
        print(f"{what}: x{scale}, receptive-field radius {radius} LR pixels (measured), tiles "
              f"of {tile or 'whole'} LR pixels, overlap {overlap}", file=sys.stderr)
        if not local and tile:  # whole images (--tile 0) have no seams to warn about
            print("note: the model also uses image-wide statistics, so a tile's output differs "
                  f"a little from the whole image's; seams are cross-faded over {2 * blend} LR "
                  "pixels (--tile 0 runs each image whole)", file=sys.stderr)
        note = static_compile_note(lowered, window_shapes(sizes, tile, overlap))
        if note:
            print(note, file=sys.stderr)
    for image_path, target in tqdm(list(zip(images, targets)), desc="images", unit="image",
                                   disable=args.quiet or len(images) == 1):
        array = upscale_image(fn, read_input(image_path), spec.color, scale, tile, overlap,
                              blend=blend, progress=not args.quiet)
        write_png(target, array)
        if not args.quiet:
            tqdm.write(f"wrote {target} ({array.shape[1]}x{array.shape[0]})", file=sys.stderr)
    return 0
