"""Medical image IO: NIfTI, NRRD/MHA/MHD, DICOM series, HDF5 and LMDB array stores.

Conventions
-----------
* :class:`MedicalImage` keeps the voxel array in **disk index order** ``(i, j, k[, t])`` exactly as
  nibabel returns it (2D images are ``(i, j)``), together with a 4x4 float64 **RAS+** affine that maps
  voxel indices to world millimetres (the nibabel convention; 2D images also carry a 4x4 affine).
* :meth:`MedicalImage.to_dhw` gives the reversed axis order ``(k, j, i)`` used by torch and by
  ``SimpleITK.GetArrayFromImage``.
* SimpleITK geometry is LPS: ``world_LPS = origin + Direction @ diag(spacing) @ index`` and
  ``RAS = diag(-1, -1, 1) @ LPS``; conversions in both directions live in :func:`to_sitk` and
  :func:`from_sitk`.
* Every file written by this module is written atomically (temporary file in the destination folder,
  then :func:`os.replace`), so a crash never leaves a half-written file at the destination.
* Every error raised for a bad file is a :class:`MedicalIOError` naming the file, what is wrong and how
  to fix it.
"""


from medsynth_core.io.files import list_images, read_image, verify_file_complete, write_image
from medsynth_core.io.geometry import (
    reorient_to_canonical,
    resample_to_reference,
    resample_to_shape,
    resample_to_spacing,
)
from medsynth_core.io.image import DEFAULT_IMAGE_PATTERNS, MedicalImage, MedicalIOError, from_sitk, to_sitk
from medsynth_core.io.intensity import minmax_to_range, percentile_clip, warn_if_constant, window, zscore
from medsynth_core.io.stores import H5ArrayReader, LMDBArrayReader, LMDBArrayWriter, write_h5

__all__ = [
    "MedicalIOError",
    "MedicalImage",
    "read_image",
    "verify_file_complete",
    "write_image",
    "to_sitk",
    "from_sitk",
    "reorient_to_canonical",
    "resample_to_spacing",
    "resample_to_shape",
    "resample_to_reference",
    "minmax_to_range",
    "percentile_clip",
    "zscore",
    "warn_if_constant",
    "window",
    "list_images",
    "DEFAULT_IMAGE_PATTERNS",
    "write_h5",
    "H5ArrayReader",
    "LMDBArrayWriter",
    "LMDBArrayReader",
]
