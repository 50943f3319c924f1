"""Deterministic synthetic phantoms that stand in for real medical data in demos and tests.

Every generator takes a ``seed``, draws from its own ``np.random.default_rng`` (never the global RNG), is
fully vectorised and returns ``float32`` images inside a small frozen dataclass. The same seed gives
bit-identical arrays; a different seed gives different anatomy.

Axis order follows torch / SimpleITK arrays: volumes are ``(D, H, W)`` (slice, row, column) and slices are
``(H, W)``; leading batch-like axes (samples, phases, frames) come first.

Families (one module each under ``medsynth_core.phantoms``):

* :func:`contrast_phase_slices` - paired multi-phase contrast-enhanced abdominal axial slices.
* :func:`brain_volumes` - multi-contrast brain MR volumes from T1/T2/PD maps plus thick-slice versions.
* :func:`cardiac_cine` - beating short-axis cine stack and long-axis planes sampled from one analytic scene.
* :func:`labelled_anatomy` - 2D/3D image with smooth nested/adjacent labelled structures.
* :func:`classed_volumes` - small CT/MR-like volumes whose class (body region / modality) is visible.
"""

from medsynth_core.phantoms._common import smooth_noise
from medsynth_core.phantoms.abdomen import (
    ABDOMEN_TISSUES,
    ENHANCEMENT_HU,
    PHASE_NAMES,
    PhaseSlices,
    contrast_phase_slices,
)
from medsynth_core.phantoms.brain import (
    BRAIN_SEQUENCES,
    BRAIN_TISSUE_PARAMS,
    BrainPhantom,
    brain_volumes,
    inversion_recovery_signal,
    spin_echo_signal,
    thick_slices,
    upsample_slices,
)
from medsynth_core.phantoms.cardiac import CardiacPhantom, CardiacScene, LaxPlane, cardiac_cine
from medsynth_core.phantoms.classed import CLASS_NAMES, ClassedVolumes, classed_volumes
from medsynth_core.phantoms.labelled import LabelledImage, labelled_anatomy

__all__ = [
    "ABDOMEN_TISSUES",
    "BRAIN_SEQUENCES",
    "BRAIN_TISSUE_PARAMS",
    "CLASS_NAMES",
    "ENHANCEMENT_HU",
    "PHASE_NAMES",
    "BrainPhantom",
    "CardiacPhantom",
    "CardiacScene",
    "ClassedVolumes",
    "LabelledImage",
    "LaxPlane",
    "PhaseSlices",
    "brain_volumes",
    "cardiac_cine",
    "classed_volumes",
    "contrast_phase_slices",
    "inversion_recovery_signal",
    "labelled_anatomy",
    "smooth_noise",
    "spin_echo_signal",
    "thick_slices",
    "upsample_slices",
]
