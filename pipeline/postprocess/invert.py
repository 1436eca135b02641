"""Map predictions from the preprocessed grid back to the source scan's grid.

The spatial preprocessing steps (orientation, resampling, foreground crop) are recorded on the image's
MetaTensor; MONAI's ``Invertd`` replays them backwards on the class probabilities (linear
interpolation), and the label decision is taken afterwards in the source grid, as nnU-Net does.

This is the fallback: masks normally go back through :mod:`pipeline.postprocess.resample` (separable
interpolation, slab by slab, the same rules), and this module serves a preprocessing whose mapping is
not axis-aligned, at the cost of every class at full source resolution.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd


class ToSourceGrid:
    """Invert ``preprocess`` for a prediction made on ``image`` (the preprocessed MetaTensor)."""

    def __init__(self, preprocess: Compose, image_key: str = "image"):
        self.image_key = image_key
        self._invert = Invertd(
            keys="pred",
            transform=preprocess,
            orig_keys=image_key,
            nearest_interp=False,
            to_tensor=True,
        )

    def __call__(self, prediction: torch.Tensor, image: MetaTensor) -> torch.Tensor:
        """``prediction`` (C, *spatial of image) → (C, *source spatial shape), float."""
        pred = MetaTensor(prediction, affine=image.affine, meta=dict(image.meta))
        pred.applied_operations = list(image.applied_operations)
        out = self._invert({"pred": pred, self.image_key: image})["pred"]
        return out.as_tensor() if isinstance(out, MetaTensor) else out
