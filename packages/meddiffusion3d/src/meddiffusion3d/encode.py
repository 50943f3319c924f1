"""Patch-wise encoding of arbitrarily large volumes, tiled decoding, latent normalisation (spec §1.4).

* :func:`patch_encode` splits a volume into non-overlapping P³ blocks, encodes each block **alone** and
  re-tiles the latents. Blocks go through the encoder ``chunk`` at a time, so activation memory is
  bounded by the chunk size, not by the volume. This is *not* whole-volume encoding (per-patch
  GroupNorm statistics and attention), spec §1.4.
* :func:`decode_latent` decodes a whole latent grid, or tiles of it (``tile``), optionally overlapped
  and Gaussian-blended (spec §6.5).
* :class:`LatentNorm`: ``ẑ = 2(z − m)/(M − m) − 1`` with m, M the codebook's global min/max
  (``generate_training_latent.py``); the stats travel with the latent files (spec §6.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: autoencoder.py imports this module, never the other way at run time
    from .autoencoder import PatchVolumeAE


def patch_grid(shape: tuple[int, ...], patch: int) -> tuple[int, int, int]:
    if len(shape) != 3 or any(s % patch for s in shape) or min(shape) <= 0:
        raise ValueError(
            f"volume spatial shape {tuple(shape)} must be a positive multiple of the patch size {patch} "
            f"in every dimension; crop or pad it first (e.g. to {tuple(-(-s // patch) * patch for s in shape)})"
        )
    return tuple(s // patch for s in shape)  # type: ignore[return-value]


def patch_encode(
    ae: PatchVolumeAE, x: torch.Tensor, patch: int = 64, quantize: bool = False, chunk: int | None = None
) -> torch.Tensor:
    """(B, C, D, H, W) → (B, E, D/ds, H/ds, W/ds): every P³ block encoded alone, ``chunk`` blocks per forward.

    ``quantize``: nearest code vectors (pure lookup, the codebook is never updated here).
    """
    if x.ndim != 5:
        raise ValueError(f"patch_encode expects (B, C, D, H, W), got {tuple(x.shape)}")
    if patch % ae.downsample:
        raise ValueError(f"patch size {patch} must be a multiple of the downsampling factor {ae.downsample}")
    b = x.shape[0]
    g = patch_grid(tuple(x.shape[2:]), patch)
    lp = patch // ae.downsample
    n = b * g[0] * g[1] * g[2]
    chunk = n if not chunk or chunk <= 0 else int(chunk)
    out = None
    coords = [(bi, i, j, k) for bi in range(b) for i in range(g[0]) for j in range(g[1]) for k in range(g[2])]
    for start in range(0, n, chunk):
        sel = coords[start : start + chunk]
        blocks = torch.stack(
            [
                x[
                    bi,
                    :,
                    i * patch : (i + 1) * patch,
                    j * patch : (j + 1) * patch,
                    k * patch : (k + 1) * patch,
                ]
                for bi, i, j, k in sel
            ]
        )
        h = ae.pre_vq_conv(ae.encoder(blocks))
        if quantize:
            h = ae.codebook.lookup(ae.codebook.indices(h))
        if out is None:
            out = h.new_empty(b, h.shape[1], g[0] * lp, g[1] * lp, g[2] * lp)
        for t, (bi, i, j, k) in enumerate(sel):
            out[bi, :, i * lp : (i + 1) * lp, j * lp : (j + 1) * lp, k * lp : (k + 1) * lp] = h[t]
    return out


def decode_latent(
    ae: PatchVolumeAE,
    z: torch.Tensor,
    quantize: bool = True,
    tile: int = 0,
    overlap: float = 0.0,
    sw_batch: int = 1,
) -> torch.Tensor:
    """Decode a latent grid (B, E, d, h, w) → (B, C, d·ds, h·ds, w·ds).

    ``tile=0``: the whole grid at once (the joint decoder of stage 2). ``tile>0, overlap=0``: the official
    ``decode_sliding`` (non-overlapping tiles, each decoded alone; dims must be multiples of ``tile``).
    ``overlap>0``: overlapped tiles blended with Gaussian weights (spec §6.5 fix; MONAI's sliding window,
    ``sw_batch`` tiles per decoder call). Memory is bounded by the tile, not by the latent.
    """
    if z.ndim != 5 or (z.dtype.is_floating_point and z.shape[1] != ae.embedding_dim):
        raise ValueError(f"latent must be (B, {ae.embedding_dim}, d, h, w), got {tuple(z.shape)}")
    if not z.dtype.is_floating_point:
        raise ValueError("decode_latent takes continuous latents; use ae.decode(indices) for code indices")

    def dec(t: torch.Tensor) -> torch.Tensor:
        return ae.decode(t, quantize=True) if quantize else ae.decode_continuous(t)

    if tile <= 0 or all(s <= tile for s in z.shape[2:]):
        return dec(z)
    if overlap <= 0:
        b = z.shape[0]
        g = patch_grid(tuple(z.shape[2:]), tile)
        out = None
        ds = ae.downsample
        for i in range(g[0]):
            for j in range(g[1]):
                for k in range(g[2]):
                    y = dec(
                        z[
                            :,
                            :,
                            i * tile : (i + 1) * tile,
                            j * tile : (j + 1) * tile,
                            k * tile : (k + 1) * tile,
                        ]
                    )
                    if out is None:
                        out = y.new_empty(b, y.shape[1], *(s * ds for s in z.shape[2:]))
                    t = tile * ds
                    out[:, :, i * t : (i + 1) * t, j * t : (j + 1) * t, k * t : (k + 1) * t] = y
        return out
    return _blended_decode(dec, z, tile, overlap, ae.downsample, sw_batch)


def _blended_decode(dec, z: torch.Tensor, tile: int, overlap: float, ds: int, sw_batch: int = 1) -> torch.Tensor:
    """Overlapping latent tiles decoded alone and blended with Gaussian weights (sigma = tile/8), through MONAI's
    ``sliding_window_inference`` (the decoder's ×``ds`` output is its zoomed-output case). A tile never extends
    past the grid: an edge shorter than ``tile`` is one tile, so no zero latents are ever decoded."""
    from monai.inferers import sliding_window_inference

    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = [min(tile, n) for n in z.shape[2:]]
    out = sliding_window_inference(
        z, roi, sw_batch, dec, overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="replicate"
    )
    if tuple(out.shape[2:]) != tuple(n * ds for n in z.shape[2:]):  # the decoder must zoom by exactly ds
        raise ValueError(f"tiled decode gave {tuple(out.shape)} for a latent of {tuple(z.shape)}")
    return torch.as_tensor(out)


@dataclass(frozen=True)
class LatentNorm:
    """``norm(z) = 2(z − lo)/(hi − lo) − 1`` and its inverse, with (lo, hi) = codebook min/max."""

    lo: float
    hi: float

    @classmethod
    def from_codebook(cls, ae: PatchVolumeAE) -> LatentNorm:
        e = ae.codebook.embeddings
        lo, hi = float(e.min()), float(e.max())
        if not hi > lo:
            raise ValueError("codebook has no spread (min == max); is the autoencoder trained?")
        return cls(lo, hi)

    def norm(self, z: torch.Tensor) -> torch.Tensor:
        return 2.0 * (z - self.lo) / (self.hi - self.lo) - 1.0

    def denorm(self, z: torch.Tensor) -> torch.Tensor:
        return (z + 1.0) * 0.5 * (self.hi - self.lo) + self.lo

    @staticmethod
    def range_report(zn: torch.Tensor) -> dict[str, float]:
        """Range of normalised latents; un-quantised ones can leave [-1, 1] (spec §6.6)."""
        return {
            "min": float(zn.min()),
            "max": float(zn.max()),
            "frac_outside": float(((zn < -1) | (zn > 1)).float().mean()),
        }
