"""A trained model ready to segment scans: preprocess → sliding window → back to the source grid.

``segment(source)`` runs the three stages in one call. Batch processing calls them one by one so they
can overlap in different threads: :meth:`Segmenter.load` (read + preprocess), :meth:`Segmenter.predict`
(the network, on its device) and :meth:`Segmenter.finish` (probabilities back to the source grid, label
decision, small-component removal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from pipeline.config import Config
from pipeline.infer.sliding import predict_logits
from pipeline.io.geometry import voxel_volume_mm3
from pipeline.model import build_model
from pipeline.model.checkpoint import load_checkpoint
from pipeline.postprocess import ToSourceGrid, remove_small_components
from pipeline.runtime import resolve_device
from pipeline.transforms.preprocess import preprocess_transforms

log = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """A label map in the exact grid of its source scan."""

    labels: np.ndarray  # uint8, the source's spatial shape
    affine: np.ndarray  # the source's RAS affine
    source: str
    source_format: str  # nifti | dicom | itk
    # P(any lesion class) per voxel, float16, the source grid: for per-lesion confidence
    foreground: Optional[np.ndarray] = None
    # the scan's intensities as read (HU for CT), float32, the source grid: for statistics and QC pictures
    image: Optional[np.ndarray] = None


@dataclass
class Prepared:
    """A scan read and preprocessed: what :meth:`Segmenter.predict` and :meth:`Segmenter.finish` need."""

    image: torch.Tensor  # the preprocessed MetaTensor (1, *spatial), with its recorded transforms
    source_image: np.ndarray  # float32 [i, j, k] intensities as read, the source grid
    source: str


class Segmenter:
    """Holds one network and its config; ``segment(source)`` returns a :class:`Segmentation`.

    The network may be any module mapping (B, 1, *roi) to (B, C, *roi'), so tests can pass a model
    whose output is known.
    """

    def __init__(self, network: torch.nn.Module, config: Config, device: Union[str, torch.device] = "auto",
                 model_sha256: str = ""):
        self.config = config
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.network = network.to(self.device).eval()
        self.model_sha256 = model_sha256
        self.preprocess = preprocess_transforms(config.preprocess)
        self.to_source = ToSourceGrid(self.preprocess)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto") -> "Segmenter":
        ckpt = load_checkpoint(path)
        config = ckpt.config
        network = build_model(config.model, in_channels=1, out_channels=config.num_classes)
        network.load_state_dict(ckpt.state_dict)
        return cls(network, config, device=device, model_sha256=ckpt.sha256)

    def probabilities(self, image: torch.Tensor, progress=None) -> torch.Tensor:
        """Class probabilities (C, *spatial) for a preprocessed image (1, *spatial).

        ``progress``: an optional callable called once per network forward (sliding-window batch).
        """
        def tick(*_) -> None:  # a forward hook must return None, or its value replaces the output
            progress()

        hook = self.network.register_forward_hook(tick) if progress is not None else None
        try:
            logits = predict_logits(self.network, image, self.config.inference, self.config.model.spatial_dims)
        finally:
            if hook is not None:
                hook.remove()
        return torch.softmax(logits.float(), dim=0)

    def load(self, source) -> Prepared:
        """Read and preprocess ``source``: a path, a list of DICOM files, or a case's ``reader_input``."""
        loaded = self.preprocess({"image": source}, end=1)  # the reader only: intensities on the source grid
        # A copy: later steps (z-score normalisation) may work in place on the loaded tensor.
        source_image = np.array(loaded["image"].as_tensor()[0].numpy(), dtype=np.float32, copy=True)
        data = self.preprocess(loaded, start=1)
        image = data["image"]
        return Prepared(image=image, source_image=source_image,
                        source=str(image.meta.get("filename_or_obj", source)))

    def predict(self, prepared: Prepared, progress=None) -> torch.Tensor:
        """Class probabilities on the preprocessed grid, on the CPU."""
        return self.probabilities(prepared.image, progress=progress).cpu()

    def finish(self, probs: torch.Tensor, prepared: Prepared) -> Segmentation:
        """Labels (and lesion probability) on the source grid from ``predict``'s probabilities.

        Binary models map only the lesion probability back (half the work of both classes: linear
        interpolation keeps them summing to one, so lesion where it is > 0.5, or >= the threshold).
        """
        image = prepared.image
        if probs.shape[0] == 2:
            foreground = self.to_source(probs[1:2], image)[0]
            labels = self.decide_lesion(foreground)
        else:
            source_probs = self.to_source(probs, image)
            labels = self.decide(source_probs)
            foreground = source_probs[1:].sum(dim=0)
            del source_probs
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        min_mm3 = self.config.inference.min_component_mm3
        if min_mm3 > 0:
            labels = remove_small_components(labels, min_mm3 / voxel_volume_mm3(affine))
        return Segmentation(
            labels=labels,
            affine=affine,
            source=prepared.source,
            source_format=str(image.meta.get("source_format", "")),
            foreground=foreground.numpy().astype(np.float16),
            image=prepared.source_image,
        )

    def segment(self, source: Union[str, list[str]]) -> Segmentation:
        prepared = self.load(source)
        return self.finish(self.predict(prepared), prepared)

    def decide(self, probs: torch.Tensor) -> np.ndarray:
        """Label map from class probabilities (C, *spatial): binary models via :meth:`decide_lesion`, else argmax."""
        if probs.shape[0] == 2:
            return self.decide_lesion(probs[1])
        return probs.argmax(dim=0).numpy().astype(np.uint8)

    def decide_lesion(self, lesion_probability: torch.Tensor) -> np.ndarray:
        """Binary models: lesion where p >= ``inference.threshold``, or p > 0.5 (argmax) when it is null."""
        threshold = self.config.inference.threshold
        mask = lesion_probability >= threshold if threshold is not None else lesion_probability > 0.5
        return mask.numpy().astype(np.uint8)

    def tile_batches(self, prepared: Prepared) -> Optional[int]:
        """How many network forwards :meth:`predict` makes for ``prepared`` (for progress bars), if known."""
        try:
            margin_fn = getattr(self.network, "margin", None)
            if margin_fn is not None and any(margin_fn(tuple(self.config.inference.roi_size))):
                return None  # valid-padding networks tile a padded volume
            from monai.data.utils import dense_patch_slices
            from monai.inferers.utils import _get_scan_interval

            cfg = self.config.inference
            roi = list(cfg.roi_size) + ([1] if self.config.model.spatial_dims == 2 else [])
            size = [max(int(s), r) for s, r in zip(prepared.image.shape[1:], roi)]
            interval = _get_scan_interval(size, roi, len(roi), [cfg.overlap] * len(roi))
            windows = len(dense_patch_slices(size, roi, interval))
            return -(-windows // cfg.sw_batch_size)
        except Exception:  # a private MONAI helper moved: progress without a total
            return None
