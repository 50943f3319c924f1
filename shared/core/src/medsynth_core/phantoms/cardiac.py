"""Cardiac cine: an analytic beating heart, its short-axis stack and long-axis planes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsynth_core.phantoms._common import _rician

# ----------------------------------------------------------------------------------------------------------
# (c) cardiac cine: analytic beating heart, short-axis stack and long-axis planes
# ----------------------------------------------------------------------------------------------------------
_LAX_ANGLES = {"2ch": 90.0, "3ch": 45.0, "4ch": 0.0}  # rotation about the long axis, from the RV direction


@dataclass(frozen=True, eq=False)
class CardiacScene:
    """Analytic beating-heart scene in world coordinates (mm).

    The heart frame has origin ``origin`` (centre of the LV base plane) and orthonormal columns of ``axes``:
    ``e1`` points from the LV axis towards the RV, ``e2 = e3 x e1``, ``e3`` is the long axis from base to
    apex. In local coordinates ``(a, b, l)`` (along e1, e2, e3) the LV blood pool and epicardium are
    half-ellipsoids (``l >= 0``), the RV blood pool is an ellipsoid centred at ``a = rv_offset`` minus the LV.
    Contraction ``s(frame) = (1 - cos(2 pi frame / n_frames)) / 2`` is 0 at end-diastole (frame 0) and 1 at
    end-systole (frame ``n_frames / 2``); radii and lengths shrink with ``s`` while myocardial
    cross-sectional area is conserved (wall thickening).

    Attributes:
        origin: (3,) world position of the LV base centre, mm.
        axes: (3, 3) rotation, columns e1, e2, e3 in world coordinates.
        n_frames: frames per cardiac cycle.
        endo_radius, epi_radius: LV endocardial / epicardial radius at the base at end-diastole, mm.
        endo_length, epi_length: LV endocardial / epicardial base-to-apex length at end-diastole, mm.
        rv_offset: RV centre along e1, mm; rv_radii: RV semi-axes along (e1, e2), mm; rv_length: along e3.
        radial_contraction, long_contraction, rv_contraction: fractional shortening at end-systole.
        intensities: (background, LV blood, myocardium, RV blood) base intensities.
        wave_vectors: (M, 3) rad/mm, wave_phases: (M,) - smooth analytic texture sum_m sin(k_m . p + phi_m).
    """

    origin: np.ndarray
    axes: np.ndarray
    n_frames: int
    endo_radius: float
    epi_radius: float
    endo_length: float
    epi_length: float
    rv_offset: float
    rv_radii: tuple[float, float]
    rv_length: float
    radial_contraction: float
    long_contraction: float
    rv_contraction: float
    intensities: tuple[float, float, float, float]
    wave_vectors: np.ndarray
    wave_phases: np.ndarray

    def contraction(self, frame: float) -> float:
        """Contraction state in [0, 1] at ``frame`` (0 at ED, 1 at ES)."""
        return 0.5 * (1.0 - math.cos(2.0 * math.pi * float(frame) / self.n_frames))

    def to_local(self, points_world) -> np.ndarray:
        """World points ``(..., 3)`` -> heart-frame coordinates ``(..., 3)`` = (a, b, l) in mm."""
        return (np.asarray(points_world, dtype=np.float64) - self.origin) @ self.axes

    def sample_scene(self, points_world, frame: float) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the scene at world points ``(..., 3)`` (mm) and ``frame``.

        Returns ``(intensity float32 (...) in [0, 1], label uint8 (...))`` with labels 0 background,
        1 LV blood pool, 2 myocardium, 3 RV blood pool.
        """
        pts = np.asarray(points_world, dtype=np.float64)
        local = self.to_local(pts)
        a, b, ax_l = local[..., 0], local[..., 1], local[..., 2]
        s = self.contraction(frame)
        ri = self.endo_radius * (1.0 - self.radial_contraction * s)
        ro = math.sqrt(ri**2 + self.epi_radius**2 - self.endo_radius**2)
        lo = self.epi_length * (1.0 - self.long_contraction * s)
        li = lo - (self.epi_length - self.endo_length) * (1.0 + 0.3 * s)
        rv_s = 1.0 - self.rv_contraction * s
        base = ax_l >= 0
        ab2 = a * a + b * b
        endo = base & (ab2 / ri**2 + (ax_l / li) ** 2 <= 1)
        epi = base & (ab2 / ro**2 + (ax_l / lo) ** 2 <= 1)
        rv = ((a - self.rv_offset) / (self.rv_radii[0] * rv_s)) ** 2 + (
            b / (self.rv_radii[1] * rv_s)
        ) ** 2 + (ax_l / (self.rv_length * (1.0 - self.long_contraction * s))) ** 2 <= 1
        rv &= base & ~epi
        label = np.where(endo, 1, np.where(epi, 2, np.where(rv, 3, 0))).astype(np.uint8)
        tex = np.sin(pts @ self.wave_vectors.T + self.wave_phases).sum(-1) * math.sqrt(
            2.0 / len(self.wave_phases)
        )
        base_i = np.asarray(self.intensities, dtype=np.float64)[label]
        gain = np.where(label == 0, 0.25, 0.06)
        intensity = np.clip(base_i * (1.0 + gain * tex), 0.0, 1.0).astype(np.float32)
        return intensity, label

    __call__ = sample_scene


