"""PNG figures for people to look at: image grids, orthogonal volume views and label overlays.

Inputs may be numpy arrays or torch tensors (any device/dtype). Figures are RGB PNGs written atomically
(temporary file in the destination folder, then ``os.replace``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from medsynth_core.atomic import atomic_output

__all__ = [
    "LABEL_COLOURS",
    "grid_size",
    "label_overlay",
    "orthogonal_views",
    "save_grid",
    "save_volume_views",
    "title_band_height",
    "to_uint8",
]

LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip
"""RGB colour of label ``k >= 1`` is ``LABEL_COLOURS[(k - 1) % len(LABEL_COLOURS)]``."""

BACKGROUND = 32  # grey level of title bands and gaps between cells
GAP = 2  # pixels between cells
_TEXT = (235, 235, 235)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_uint8(img, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map an array/tensor to uint8 display values, same shape.

    ``value_range=(lo, hi)`` maps ``lo -> 0`` and ``hi -> 255`` (values outside are clipped); ``None`` uses the
    image's own finite min and max. A constant image (or ``hi <= lo``) maps to 0; NaN maps to 0.
    """
    a = _np(img).astype(np.float64)
    if value_range is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        return np.zeros(a.shape, np.uint8)
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.rint(np.nan_to_num(out, nan=0.0)).astype(np.uint8)


def _as_display(img) -> np.ndarray:
    """(H, W), (1, H, W), (H, W, 3|4) or (3, H, W) -> float or uint8 array (H, W) or (H, W, 3)."""
    a = _np(img)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3]
    elif a.ndim == 3 and a.shape[0] == 3:
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[-1] == 3):
        raise ValueError(f"expected a 2D image, (1,H,W), (H,W,3) or (3,H,W); got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    return a


def _rgb(img: np.ndarray, value_range) -> np.ndarray:
    """Display array -> uint8 RGB (H, W, 3); uint8 input is taken as display values unchanged."""
    u8 = img if img.dtype == np.uint8 else to_uint8(img, value_range)
    return np.repeat(u8[..., None], 3, axis=-1) if u8.ndim == 2 else u8


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten ``text`` (ending in '..') until it fits ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "..", font)[0] > width:
        text = text[:-1]
    return text + ".." if text else ""


