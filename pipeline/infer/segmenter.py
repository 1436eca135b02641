"""A trained model ready to segment scans: preprocess → sliding window → back to the source grid.

``segment(source)`` runs the three stages in one call. Batch processing calls them one by one so they
can overlap in different threads: :meth:`Segmenter.load` (read + preprocess), :meth:`Segmenter.predict`
(the network, on its device) and :meth:`Segmenter.finish` (probabilities back to the source grid, label
decision, small-component removal). Several networks (an ensemble, :meth:`Segmenter.from_checkpoints`)
and test-time mirroring (``inference.tta``) average their softmax probabilities window batch by window
batch (:mod:`pipeline.infer.ensemble`). How each network runs is :class:`~pipeline.infer.runner.NetworkRunner`'s;
what becomes of each finished slab of windows, :class:`~pipeline.infer.accumulate.SlabAccumulator`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from pipeline.config import Config
from pipeline.infer.accumulate import SlabAccumulator
from pipeline.infer.ensemble import (
    averaged_probabilities,
    check_compatible,
    checkpoint_paths,
    ensemble_identity,
    mirror_flips,
    tta_label,
)
from pipeline.infer.runner import NetworkRunner
from pipeline.infer.sliding import predict_logits, window_forward
from pipeline.infer.stream import StreamStats, stream_windows
from pipeline.model import build_model
from pipeline.model.checkpoint import load_checkpoint
from pipeline.postprocess import ToSourceGrid
from pipeline.postprocess.resample import axis_map, crop_box, to_source_slabs
from pipeline.postprocess.rules import apply_postprocessing
from pipeline.runtime import resolve_device
from pipeline.transforms.preprocess import LEAN_READ_STEPS, oriented_as_read, preprocess_transforms


@dataclass
class Segmentation:
    """A label map in the exact grid of its source scan."""

    labels: np.ndarray  # uint8, the source's spatial shape
    affine: np.ndarray  # the source's RAS affine
    source: str
    source_format: str  # nifti | dicom | itk
    # P(any lesion class) per voxel, float16, the source grid: for per-lesion confidence
    foreground: Optional[np.ndarray] = None
    # the scan's intensities as read (HU for CT, the file's dtype), the source grid: for statistics and QC
    image: Optional[np.ndarray] = None
    # many-class models, when asked (predict(class_probabilities=True)): every class's probability,
    # float16, (I, J, K, classes) on the source grid
    class_probabilities: Optional[np.ndarray] = None


@dataclass
class Prepared:
    """A scan read and preprocessed: what :meth:`Segmenter.predict` and :meth:`Segmenter.finish` need."""

    image: torch.Tensor  # the preprocessed MetaTensor (channels, *spatial), with its recorded transforms
    source_image: np.ndarray  # [i, j, k] intensities as read (the file's dtype), the source grid
    source: str


@dataclass
class Prediction:
    """Probabilities on the preprocessed grid, as :meth:`Segmenter.predict` leaves them for :meth:`finish`."""

    # float16 (1, *preprocessed grid), CPU: binary models, P(lesion); others, P(any class but background)
    probs: torch.Tensor
    binary: bool
    # many-class models: uint8 (1, *preprocessed grid), the argmax taken slab by slab as the windows finish
    # (memory does not grow with the classes); binary models: None (decided on the source grid)
    labels: Optional[torch.Tensor] = None
    # many-class models asked for it: float16 (classes, *preprocessed grid), every class's probability
    class_probs: Optional[torch.Tensor] = None
    windows: int = 0  # windows that ran
    forwards: int = 0  # network calls
    network_seconds: float = 0.0
    skipped: int = 0  # windows left out (inference.skip_empty, inference.cascade)
    coarse_windows: int = 0  # inference.cascade: windows of the coarse pass (counted in windows too)


class Segmenter:
    """Holds one network and its config; ``segment(source)`` returns a :class:`Segmentation`.

    The network may be any module mapping (B, channels, *roi) to (B, C, *roi'), so tests can pass a model
    whose output is known. How it runs (``inference.backend``, ``inference.amp``, the CPU-fused copy
    of our U-Net) is settled at the first prediction by its :attr:`runner`; see :meth:`forward`.

    ``members``: more networks (with their checkpoint sha256s) of an ensemble, run with ``config``'s
    inference settings; :attr:`runners` holds one runner per network, :attr:`model_sha256s` their sha256s
    in order, and :attr:`model_sha256` is the ensemble's identity (:func:`ensemble_identity`).
    """

    def __init__(self, network: torch.nn.Module, config: Config, device: Union[str, torch.device] = "auto",
                 model_sha256: str = "", backend: Optional[str] = None,
                 members: Sequence[tuple[torch.nn.Module, str]] = ()):
        self.config = config
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.network = network.to(self.device).eval()
        self.runner = NetworkRunner(self.network, config, self.device, model_sha256, backend)
        self.runners = [self.runner] + [NetworkRunner(net.to(self.device).eval(), config, self.device, sha, backend)
                                        for net, sha in members]
        self.model_sha256s = [model_sha256] + [sha for _, sha in members]
        self.model_sha256 = ensemble_identity(self.model_sha256s) if all(self.model_sha256s) else model_sha256
        self.model_paths: list[str] = []  # the checkpoints, when loaded from files
        # lean: reoriented in the file's dtype, low-pass in place (the same values, a float32 copy less)
        self.preprocess = preprocess_transforms(config.preprocess, channels=config.data.channels, lean=True)
        self.to_source = ToSourceGrid(self.preprocess)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", backend: Optional[str] = None) -> Segmenter:
        ckpt = load_checkpoint(path)
        config = ckpt.config
        network = build_model(config.model, in_channels=config.in_channels, out_channels=config.num_classes)
        network.load_state_dict(ckpt.state_dict)
        return cls(network, config, device=device, model_sha256=ckpt.sha256, backend=backend)

    @classmethod
    def from_checkpoints(cls, model, device: str = "auto", backend: Optional[str] = None,
                         tta: Optional[str] = None) -> Segmenter:
        """One segmenter for several checkpoints (an ensemble) or a training folder
        (:func:`~pipeline.infer.ensemble.checkpoint_paths`); one checkpoint is :meth:`from_checkpoint`'s.

        The models must agree on preprocessing, labels, channels, spatial dims and window
        (:func:`~pipeline.infer.ensemble.check_compatible`); the first one's inference settings are used.
        ``tta``: ``none | mirror``, replacing the models' ``inference.tta``.
        """
        from dataclasses import replace

        paths = checkpoint_paths(model)
        checkpoints = [load_checkpoint(path) for path in paths]
        check_compatible([c.config for c in checkpoints], [str(p) for p in paths])
        config = checkpoints[0].config
        if tta is not None:
            config = replace(config, inference=replace(config.inference, tta=tta))
            config.inference._check()
        networks = []
        for ckpt in checkpoints:
            network = build_model(ckpt.config.model, in_channels=config.in_channels,
                                  out_channels=config.num_classes)
            network.load_state_dict(ckpt.state_dict)
            networks.append((network, ckpt.sha256))
        segmenter = cls(networks[0][0], config, device=device, model_sha256=networks[0][1], backend=backend,
                        members=networks[1:])
        segmenter.model_paths = [str(p) for p in paths]
        return segmenter

    @property
    def tta(self) -> str:
        """The test-time augmentation: ``none``, ``mirror`` or ``mirror:AXES`` (:func:`tta_label`)."""
        return tta_label(self.config.inference.tta, self.config.inference.tta_axes)

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [runner.network for runner in self.runners]

    # --- how the network runs: the runner's -----------------------------------------------------

    @property
    def backend(self) -> Optional[str]:
        """torch | onnxruntime, once chosen (at the first prediction)."""
        return self.runner.backend

    @property
    def backend_requested(self) -> str:
        return self.runner.backend_requested

    @property
    def window_batch(self) -> int:
        """Windows per network call (:attr:`NetworkRunner.window_batch`)."""
        return self.runner.window_batch

    def forward(self, image: Optional[torch.Tensor] = None):
        """The callable that maps a batch of windows to logits (:meth:`NetworkRunner.forward`; ``image``: the
        case about to be segmented, for calibration windows)."""
        return self.runner.forward(image)

    # --- the stages -----------------------------------------------------------------------------

    def read(self, source) -> dict:
        """Read ``source`` (a path, a list of DICOM files, or a case's ``reader_input``) into a MetaTensor,
        reoriented (``preprocess.orientation``) in the file's own dtype."""
        return self.preprocess({"image": source}, end=LEAN_READ_STEPS)

    def prepare(self, loaded: dict) -> Prepared:
        """Preprocess what :meth:`read` returned (which it may modify: float32 scans are filtered in place)."""
        # channel 0, the reference scan, in the grid it was read in: a view of the reoriented volume
        loaded_array = oriented_as_read(loaded["image"])
        # Preprocessing goes on with a float32 conversion: a copy, unless the scan already is float32, in
        # which case later steps (z-score normalisation) work in place on it, so it is copied here; with a
        # preprocess.spacing, LowpassSpacingd only reads it (its output is a new grid): no copy then.
        in_place = loaded_array.dtype == np.float32 and self.config.preprocess.spacing is None
        source_image = loaded_array.copy(order="K") if in_place else loaded_array
        data = self.preprocess(loaded, start=LEAN_READ_STEPS)
        image = data["image"]
        return Prepared(image=image, source_image=source_image,
                        source=str(image.meta.get("filename_or_obj", "")))

    def load(self, source) -> Prepared:
        """:meth:`read` then :meth:`prepare`."""
        prepared = self.prepare(self.read(source))
        prepared.source = prepared.source or str(source)
        return prepared

    def predict(self, prepared: Prepared, progress=None, class_probabilities: bool = False) -> Prediction:
        """Probabilities on the preprocessed grid (float16, CPU), streamed window band by window band.

        ``progress``: an optional callable called once per network call (batch of windows).
        ``class_probabilities``: many-class models also keep every class's probability (for
        ``--save-probabilities``; binary models' P(lesion) is always kept).
        """
        return self._predict(prepared.image, progress, keep_all=False, keep_classes=class_probabilities)

    def probabilities(self, image: torch.Tensor, progress=None) -> torch.Tensor:
        """Class probabilities (C, *spatial), float32, for a preprocessed image (channels, *spatial)."""
        return self._predict(image, progress, keep_all=True).probs.float()

    def _predict(self, image: torch.Tensor, progress, keep_all: bool, keep_classes: bool = False) -> Prediction:
        cfg, dims = self.config.inference, self.config.model.spatial_dims
        forward = self.forward(image)
        flips = mirror_flips(cfg.tta, cfg.tta_axes, dims)
        averaged = len(self.runners) > 1 or len(flips) > 1
        if averaged:  # every network on every flip of each batch of windows: their probabilities' mean
            forward = averaged_probabilities([runner.forward(image) for runner in self.runners], flips)
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        x = x.to(torch.float32)
        spatial = tuple(x.shape[1:])
        on_slab = SlabAccumulator(spatial, keep_all, probabilities=averaged, keep_classes=keep_classes)

        valid = self.runner.valid_padding()
        keep, coarse = (None, None) if valid else self.window_filter(image, forward, averaged)
        skipping = dict(keep=keep, channels=self.config.num_classes,
                        empty_value=(1.0, 0.0) if averaged else (0.0, -30.0)) if keep is not None else {}
        if dims == 3 and not valid:
            stats = stream_windows(x, forward, cfg.roi_size, cfg.overlap, cfg.blend, self.window_batch, on_slab,
                                   device=self.device, progress=progress, **skipping)
        elif dims == 2 and not valid:
            stats = stream_windows(x, window_forward(forward, 2), list(cfg.roi_size) + [1],
                                   cfg.overlap, cfg.blend, self.window_batch, on_slab, device=self.device,
                                   progress=progress, **skipping)
        else:  # valid padding: MONAI's sliding window over the padded volume (not streamed)
            stats = StreamStats()
            counted = _counting(forward, stats, progress)
            logits = predict_logits(self.network, x.to(self.device), cfg, dims, forward=counted)
            on_slab(0, spatial[-1], logits.float())
        if coarse is not None:  # the cascade's coarse pass is part of the cost
            stats.windows += coarse.windows
            stats.forwards += coarse.forwards
            stats.network_seconds += coarse.network_seconds
        return Prediction(probs=on_slab.probs, binary=on_slab.binary, labels=on_slab.labels, windows=stats.windows,
                          forwards=stats.forwards, network_seconds=stats.network_seconds,
                          class_probs=on_slab.class_probs, skipped=stats.skipped,
                          coarse_windows=coarse.windows if coarse is not None else 0)

    def window_filter(self, image: torch.Tensor, forward=None, probabilities: bool = False):
        """``(keep(box), coarse pass stats)`` for :func:`~pipeline.infer.stream.stream_windows`, or
        ``(None, None)`` (every window runs). ``inference.skip_empty: body`` keeps the windows touching the
        body (:mod:`pipeline.infer.skip`); ``inference.cascade.enabled`` those touching the coarse pass's
        candidates (:mod:`pipeline.infer.cascade`, run here with ``forward``); both: the windows both keep."""
        cfg, dims = self.config.inference, self.config.model.spatial_dims
        if cfg.skip_empty == "none" and not cfg.cascade.enabled:
            return None, None
        from pipeline.infer.skip import body_region, grid_spacing

        spacing = grid_spacing(image, self.config.preprocess.spacing)
        regions, coarse = [], None
        if cfg.skip_empty == "body":
            regions.append(body_region(image, self.config.preprocess, spacing, cfg.skip_margin_mm))
        if cfg.cascade.enabled:
            from pipeline.infer.cascade import candidate_region

            roi = list(cfg.roi_size) + ([1] if dims == 2 else [])
            region, coarse, _ = candidate_region(image, window_forward(forward or self.forward(), dims),
                                                 cfg.cascade, spacing, roi, cfg.overlap, cfg.blend,
                                                 self.window_batch, self.device, probabilities=probabilities)
            regions.append(region)
        return (lambda box: all(region.touches(box) for region in regions)), coarse

    def finish(self, prediction: Prediction, prepared: Prepared) -> Segmentation:
        """Labels (and lesion probability) on the source grid from :meth:`predict`'s output, slab by slab.

        Binary models: the lesion probability is interpolated (linearly) onto the source grid and the
        decision is taken there, as nnU-Net does. Many-class models: the argmax was taken on the windows'
        grid as they finished (so memory does not grow with the classes) and the labels are sampled at the
        nearest voxel; their P(any class but background) is interpolated linearly.
        """
        image = prepared.image
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        shape = prepared.source_image.shape
        labels = np.zeros(shape, dtype=np.uint8)
        foreground = np.zeros(shape, dtype=np.float16)

        def on_probability(k0: int, k1: int, values: torch.Tensor) -> None:
            if prediction.binary:
                labels[..., k0:k1] = self.decide_lesion(values[0])
            foreground[..., k0:k1] = values[0].numpy().astype(np.float16)

        def on_labels(k0: int, k1: int, values: torch.Tensor) -> None:
            labels[..., k0:k1] = values[0].round().numpy().astype(np.uint8)

        maps = axis_map(affine, np.asarray(image.affine, dtype=np.float64))
        if maps is not None:
            box = crop_box(image, image.shape[1:])
            to_source_slabs(prediction.probs, box, maps, shape, on_probability)
            if prediction.labels is not None:  # many classes: decided on the windows' grid, nearest voxel here
                to_source_slabs(prediction.labels, box, maps, shape, on_labels, nearest=True)
        else:  # a preprocessing step that is not a reorientation, rescaling or crop: MONAI's inversion
            on_probability(0, shape[-1], self.to_source(prediction.probs.float(), image))
            if prediction.labels is not None:
                classes = self.config.num_classes
                one_hot = torch.nn.functional.one_hot(prediction.labels[0].long(), classes).movedim(-1, 0).float()
                on_labels(0, shape[-1], self.to_source(one_hot, image).argmax(dim=0, keepdim=True).float())
        # inference.min_component_mm3 and postprocess.* (keep largest, restrict to the body)
        labels = apply_postprocessing(labels, affine, prepared.source_image, self.config, in_place=True)
        return Segmentation(
            labels=labels,
            affine=affine,
            source=prepared.source,
            source_format=str(image.meta.get("source_format", "")),
            foreground=foreground,
            image=prepared.source_image,
            class_probabilities=self.source_class_probabilities(prediction, prepared),
        )

    def source_class_probabilities(self, prediction: Prediction, prepared: Prepared) -> Optional[np.ndarray]:
        """Every class's probability on the source grid, float16 (I, J, K, classes), interpolated linearly;
        None unless :meth:`predict` kept them (many-class models, ``class_probabilities=True``)."""
        if prediction.class_probs is None:
            return None
        image, shape = prepared.image, prepared.source_image.shape
        out = np.zeros(tuple(shape) + (prediction.class_probs.shape[0],), dtype=np.float16)

        def on_slab(k0: int, k1: int, values: torch.Tensor) -> None:
            out[:, :, k0:k1, :] = values.permute(1, 2, 3, 0).numpy().astype(np.float16)

        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        maps = axis_map(affine, np.asarray(image.affine, dtype=np.float64))
        if maps is not None:
            to_source_slabs(prediction.class_probs, crop_box(image, image.shape[1:]), maps, shape, on_slab)
        else:
            on_slab(0, shape[-1], self.to_source(prediction.class_probs.float(), image))
        return out

    def segment(self, source: Union[str, list[str]]) -> Segmentation:
        prepared = self.load(source)
        return self.finish(self.predict(prepared), prepared)

    def decide_lesion(self, lesion_probability: torch.Tensor) -> np.ndarray:
        """Binary models: lesion where p >= ``inference.threshold``, or p > 0.5 (argmax) when it is null."""
        threshold = self.config.inference.threshold
        mask = lesion_probability >= threshold if threshold is not None else lesion_probability > 0.5
        return mask.numpy().astype(np.uint8)

    def tile_batches(self, prepared: Prepared) -> Optional[int]:
        """How many network calls :meth:`predict` makes for ``prepared`` (for progress bars), if known."""
        return self.runner.tile_batches(tuple(prepared.image.shape[1:]))


def _counting(forward, stats: StreamStats, progress):
    """``forward`` that counts its calls and time into ``stats`` (the non-streamed path)."""
    def counted(x: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        out = forward(x)
        stats.network_seconds += time.perf_counter() - began
        stats.forwards += 1
        stats.windows += x.shape[0]
        if progress is not None:
            progress()
        return out
    return counted