@dataclass(frozen=True, eq=False)
class LaxPlane:
    """One long-axis cine plane.

    Attributes:
        image: float32 ``(T, H, W)`` in [0, 1].
        labels: uint8 ``(T, H, W)`` (0 bg, 1 LV blood pool, 2 myocardium, 3 RV blood pool).
        affine: (4, 4) float64 mapping ``(r, c, 0, 1)`` (row, column, out-of-plane) to world mm; column 0 is
            the long axis (base at the top rows), column 1 the in-plane direction, column 2 the unit normal
            scaled by the pixel spacing (so the matrix is invertible).
        view: "2ch", "3ch" or "4ch".
        angle_deg: rotation of the plane about the long axis, measured from the RV direction e1.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    view: str
    angle_deg: float


@dataclass(frozen=True, eq=False)
class CardiacPhantom:
    """Beating-heart cine phantom; SAX and LAX images are point samples of the same :class:`CardiacScene`.

    Attributes:
        sax: float32 ``(T, S, H, W)`` short-axis cine stack in [0, 1] (frames, slices, rows, columns).
        sax_labels: uint8 ``(T, S, H, W)`` (0 bg, 1 LV blood pool, 2 myocardium, 3 RV blood pool).
        sax_affine: (4, 4) float64 mapping the voxel index ``(s, h, w, 1)`` - in array order, slice first,
            unlike NIfTI's (i, j, k) = (column, row, slice) - to world mm. Slices run base to apex along the
            long axis; the RV appears on the image left.
        lax: view name ("2ch", "3ch", "4ch") -> :class:`LaxPlane`.
        scene: the analytic scene; ``scene.sample_scene(points, frame)`` (or ``scene(points, frame)``).
        pixel_spacing: in-plane pixel size, mm (SAX and LAX).
        slice_spacing: SAX slice distance, mm.
        ed_frame: end-diastolic frame (0); es_frame: end-systolic frame (``n_frames // 2``).
        supersample: in-plane sub-samples per pixel axis the images were rendered with (1: point samples).
    """

    sax: np.ndarray
    sax_labels: np.ndarray
    sax_affine: np.ndarray
    lax: dict[str, LaxPlane]
    scene: CardiacScene
    pixel_spacing: float
    slice_spacing: float
    ed_frame: int
    es_frame: int
    supersample: int = 1

    def sample_scene(self, points_world, frame: float) -> tuple[np.ndarray, np.ndarray]:
        """Shortcut for ``self.scene.sample_scene(points_world, frame)``."""
        return self.scene.sample_scene(points_world, frame)


def render_grid(
    scene: CardiacScene,
    affine: np.ndarray,
    shape: tuple[int, ...],
    frame: float,
    supersample: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels of ``scene`` on a grid (index order = array order, ``affine`` maps the index to world
    mm) at ``frame``.

    ``supersample = s > 1`` averages the intensity over an ``s x s`` lattice of points inside each pixel's
    footprint along the last two (in-plane) index axes, a box point-spread function like the finite in-plane
    resolution of an MR image, so edges are partial-volume blends instead of point samples; the slice axis
    (a 3D grid's first) stays a point sample. Labels are always those of the pixel centre. ``s = 1``: every
    pixel is ``scene.sample_scene`` at ``affine @ index``.
    """
    nd = len(shape)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, nd)
    idx3 = np.zeros((idx.shape[0], 3))
    idx3[:, :nd] = idx
    pts = idx3 @ affine[:3, :3].T + affine[:3, 3]
    img, lab = scene.sample_scene(pts, frame)
    if supersample > 1:
        offs = (np.arange(supersample) + 0.5) / supersample - 0.5
        acc = np.zeros(idx.shape[0], dtype=np.float64)
        for du in offs:
            for dv in offs:
                d = np.zeros(3)
                d[nd - 2], d[nd - 1] = du, dv
                acc += scene.sample_scene(pts + affine[:3, :3] @ d, frame)[0]
        img = (acc / supersample**2).astype(np.float32)
    return img.reshape(shape), lab.reshape(shape)


