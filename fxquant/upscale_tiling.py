"""The tiling of ``fxquant upscale``: the windows an image is cut into, their cross-fade
weights, and the overlap a model needs (its receptive field, measured); see
fxquant/upscale.py's docstring for how the windows are run and stitched."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fxquant.errors import FxquantError

SRFunction = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_TILE = 512     # LR pixels a side: IMDN x4 fake-quant, 4000x3000 in: 3.5 GiB peak RSS


def window_spans(length: int, step: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) along one axis."""
    spans = []
    for start in range(0, length, step):
        end = min(start + step, length)
        spans.append((start, end, max(0, start - overlap), min(length, end + overlap)))
    return spans


def window_step(tile: int, overlap: int, height: int, width: int) -> int:
    """The LR pixels between window starts: ``tile`` less both overlaps (0: one window for
    the whole image)."""
    return (tile - 2 * overlap) if tile else max(height, width)


def seam_ramp(r0: int, r1: int, c0: int, c1: int, length: int, half: int, scale: int
              ) -> np.ndarray:
    """A window's cross-fade weight along one axis, over HR rows ``r0·s .. r1·s``: linear
    ramps of ``2·half`` LR pixels centred on its core's inner edges, so that neighbouring
    windows' weights sum to 1 (partition of unity; image borders get no ramp)."""
    u = np.arange(r0 * scale, r1 * scale, dtype=np.float32) + 0.5
    weight = np.ones_like(u)
    if c0 > 0:
        weight *= np.clip((u - (c0 - half) * scale) / (2 * half * scale), 0, 1)
    if c1 < length:
        weight *= np.clip(((c1 + half) * scale - u) / (2 * half * scale), 0, 1)
    return weight


def check_tiling(tile: int, overlap: int) -> None:
    """:class:`FxquantError` unless windows of ``tile`` LR pixels (0: whole) with ``overlap``
    pixels of context on each side leave an interior."""
    if tile and tile <= 2 * overlap:
        raise FxquantError(f"--tile {tile} must be larger than 2 × --overlap ({2 * overlap}): "
                           "each window keeps its interior only")
    if overlap < 0:
        raise FxquantError(f"--overlap must be 0 or more, got {overlap}")


def receptive_radius(fn: SRFunction, channels: int, scale: int, *,
                     sizes: tuple[int, ...] = (48, 96, 192)) -> tuple[int, bool]:
    """The model's receptive-field radius in LR pixels, *measured* (not read off the graph,
    so it works for any callable: compiled, lowered, Inductor), and whether it is local.

    Radius: one pixel in the middle of a random mid-grey image is raised and lowered by 0.25
    and the output change is taken at each LR (Chebyshev) distance; the far-field floor (the
    largest change in the outer quarter: image-wide operations move every output a little)
    is subtracted, and the radius is the farthest distance whose change still exceeds it by
    1/4 grey level. Locality: the right quarter of the image is raised by 0.25, as if a
    window's cut edge had removed it; if outputs farther than 2 × radius + 4 from that edge
    move by more than 1/4 grey level, the model uses image-wide statistics (IMDN's contrast
    channel attention) and is not local. The measurement can fall short where ReLUs are dead
    around the probe, hence the margin :func:`default_tiling` adds."""
    threshold = 0.25 / 255
    for size in sizes:
        centre = size // 2
        profile = torch.zeros(centre + 1)
        with torch.inference_mode():  # every input an inference tensor, as the tiles are
            x = 0.25 + 0.5 * torch.rand(1, channels, size, size,
                                        generator=torch.Generator().manual_seed(0))
            base = fn(x)
            rows = torch.arange(base.shape[-2]) // scale - centre
            cols = torch.arange(base.shape[-1]) // scale - centre
            dist = torch.maximum(rows.abs()[:, None], cols.abs()[None, :]).flatten()
            for delta in (0.25, -0.25):
                probe = x.clone()
                probe[:, :, centre, centre] += delta
                change = (fn(probe) - base).abs().amax(dim=1)[0].flatten().float()
                ring = torch.zeros(centre + 1).scatter_reduce(0, dist, change, "amax")
                profile = torch.maximum(profile, ring)
            floor = float(profile[(3 * len(profile)) // 4:].max())
            above = torch.nonzero(profile > floor + threshold).flatten()
            radius = int(above.max()) if len(above) else 0
            cut, reach = (3 * size) // 4, 2 * radius + 4
            if radius >= (3 * len(profile)) // 4 - 1 or cut <= reach:
                continue  # the probe is too small to see the whole neighbourhood
            probe = x.clone()
            probe[:, :, :, cut:] += 0.25
            far = (fn(probe) - base)[..., :(cut - reach) * scale].abs().max()
        return radius, float(far) <= threshold
    return sizes[-1] // 2, False


def default_tiling(radius: int, local: bool = True, tile: int | None = None,
                   overlap: int | None = None) -> tuple[int, int, int]:
    """``(tile, overlap, blend)`` from a measured radius (``tile``/``overlap`` given by the
    user are kept). overlap = 2 × radius + 4: a margin over the measurement, since a
    window's cut edge changes a whole half-plane, not one pixel, and small far contributions
    add up. A model with image-wide statistics (``local`` False) gets at least 32 and
    cross-fades its windows (``blend``) over the overlap less the radius, where each
    window's output is unaffected by its own edge. tile = ``DEFAULT_TILE``, at least
    4 × overlap."""
    if overlap is None:
        overlap = 2 * radius + 4 if local else max(2 * radius + 4, 32)
    if tile is None:
        tile = max(DEFAULT_TILE, 4 * overlap)
    return tile, overlap, (0 if local else max(0, overlap - radius - 2))


def window_shapes(sizes, tile: int, overlap: int) -> set[tuple[int, int]]:
    """The (height, width) of every window :func:`~fxquant.upscale.upscale_tiled` cuts images
    of ``sizes`` (LR height, width) into: each one a graph of its own for a model compiled
    for static shapes."""
    shapes = set()
    for height, width in sizes:
        step = window_step(tile, overlap, height, width)
        rows, cols = window_spans(height, step, overlap), window_spans(width, step, overlap)
        shapes |= {(wy1 - wy0, wx1 - wx0) for _, _, wy0, wy1 in rows for _, _, wx0, wx1 in cols}
    return shapes
