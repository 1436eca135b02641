"""A trained model ready to segment scans: preprocess → sliding window → back to the source grid."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

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

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, *spatial) for a preprocessed image (1, *spatial)."""
        logits = predict_logits(self.network, image, self.config.inference, self.config.model.spatial_dims)
        return torch.softmax(logits.float(), dim=0)

    def segment(self, source: Union[str, list[str]]) -> Segmentation:
        data = self.preprocess({"image": source})
        image = data["image"]
        probs = self.probabilities(image).cpu()
        probs = self.to_source(probs, image)
        labels = self.decide(probs)
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        min_mm3 = self.config.inference.min_component_mm3
        if min_mm3 > 0:
            labels = remove_small_components(labels, min_mm3 / voxel_volume_mm3(affine))
        return Segmentation(
            labels=labels,
            affine=affine,
            source=str(image.meta.get("filename_or_obj", source)),
            source_format=str(image.meta.get("source_format", "")),
        )

    def decide(self, probs: torch.Tensor) -> np.ndarray:
        """Label map from probabilities: a threshold for binary models when configured, else argmax."""
        threshold = self.config.inference.threshold
        if threshold is not None and probs.shape[0] == 2:
            labels = probs[1] >= threshold
        else:
            labels = probs.argmax(dim=0)
        return labels.numpy().astype(np.uint8)