def _render(
    scene: CardiacScene,
    affine: np.ndarray,
    shape: tuple[int, ...],
    n_frames: int,
    noise: float,
    rng,
    supersample: int = 1,
):
    """:func:`render_grid` for every frame, with optional Rician noise."""
    imgs, labs = [], []
    for t in range(n_frames):
        img, lab = render_grid(scene, affine, shape, t, supersample)
        if noise > 0:
            img = np.clip(_rician(img.astype(np.float64), noise, rng), 0.0, 1.0).astype(np.float32)
        imgs.append(img)
        labs.append(lab)
    return np.stack(imgs), np.stack(labs)


def cardiac_cine(
    n_frames: int = 4,
    n_slices: int = 8,
    size: int = 32,
    slice_spacing: float = 8.0,
    pixel_spacing: float = 1.5,
    seed: int = 0,
    lax_size: int | tuple[int, int] | None = None,
    noise: float = 0.0,
    slice_offset: float = 0.0,
    supersample: int = 1,
) -> CardiacPhantom:
    """Beating-heart cine phantom: short-axis stack plus 2ch/3ch/4ch long-axis planes.

    An obliquely oriented (seeded) heart with a half-ellipsoidal LV (blood pool + myocardial shell) and a
    crescent RV wrapped around the septal side. The anatomy is scaled to fit both the in-plane field of view
    ``size * pixel_spacing`` and the stack extent ``n_slices * slice_spacing`` with a realistic length/width
    ratio (apical slices may lie beyond the apex). SAX slices sit at ``l = (s + 1/2) * slice_spacing`` from
    the base; LAX planes contain the long axis (4ch through both
    ventricles, 2ch through the LV only, 3ch in between). ``lax_size`` is the LAX image size (int for
    square, or (H, W)); by default it is square and large enough for 1.2 times the stack extent. With
    ``noise=0`` every pixel equals ``scene.sample_scene`` at ``affine @ index``. ``slice_offset`` (mm) shifts
    the SAX stack along the long axis, to ``l = (s + 1/2) * slice_spacing + slice_offset`` (a negative offset
    puts the base plane, where the ventricles end, between two acquired slices); the anatomy and the LAX
    planes do not move. ``supersample`` (see :func:`render_grid`) renders SAX and LAX pixels as averages over
    their in-plane footprint (partial volume); render a ground truth on another grid the same way with
    ``render_grid(ph.scene, affine, shape, frame, ph.supersample)``.
    """
    if n_frames < 1 or n_slices < 1 or size < 8:
        raise ValueError(f"need n_frames >= 1, n_slices >= 1, size >= 8; got {n_frames}, {n_slices}, {size}")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    rng = np.random.default_rng(seed)
    fov = size * pixel_spacing
    extent = n_slices * slice_spacing
    e3 = np.array([0.55, -0.45, -0.7]) + rng.normal(0.0, 0.08, 3)
    e3 /= np.linalg.norm(e3)
    ref = np.array([0.0, 0.0, 1.0])
    e1 = ref - (ref @ e3) * e3
    e1 /= np.linalg.norm(e1)
    psi = rng.uniform(-0.3, 0.3)
    e1 = math.cos(psi) * e1 + math.sin(psi) * np.cross(e3, e1)
    e2 = np.cross(e3, e1)
    axes = np.stack([e1, e2, e3], axis=1)
    origin = np.array([10.0, -15.0, 25.0]) + rng.normal(0.0, 3.0, 3)
    epi_r = min(0.25 * fov, extent / 3.5) * rng.uniform(0.95, 1.0)
    endo_r = epi_r * rng.uniform(0.6, 0.65)
    epi_l = min(extent - 0.3 * slice_spacing, 4.2 * epi_r)  # realistic length / width ratio
    n_waves = 6
    k_dir = rng.normal(size=(n_waves, 3))
    k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
    scene = CardiacScene(
        origin=origin,
        axes=axes,
        n_frames=int(n_frames),
        endo_radius=float(endo_r),
        epi_radius=float(epi_r),
        endo_length=float(epi_l - 0.8 * (epi_r - endo_r)),
        epi_length=float(epi_l),
        rv_offset=float(0.95 * epi_r),
        rv_radii=(float(0.85 * epi_r), float(1.45 * epi_r * rng.uniform(0.95, 1.05))),
        rv_length=float(0.8 * epi_l),
        radial_contraction=0.22,
        long_contraction=0.12,
        rv_contraction=0.2,
        intensities=(0.12, 0.9, 0.32, 0.82),
        wave_vectors=k_dir * (2.0 * math.pi / rng.uniform(15.0, 30.0, (n_waves, 1))),
        wave_phases=rng.uniform(0.0, 2.0 * math.pi, n_waves),
    )
    shift = 0.4 * epi_r  # centre the field of view between LV and RV

    row_dir, col_dir = e2, -e1  # RV (towards +e1) on the image left
    centre = origin + (0.5 * slice_spacing + float(slice_offset)) * e3 + shift * e1
    sax_affine = np.eye(4)
    sax_affine[:3, 0] = slice_spacing * e3
    sax_affine[:3, 1] = pixel_spacing * row_dir
    sax_affine[:3, 2] = pixel_spacing * col_dir
    sax_affine[:3, 3] = centre - (size - 1) / 2 * pixel_spacing * (row_dir + col_dir)
    sax, sax_labels = _render(
        scene, sax_affine, (n_slices, size, size), n_frames, noise, rng, int(supersample)
    )

    if lax_size is None:
        side = max(size, math.ceil(1.2 * extent / pixel_spacing))
        lax_hw = (side, side)
    elif isinstance(lax_size, int):
        lax_hw = (lax_size, lax_size)
    else:
        lax_hw = (int(lax_size[0]), int(lax_size[1]))
    lax = {}
    for view, ang in _LAX_ANGLES.items():
        th = math.radians(ang)
        v = math.cos(th) * e1 + math.sin(th) * e2
        normal = np.cross(e3, v)
        c = origin + 0.5 * extent * e3 + shift * math.cos(th) * v
        aff = np.eye(4)
        aff[:3, 0] = pixel_spacing * e3
        aff[:3, 1] = pixel_spacing * v
        aff[:3, 2] = pixel_spacing * normal
        aff[:3, 3] = c - (lax_hw[0] - 1) / 2 * pixel_spacing * e3 - (lax_hw[1] - 1) / 2 * pixel_spacing * v
        img, lab = _render(scene, aff, lax_hw, n_frames, noise, rng, int(supersample))
        lax[view] = LaxPlane(img, lab, aff, view, ang)
    return CardiacPhantom(
        sax=sax,
        sax_labels=sax_labels,
        sax_affine=sax_affine,
        lax=lax,
        scene=scene,
        pixel_spacing=float(pixel_spacing),
        slice_spacing=float(slice_spacing),
        ed_frame=0,
        es_frame=int(n_frames) // 2,
        supersample=int(supersample),
    )
