"""Typed configuration: one dataclass per section, every field with a default and a documented range.

Validation lives beside the fields (``_check`` methods) so a bad value fails at load time with the key,
the value and what is allowed. ``pipeline.config.load`` turns YAML + dotted overrides into these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from pipeline.errors import ConfigError


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected {allowed}")


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "a number >= 0" if allow_zero else "a number > 0")


def _in_range(key: str, value, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        _fail(key, value, f"a number in [{lo}, {hi}]")


def _choice(key: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        _fail(key, value, "one of " + ", ".join(repr(o) for o in options))


def _sizes(key: str, value, n: Optional[int] = None) -> None:
    if not value or any((not isinstance(v, int)) or v <= 0 for v in value):
        _fail(key, value, "a list of positive integers")
    if n is not None and len(value) != n:
        _fail(key, value, f"a list of {n} positive integers")


DEFAULT_LABELS = {"background": 0, "lesion": 1}

# The allowed values of each config key with a fixed set, listed once: the code that implements a key
# (model.blocks, infer.backend) and the CLI's choices (torch-free: `medseg --help`) import them from here.
SYNTH_KINDS = ("ct", "mr")
SPATIAL_DIMS = (2, 3)
NORMS = ("instance", "batch", "none")
UPSAMPLES = ("transpose", "interp")
PADDINGS = ("same", "valid")
SCHEDULES = ("poly", "cosine")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")  # inference.precision; int8 runs on onnxruntime or openvino
SKIP_EMPTY = ("none", "body")
BLENDS = ("gaussian", "constant")
TTA_MODES = ("none", "mirror")
PROBABILITY_DTYPES = ("uint8", "float16")  # segment --probabilities-dtype
EXPORT_FORMATS = ("onnx", "torchscript", "bundle")  # export --format
CACHE_KINDS = ("onnx", "int8", "openvino", "backend")  # folders of the model cache; cache clear --what (or all)


@dataclass
class DataConfig:
    """Where the training data lives (nnU-Net / MSD raw layout) and how it is split."""

    root: str = "data/demo"  # folder with dataset.json, imagesTr/, labelsTr/ (relative to the config's cwd)
    # class names -> consecutive integers; the dataset's own labels (dataset.json) replace this default
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    # input channel names in order (nnU-Net channel_names / MSD modality); [] = from the dataset at training
    channels: list[str] = field(default_factory=list)
    val_fraction: float = 0.2  # fraction of training cases held out for validation
    val_cases: list[str] = field(default_factory=list)  # explicit validation case ids (override fraction)
    # cross-validation folds (`medseg train --fold K|all`, splits.json in train.out_dir); >= 2
    folds: int = 5
    # train on at most this many of the dataset's labelled cases: a seeded draw (train.seed), the same in
    # every run and fold; 0 = all. `medseg plan` sets it where reading every case would eat the time budget
    max_cases: int = 0

    def _check(self) -> None:
        values = sorted(self.labels.values())
        if values != list(range(len(values))) or len(values) < 2:
            _fail("data.labels", self.labels, "a mapping of >= 2 names to consecutive integers 0..N-1")
        _in_range("data.val_fraction", self.val_fraction, 0.0, 0.9)
        if not isinstance(self.folds, int) or self.folds < 2:
            _fail("data.folds", self.folds, "an integer >= 2 (cross-validation folds)")
        if not isinstance(self.max_cases, int) or isinstance(self.max_cases, bool) or self.max_cases < 0:
            _fail("data.max_cases", self.max_cases, "an integer >= 0 (0 = every case)")
        if any(not name or not isinstance(name, str) for name in self.channels):
            _fail("data.channels", self.channels, "a list of channel names such as [FLAIR, T1c]")


@dataclass
class SynthConfig:
    """The synthetic dataset `medseg demo` generates into ``data.root`` (see `medseg synth`)."""

    kind: str = "ct"  # ct: one CT channel, lesion; mr: FLAIR + T1c, oedema and enhancing core (nnU-Net v2 layout)
    cases: int = 24
    seed: int = 0
    test_fraction: float = 0.25
    dicom_test_cases: int = 2  # test cases written as DICOM CT series instead of NIfTI
    shape: list[int] = field(default_factory=lambda: [160, 160, 48])
    spacing: list[float] = field(default_factory=lambda: [0.8, 0.8, 2.5])

    def _check(self) -> None:
        _choice("synth.kind", self.kind, SYNTH_KINDS)
        _positive("synth.cases", self.cases)
        _in_range("synth.test_fraction", self.test_fraction, 0.0, 0.9)
        _positive("synth.dicom_test_cases", self.dicom_test_cases, allow_zero=True)
        _sizes("synth.shape", self.shape, 3)
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            _fail("synth.spacing", self.spacing, "three positive numbers in mm")


INTENSITY_MODES = ("ct_window", "zscore", "auto")
CHANNEL_SCHEMES = ("ct", "zscore")


@dataclass
class ChannelNormConfig:
    """How one input channel is normalised under ``preprocess.intensity.mode: auto`` (as nnU-Net does).

    ``ct``: clip to ``clip`` (the dataset's foreground 0.5-99.5 percentiles), then ``(x - mean) / std``
    with the dataset's foreground mean and standard deviation. ``zscore``: per image, with the mean and
    standard deviation inside the body (voxels above the image's minimum). Filled in by ``train`` from the
    training data (and stored in the checkpoint); any value given in the config is kept.
    """

    name: str = ""
    scheme: str = ""  # ct | zscore; "" = by the channel name (CT -> ct, anything else -> zscore)
    clip: Optional[list[float]] = None  # ct: [low, high] in the scan's units
    mean: Optional[float] = None  # ct: foreground mean
    std: Optional[float] = None  # ct: foreground standard deviation

    def _check(self) -> None:
        if self.scheme:
            _choice("preprocess.intensity.channels[].scheme", self.scheme, CHANNEL_SCHEMES)
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] > self.clip[1]):
            _fail("preprocess.intensity.channels[].clip", self.clip, "[low, high] with low <= high")
        if self.std is not None and self.std <= 0:
            _fail("preprocess.intensity.channels[].std", self.std, "a number > 0")

    @property
    def resolved_scheme(self) -> str:
        return self.scheme or ("ct" if self.name.strip().upper() == "CT" else "zscore")

    @property
    def complete(self) -> bool:
        """Whether this channel can be normalised (a ``ct`` channel needs its dataset statistics)."""
        return self.resolved_scheme != "ct" or (self.clip is not None and self.mean is not None
                                                and self.std is not None)


@dataclass
class IntensityConfig:
    """Intensity normalisation: a CT window (clip then scale to [0, 1]), per-image z-score (MR), or
    ``auto``: per channel, chosen by the channel's name as nnU-Net does (see :class:`ChannelNormConfig`)."""

    mode: str = "ct_window"  # ct_window | zscore | auto
    window: list[float] = field(default_factory=lambda: [-150.0, 250.0])  # HU, for ct_window
    channels: list[ChannelNormConfig] = field(default_factory=list)  # auto: one entry per input channel

    def _check(self) -> None:
        _choice("preprocess.intensity.mode", self.mode, INTENSITY_MODES)
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            _fail("preprocess.intensity.window", self.window, "[low, high] with low < high (in HU)")
        for channel in self.channels:
            channel._check()


@dataclass
class PreprocessConfig:
    """The deterministic preprocessing shared by training, validation and inference."""

    orientation: str = "RAS"
    spacing: Optional[list[float]] = field(default_factory=lambda: [1.6, 1.6, 2.5])  # mm; null keeps native
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = True  # crop to the body (voxels above the intensity floor)
    crop_margin: int = 4  # voxels kept around the foreground

    def _check(self) -> None:
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("RLAPSI"):
            _fail("preprocess.orientation", self.orientation, "three axis codes such as 'RAS' or 'LPS'")
        if self.spacing is not None:
            if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
                _fail("preprocess.spacing", self.spacing, "null or three positive numbers in mm")
        _positive("preprocess.crop_margin", self.crop_margin, allow_zero=True)


@dataclass
class ModelConfig:
    """Our U-Net (``pipeline.model.UNet``); see its docstring for each option."""

    name: str = "unet"
    spatial_dims: int = 3  # 3: 3D patches; 2: axial slices
    features: int = 16  # channels at the first level; doubled at each level
    depth: int = 4  # resolution levels
    norm: str = "instance"  # instance | batch | none (no normalisation: the convolutions get a bias)
    upsample: str = "transpose"  # transpose | interp
    padding: str = "same"  # same | valid (original paper: unpadded convolutions)
    deep_supervision: bool = False
    dropout: float = 0.0

    def _check(self) -> None:
        _choice("model.spatial_dims", self.spatial_dims, SPATIAL_DIMS)
        _positive("model.features", self.features)
        _in_range("model.depth", self.depth, 2, 7)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.upsample", self.upsample, UPSAMPLES)
        _choice("model.padding", self.padding, PADDINGS)
        _in_range("model.dropout", self.dropout, 0.0, 0.9)


@dataclass
class SamplingConfig:
    """How training samples are drawn: 3D patches or 2D axial slices, with lesions oversampled."""

    patch_size: list[int] = field(default_factory=lambda: [96, 96, 32])  # 3D: [x, y, z]; 2D: [x, y]
    pos_ratio: float = 2.0  # 3D: positive:negative patch centres = pos_ratio : 1
    lesion_slice_ratio: float = 0.5  # 2D: fraction of slices drawn from lesion-containing slices
    samples_per_volume: int = 4  # patches / slices taken from a volume each time it is loaded
    batch_size: int = 2  # volumes per batch (x samples_per_volume patches each)
    cache: bool = True  # keep preprocessed volumes in memory

    def _check(self) -> None:
        _positive("sampling.pos_ratio", self.pos_ratio, allow_zero=True)
        _in_range("sampling.lesion_slice_ratio", self.lesion_slice_ratio, 0.0, 1.0)
        _positive("sampling.samples_per_volume", self.samples_per_volume)
        _positive("sampling.batch_size", self.batch_size)


@dataclass
class AugmentConfig:
    """Random augmentation for training only; every probability 0 disables its transform."""

    flip_prob: float = 0.5  # per axis (in-plane axes only for 2D)
    rotate_prob: float = 0.2
    rotate_deg: float = 15.0  # around the slice normal (and ±1/3 of it out of plane in 3D)
    scale_prob: float = 0.2
    scale_range: float = 0.1  # zoom factor drawn from 1 ± scale_range
    elastic_prob: float = 0.0  # the U-Net paper's elastic deformation (slow in 3D on a CPU)
    elastic_sigma: list[float] = field(default_factory=lambda: [5.0, 7.0])  # voxels
    elastic_magnitude: list[float] = field(default_factory=lambda: [50.0, 150.0])  # voxels
    intensity_scale_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift_prob: float = 0.3
    intensity_shift: float = 0.1
    noise_prob: float = 0.2
    noise_std: float = 0.03

    def _check(self) -> None:
        for name in ("flip", "rotate", "scale", "elastic", "intensity_scale", "intensity_shift", "noise"):
            _in_range(f"augment.{name}_prob", getattr(self, f"{name}_prob"), 0.0, 1.0)
        _in_range("augment.rotate_deg", self.rotate_deg, 0.0, 180.0)
        _in_range("augment.scale_range", self.scale_range, 0.0, 0.9)


@dataclass
class LossConfig:
    """Dice + focal loss (MONAI ``DiceFocalLoss``)."""

    dice_weight: float = 1.0
    focal_weight: float = 1.0
    gamma: float = 2.0
    include_background: bool = False
    deep_supervision_weights: Optional[list[float]] = None  # default: halves per level
    # The focal term on the softmax over every class (background included; gamma 0: cross-entropy, as
    # nnU-Net's Dice + CE), consistent with the softmax inference decides by. False: MONAI's sigmoid focal
    # on the foreground logits alone.
    focal_softmax: bool = False

    def _check(self) -> None:
        _positive("loss.dice_weight", self.dice_weight, allow_zero=True)
        _positive("loss.focal_weight", self.focal_weight, allow_zero=True)
        if self.dice_weight == 0 and self.focal_weight == 0:
            _fail("loss.dice_weight", 0, "at least one of dice_weight and focal_weight > 0")
        _positive("loss.gamma", self.gamma, allow_zero=True)


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    epochs: int = 100
    steps_per_epoch: int = 50  # optimiser steps per epoch
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    schedule: str = "poly"  # poly | cosine
    grad_clip: float = 12.0  # max gradient norm; 0 disables
    val_every: int = 5  # epochs between validations (sliding-window on whole volumes)
    amp: bool = True  # mixed precision, on CUDA only (never on a CPU)
    seed: int = 0
    num_workers: int = 0  # data loader worker processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dist_timeout: float = 300.0  # seconds a collective may wait under torchrun (env MEDSEG_DIST_TIMEOUT wins)
    # a wall-clock budget for the run (minutes, from its start, data loading included; 0 = none): after each
    # epoch, when the remaining epochs at the pace measured so far would pass it, the run is shortened to the
    # epochs that fit and the learning-rate schedule re-stretched to end there
    max_minutes: float = 0.0

    def _check(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.max_minutes", self.max_minutes, allow_zero=True)
        _positive("train.dist_timeout", self.dist_timeout)
        _positive("train.steps_per_epoch", self.steps_per_epoch)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.warmup_epochs", self.warmup_epochs, allow_zero=True)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.val_every", self.val_every)
        _positive("train.num_workers", self.num_workers, allow_zero=True)


@dataclass
class CascadeConfig:
    """Coarse-to-fine inference (:mod:`pipeline.infer.cascade`): the same network over the scan at a coarser
    ``spacing`` first; the full-resolution windows then run only where its probability of any lesion class
    exceeds ``threshold`` (dilated by ``margin_mm``)."""

    enabled: bool = False
    spacing: Optional[list[float]] = None  # mm of the coarse pass; null: twice preprocess.spacing's grid
    threshold: float = 0.1
    margin_mm: float = 10.0

    def _check(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or any(s <= 0 for s in self.spacing)):
            _fail("inference.cascade.spacing", self.spacing, "null or three positive numbers in mm")
        _in_range("inference.cascade.threshold", self.threshold, 0.0, 1.0)
        _positive("inference.cascade.margin_mm", self.margin_mm, allow_zero=True)


@dataclass
class InferenceConfig:
    roi_size: list[int] = field(default_factory=lambda: [96, 96, 32])  # network input window
    overlap: float = 0.25
    sw_batch_size: int = 2  # windows per forward pass; at least 2 on a CPU (batch 1 takes slow conv paths)
    blend: str = "gaussian"  # gaussian | constant
    threshold: Optional[float] = None  # binary models: lesion if p >= threshold; null: argmax
    min_component_mm3: float = 0.0  # remove predicted components smaller than this
    device: str = "auto"
    # auto | torch | onnxruntime | openvino; auto: the fastest whose masks agree with torch fp32 (measured once)
    backend: str = "auto"
    # fp32 | int8 (static QDQ int8 on onnxruntime/openvino; with auto, int8 is a candidate only when set here)
    precision: str = "fp32"
    amp: bool = True  # float16 autocast where the device has fast half precision (CUDA); never on a CPU
    # test-time augmentation: none | mirror (softmax probabilities averaged over the flips of the spatial
    # axes: 3D, all 3 = 8 combinations; 2D, the 2 in-plane axes = 4)
    tta: str = "none"
    tta_axes: Optional[list[int]] = None  # mirror: flip only these axes of the preprocessed grid; null: all
    # body: skip windows holding no voxel of the body (dilated by skip_margin_mm); none: every window
    skip_empty: str = "none"
    skip_margin_mm: float = 10.0
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def _check(self) -> None:
        _in_range("inference.overlap", self.overlap, 0.0, 0.95)
        _choice("inference.skip_empty", self.skip_empty, SKIP_EMPTY)
        _positive("inference.skip_margin_mm", self.skip_margin_mm, allow_zero=True)
        _choice("inference.tta", self.tta, TTA_MODES)
        _choice("inference.backend", self.backend, BACKENDS)
        _choice("inference.precision", self.precision, PRECISIONS)
        if self.precision == "int8" and self.backend == "torch":
            _fail("inference.precision", self.precision,
                  "fp32 with inference.backend: torch (int8 runs on onnxruntime, openvino or auto)")
        _positive("inference.sw_batch_size", self.sw_batch_size)
        _choice("inference.blend", self.blend, BLENDS)
        if self.threshold is not None:
            _in_range("inference.threshold", self.threshold, 0.0, 1.0)
        _positive("inference.min_component_mm3", self.min_component_mm3, allow_zero=True)


@dataclass
class PostprocessConfig:
    """Rules applied to a segmentation on the source grid (:mod:`pipeline.postprocess.rules`), by class
    name; ``medseg cv`` chooses them from the out-of-fold predictions. The minimum component size is
    ``inference.min_component_mm3``."""

    keep_largest: list[str] = field(default_factory=list)  # classes keeping only their largest component
    restrict_to_body: list[str] = field(default_factory=list)  # classes losing components outside the body

    def _check(self) -> None:
        for key in ("keep_largest", "restrict_to_body"):
            names = getattr(self, key)
            if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
                _fail(f"postprocess.{key}", names, "a list of distinct class names such as [lesion]")


@dataclass
class ChannelRule:
    """Which series of a DICOM study is one input channel (``input.channels``).

    A series is the channel when every rule given matches: ``series_description`` is a shell-style
    pattern (``*FLAIR*``, case-insensitive), ``sequence_name`` a pattern on SequenceName /
    ScanningSequence, ``contrast`` whether ContrastBolusAgent is present (null: either).
    """

    name: str = ""
    series_description: str = ""
    sequence_name: str = ""
    contrast: Optional[bool] = None

    def _check(self) -> None:
        if not self.name:
            _fail("input.channels[].name", self.name, "a channel name such as FLAIR")
        if not (self.series_description or self.sequence_name or self.contrast is not None):
            _fail(f"input.channels[{self.name}]", "no rule",
                  "at least one of series_description, sequence_name, contrast")


@dataclass
class InputConfig:
    """Which scans under an input folder are read (selection), and what to do with inconsistent DICOM series.

    Used the same way by ``segment`` and ``convert``. A volume that is not selected is listed with the
    reason. For inconsistent geometry the default refuses the series with an error; ``drop``/``resample``
    repair it with a warning; ``assume`` reads a series whose voxel size the headers do not give, with a
    warning and the assumption recorded.
    """

    modalities: list[str] = field(default_factory=list)  # e.g. [CT]; empty: any modality
    min_slices: int = 1  # volumes with fewer slices are skipped
    require_image_type: list[str] = field(default_factory=list)  # values ImageType must hold, e.g. [ORIGINAL]
    exclude_image_type: list[str] = field(default_factory=lambda: ["LOCALIZER"])  # skip when any is present
    series_description: str = ""  # regular expression the description must contain (case-insensitive)
    exclude_series_description: str = ""  # regular expression: skip series whose description contains it
    on_duplicate_slices: str = "error"  # error | drop: keep the first acquired frame at a repeated position
    on_missing_slices: str = "error"  # error | resample: gaps / uneven spacing, linear onto a regular grid
    on_gantry_tilt: str = "error"  # error | resample: shift each slice onto a grid orthogonal to the slices
    slice_tolerance: float = 0.05  # mm (or 2 % of the spacing if larger) a slice may sit off a regular grid
    # multi-channel models on DICOM studies: which series of a study is each channel, in channel order
    channels: list[ChannelRule] = field(default_factory=list)
    # error | assume: no PixelSpacing (assume: ImagerPixelSpacing, else 1 x 1 mm), a legacy multi-frame step
    # without SpacingBetweenSlices (assume: SliceThickness, else 1 mm), a lone slice without either (1 mm)
    on_missing_spacing: str = "error"

    def _check(self) -> None:
        _positive("input.min_slices", self.min_slices)
        for rule in self.channels:
            rule._check()
        names = [rule.name for rule in self.channels]
        if len(set(names)) != len(names):
            _fail("input.channels", names, "distinct channel names")
        _choice("input.on_duplicate_slices", self.on_duplicate_slices, ("error", "drop"))
        _choice("input.on_missing_slices", self.on_missing_slices, ("error", "resample"))
        _choice("input.on_gantry_tilt", self.on_gantry_tilt, ("error", "resample"))
        _choice("input.on_missing_spacing", self.on_missing_spacing, ("error", "assume"))
        _positive("input.slice_tolerance", self.slice_tolerance)
        for key in ("series_description", "exclude_series_description"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                _fail(f"input.{key}", getattr(self, key), f"a valid regular expression ({exc})")


@dataclass
class OutputConfig:
    """What the DICOM outputs (SEG, RTSTRUCT) record beyond the mask."""

    # the segments' anatomic region, SCHEME:CODE:Meaning (e.g. SCT:10200004:Liver); empty: none recorded
    anatomic_region: str = ""
    rtstruct_rois: str = "label"  # label: one RTSTRUCT ROI per label | lesion: one per lesion (component)

    def _check(self) -> None:
        _choice("output.rtstruct_rois", self.rtstruct_rois, ("label", "lesion"))
        parts = [p.strip() for p in self.anatomic_region.split(":", 2)]
        if self.anatomic_region and (len(parts) != 3 or not all(parts)):
            _fail("output.anatomic_region", self.anatomic_region, "SCHEME:CODE:Meaning such as SCT:10200004:Liver")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def num_classes(self) -> int:
        return len(self.data.labels)

    @property
    def in_channels(self) -> int:
        """Input channels of the network: one per ``data.channels`` name (1 when none are named)."""
        return max(1, len(self.data.channels))

    @property
    def channel_names(self) -> list[str]:
        return list(self.data.channels) or ["0"]

    @property
    def label_names(self) -> list[str]:
        return [name for name, _ in sorted(self.data.labels.items(), key=lambda kv: kv[1])]

    def _check(self) -> None:
        """Checks that span sections."""
        dims = self.model.spatial_dims
        _sizes("sampling.patch_size", self.sampling.patch_size, dims)
        _sizes("inference.roi_size", self.inference.roi_size, dims)
        axes = self.inference.tta_axes
        if axes is not None and (not axes or len(set(axes)) != len(axes)
                                 or any(not isinstance(a, int) or not 0 <= a < dims for a in axes)):
            _fail("inference.tta_axes", axes, f"null or distinct axes among {list(range(dims))} "
                  f"(model.spatial_dims is {dims})")
        norms = self.preprocess.intensity.channels
        if self.preprocess.intensity.mode == "auto" and norms and self.data.channels \
                and len(norms) != len(self.data.channels):
            _fail("preprocess.intensity.channels", [c.name for c in norms],
                  f"one entry per data.channels ({self.data.channels}), in the same order")
