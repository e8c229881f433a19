"""2D image files (PNG, TIFF, JPEG, BMP) as cases of a `dataset=nifti` folder, read with MONAI's PILReader.

A 2D image and its label mask have no spacing or orientation: spacing is taken as 1 x 1 and the arrays are
used as MONAI reads them (its PIL reader swaps the first two axes, the same for image and label).
Reading these files needs Pillow (a dependency of matplotlib, so always present with medexp).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def is_2d_file(path: str | Path) -> bool:
    """True for the 2D image formats above (by suffix, case-insensitive)."""
    return str(path).lower().endswith(SUFFIXES_2D)


def read_2d(path: Path) -> np.ndarray:
    """Pixels of a 2D image file as MONAI reads them.

    Returns:
        float32 array (W, H) for grey-level files, (W, H, bands) for colour files.
    """
    from monai.data import PILReader
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(image_only=True, dtype=np.float32)(str(path), reader=PILReader()))
