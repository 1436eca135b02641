"""A NumPy view of a SimpleITK image's pixels that keeps the image alive (no copy).

``sitk.GetArrayFromImage`` copies the pixel buffer (~0.1 s for a 512x512x400 CT); ``GetArrayViewFromImage``
does not, but the view dangles (and crashes the process) once the image is garbage collected. The view
returned here holds a reference to the image through its ``base``.
"""

from __future__ import annotations

import numpy as np


class _Buffer:
    def __init__(self, image, sitk):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def array_view(image) -> np.ndarray:
    """The pixels of ``image`` as SimpleITK orders them ([k, j, i]), sharing its memory."""
    import SimpleITK as sitk

    return np.asarray(_Buffer(image, sitk))