def _title_band(font) -> int:
    """Height in pixels of the band holding one line of title text."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = draw.textbbox((0, 0), "Ag|", font=font)
    return box[3] + 4


def grid_size(
    cell_hw: tuple[int, int],
    nrows: int,
    ncols: int,
    titled_rows: Sequence[bool] | bool = False,
    left: int = 0,
) -> tuple[int, int]:
    """(width, height) of a :func:`save_grid` figure.

    ``cell_hw`` is the common cell size after scaling; rows flagged in ``titled_rows`` (one flag per row, or
    one bool for all) get a :func:`title_band_height` band above their cells; cells and rows are separated by
    ``GAP`` pixels; ``left`` is the width of the row-title band (0 without row titles)::

        width  = left + ncols * cell_w + (ncols - 1) * GAP
        height = nrows * cell_h + (nrows - 1) * GAP + (number of titled rows) * title_band_height()
    """
    if isinstance(titled_rows, bool):
        titled_rows = [titled_rows] * nrows
    width = left + ncols * cell_hw[1] + (ncols - 1) * GAP
    height = nrows * cell_hw[0] + (nrows - 1) * GAP + sum(bool(t) for t in titled_rows) * title_band_height()
    return width, height


def title_band_height() -> int:
    """Height in pixels of the title band above a titled grid row."""
    return _title_band(_font())


def save_grid(
    path: str | os.PathLike,
    images: Sequence,
    titles: Sequence | None = None,
    ncols: int | None = None,
    value_range: tuple[float, float] | str | None = None,
    scale: int = 2,
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Write a grid of 2D images as an RGB PNG and return its path.

    ``images`` is a flat sequence (list, or an ``(N, ...)`` array/tensor; laid out row-major with ``ncols``
    columns, default ``ceil(sqrt(n))``) or a list of rows (lists). Each image may be ``(H, W)``, ``(1, H, W)``, ``(H, W, 3)`` or ``(3, H, W)``, numpy or
    torch; uint8 images are shown as-is, others are mapped by :func:`to_uint8` with ``value_range``
    (``None``: per image min-max; ``(lo, hi)``: fixed; ``"shared"``: min-max over all images). Each image is
    enlarged by the integer ``scale`` (nearest neighbour) and centred in a common cell (the largest scaled
    image), padded with black. ``titles`` (flat, or nested like ``images``; ``None`` entries allowed) are drawn
    above the cells with PIL's default font (rows without any title get no title band), ``row_titles`` in a
    band to the left. Parent folders are created; the write is atomic. Layout size: see :func:`grid_size`.
    """
    nested = len(images) > 0 and isinstance(images[0], (list, tuple))
    if nested:
        rows = [list(r) for r in images]
        ncols = max(len(r) for r in rows)
    else:
        flat = list(images)
        ncols = ncols or max(1, math.ceil(math.sqrt(len(flat))))
        rows = [flat[i : i + ncols] for i in range(0, len(flat), ncols)]
    if not rows or not any(rows):
        raise ValueError("save_grid needs at least one image")
    titles_rows: list[list] = [[None] * len(r) for r in rows]
    if titles is not None:
        if len(titles) and isinstance(titles[0], (list, tuple)):  # one list per row
            for i, tr in enumerate(list(titles)[: len(rows)]):
                titles_rows[i][: len(tr)] = list(tr)[: len(rows[i])]
        else:  # flat, row-major
            it = iter(titles)
            titles_rows = [[next(it, None) for _ in r] for r in rows]
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")

    disp = [[_as_display(im) for im in r] for r in rows]
    if isinstance(value_range, str):
        if value_range != "shared":
            raise ValueError(f"value_range must be None, (lo, hi) or 'shared', got {value_range!r}")
        vals = [d for r in disp for d in r if d.dtype != np.uint8]
        value_range = (
            (min(float(np.nanmin(d)) for d in vals), max(float(np.nanmax(d)) for d in vals)) if vals else None
        )
    cells = [[np.repeat(np.repeat(_rgb(d, value_range), scale, 0), scale, 1) for d in r] for r in disp]
    cell_h = max(c.shape[0] for r in cells for c in r)
    cell_w = max(c.shape[1] for r in cells for c in r)

    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_titled = [any(t for t in tr) for tr in titles_rows]
    band = _title_band(font)
    left = 0
    if row_titles is not None and any(row_titles):
        left = max(_text_size(scratch, str(t), font)[0] for t in row_titles if t) + 8
    width, height = grid_size((cell_h, cell_w), len(cells), ncols, row_titled, left)

    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    tops, y = [], 0  # y of each row's band (or cells when untitled)
    for i in range(len(cells)):
        tops.append(y)
        y += cell_h + GAP + (band if row_titled[i] else 0)
    for i, r in enumerate(cells):
        y0 = tops[i] + (band if row_titled[i] else 0)
        for j, c in enumerate(r):
            x0 = left + j * (cell_w + GAP)
            canvas[y0 : y0 + cell_h, x0 : x0 + cell_w] = 0
            oy, ox = (cell_h - c.shape[0]) // 2, (cell_w - c.shape[1]) // 2
            canvas[y0 + oy : y0 + oy + c.shape[0], x0 + ox : x0 + ox + c.shape[1]] = c
    pil = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(pil)
    for i in range(len(cells)):
        if row_titled[i]:
            for j, t in enumerate(titles_rows[i]):
                if t:
                    x0 = left + j * (cell_w + GAP)
                    text = _fit(draw, str(t), font, cell_w - 2)
                    draw.text((x0 + 1, tops[i] + 1), text, fill=_TEXT, font=font)
        if left and i < len(row_titles) and row_titles[i]:
            text = str(row_titles[i])
            th = _text_size(draw, text, font)[1]
            cell_top = tops[i] + (band if row_titled[i] else 0)
            draw.text((2, cell_top + max(0, (cell_h - th) // 2)), text, fill=_TEXT, font=font)

    path = Path(path)
    with atomic_output(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


def _volume(volume) -> np.ndarray:
    v = _np(volume)
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"expected a (D, H, W) or (1, D, H, W) volume, got shape {v.shape}")
    return v


def orthogonal_views(volume, index: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial ``v[d]``, coronal ``v[:, h]`` and sagittal ``v[:, :, w]`` slices of a ``(D, H, W)`` volume.

    ``index`` is ``(d, h, w)`` (negative values count from the end); default the centre ``(D//2, H//2, W//2)``.
    Accepts ``(1, D, H, W)``; returns numpy arrays (plain indexing, no flips).
    """
    v = _volume(volume)
    if index is None:
        index = tuple(n // 2 for n in v.shape)
    d, h, w = (int(i) for i in index)
    return v[d], v[:, h], v[:, :, w]


def save_volume_views(
    path: str | os.PathLike,
    volumes: Sequence,
    titles: Sequence[str] | None = None,
    value_range: tuple[float, float] | None = None,
    scale: int = 2,
) -> Path:
    """One grid row per volume with its axial, coronal and sagittal centre views; returns the path.

    ``value_range=None`` scales each volume by its own min-max (shared by its three views). ``titles`` label
    the rows; the columns are titled axial / coronal / sagittal.
    """
    rows = []
    for vol in volumes:
        v = _volume(vol)
        vr = value_range
        if vr is None:
            finite = v[np.isfinite(v)]
            vr = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        rows.append([to_uint8(view, vr) for view in orthogonal_views(v)])
    col_titles = [["axial", "coronal", "sagittal"]] + [[None] * 3] * (len(rows) - 1)
    return save_grid(path, rows, titles=col_titles, scale=scale, row_titles=titles)


def label_overlay(
    image, labels, alpha: float = 0.4, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Blend label colours over a greyscale image; returns uint8 RGB ``(*shape, 3)``.

    The image is mapped with :func:`to_uint8` (``value_range``); each pixel with label ``k >= 1`` becomes
    ``(1 - alpha) * grey + alpha * LABEL_COLOURS[(k - 1) % 12]``, label 0 stays grey.
    """
    img = _np(image)
    lab = _np(labels).astype(np.int64)
    if img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and labels {lab.shape} must have the same shape")
    grey = to_uint8(img, value_range).astype(np.float64)[..., None]
    table = np.asarray(LABEL_COLOURS, dtype=np.float64)
    colour = table[(np.maximum(lab, 1) - 1) % len(table)]
    out = np.where(lab[..., None] > 0, (1.0 - alpha) * grey + alpha * colour, grey)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)
