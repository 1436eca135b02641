"""What a model needs besides its weights to reproduce ``medseg segment``: one JSON-able dict (the *spec*).

Every export embeds it (ONNX ``metadata_props``, TorchScript ``_extra_files``, the bundle's
``configs/metadata.json``), so a script holding only the exported file can preprocess, run the sliding
window and post-process exactly as :class:`~pipeline.infer.Segmenter` does. The spec is built from the
checkpoint's config (:func:`inference_spec`); intensity normalisation is resolved per channel into one of
four explicit schemes (see :func:`channel_normalisation`).
"""

from __future__ import annotations

import json

from pipeline.config import Config
from pipeline.model.checkpoint import Checkpoint

SPEC_FORMAT = "medseg-export"
SPEC_VERSION = 1
SPEC_KEY = "medseg"  # ONNX metadata key of the full JSON; TorchScript: _extra_files "medseg.json"
EXTRA_FILE = "medseg.json"
INPUT_NAME = "x"
OUTPUT_NAME = "y"
SIGMA_SCALE = 0.125  # Gaussian blending: sigma = roi / 8 (pipeline.infer.windows)
WEIGHT_FLOOR = 1e-3  # MONAI's importance map: exp(-d^2 / 2 sigma^2) from the window centre, at least this
CONNECTIVITY = 26  # connected components of the post-processing (pipeline.postprocess.components)


def channel_normalisation(config: Config) -> list[dict]:
    """Per input channel, how its intensities are normalised (after resampling), as explicit schemes:

    * ``window``: ``clip(x, low, high)`` then ``(x - low) / (high - low)`` (``intensity.mode: ct_window``);
    * ``zscore``: ``(x - mean(x)) / std(x)`` over the whole image, per channel (``mode: zscore``);
    * ``ct``: ``(clip(x, *clip) - mean) / std`` with the dataset's statistics (``mode: auto``, CT channels);
    * ``zscore_body``: z-score with the mean and std of the voxels above the image's minimum, or of the
      whole image if those are fewer than 5 % (``mode: auto``, other channels).
    """
    from pipeline.transforms.normalize import MIN_BODY_FRACTION, resolve_channel_norms

    intensity = config.preprocess.intensity
    names = config.channel_names
    if intensity.mode == "ct_window":
        low, high = (float(v) for v in intensity.window)
        return [{"channel": n, "scheme": "window", "low": low, "high": high} for n in names]
    if intensity.mode == "zscore":
        return [{"channel": n, "scheme": "zscore"} for n in names]
    names = list(config.data.channels) or [c.name for c in intensity.channels] or ["0"]
    out = []
    for norm in resolve_channel_norms(names, intensity.channels):
        if norm.resolved_scheme == "ct":
            out.append({"channel": norm.name, "scheme": "ct", "clip": [float(v) for v in norm.clip or []],
                        "mean": norm.mean, "std": norm.std})
        else:
            out.append({"channel": norm.name, "scheme": "zscore_body", "min_body_fraction": MIN_BODY_FRACTION})
    return out


def _foreground_rule(config: Config) -> str:
    """Which voxels ``crop_foreground`` keeps (after normalisation): pipeline.transforms.preprocess."""
    mode = config.preprocess.intensity.mode
    return {"ct_window": "above_zero", "auto": "any_channel_above_its_min"}.get(mode, "above_min")


def inference_spec(ckpt: Checkpoint) -> dict:
    """The spec of ``ckpt``: preprocessing, window, blending, labels, decision, post-processing, versions."""
    from pipeline import __version__
    from pipeline.postprocess.rules import class_values

    config = ckpt.config
    pre, inf, post = config.preprocess, config.inference, config.postprocess
    return {
        "format": SPEC_FORMAT,
        "format_version": SPEC_VERSION,
        "medseg_version": __version__,
        "checkpoint_sha256": ckpt.sha256,
        "epoch": ckpt.epoch,
        "network": {
            "input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "N,C,X,Y,Z" if config.model.spatial_dims == 3
            else "N,C,X,Y", "spatial_dims": config.model.spatial_dims, "in_channels": config.in_channels,
            "out_channels": config.num_classes, "padding": config.model.padding,
            "output_is": "logits (softmax over axis 1 gives the class probabilities)",
        },
        "labels": dict(sorted(config.data.labels.items(), key=lambda kv: kv[1])),
        "classes": config.label_names,
        "channels": config.channel_names,
        "preprocess": {
            "orientation": pre.orientation.upper(),
            "spacing": None if pre.spacing is None else [float(s) for s in pre.spacing],
            "antialias": "gaussian before downsampling, sigma = max(0, (target/source spacing - 1) / 2) voxels",
            "interpolation": "linear", "padding_mode": "border",
            "normalisation": channel_normalisation(config),
            "crop_foreground": bool(pre.crop_foreground),
            "crop_margin": int(pre.crop_margin),
            "foreground": _foreground_rule(config),
        },
        "inference": {
            "roi_size": [int(r) for r in inf.roi_size],
            "overlap": float(inf.overlap),
            "blend": inf.blend,
            "sigma_scale": SIGMA_SCALE,
            "weight_floor": WEIGHT_FLOOR,
            "sw_batch_size": int(inf.sw_batch_size),
            "tta": inf.tta,
            "tta_axes": None if inf.tta_axes is None else [int(a) for a in inf.tta_axes],
            "blended": "logits" if inf.tta == "none" else "softmax probabilities (mean over the flips)",
            "threshold": inf.threshold,
            "decision": ("binary: lesion where P(class 1) >= threshold (null: > 0.5), taken on the source grid "
                         "after linear interpolation of P (held as float16 on the preprocessed grid); more classes: argmax on the preprocessed grid, "
                         "nearest voxel on the source grid"),
        },
        "postprocess": {
            "order": ["restrict_to_body", "min_component_mm3", "keep_largest"],
            "restrict_to_body": class_values(config, post.restrict_to_body, "postprocess.restrict_to_body"),
            "min_component_mm3": float(inf.min_component_mm3),
            "keep_largest": class_values(config, post.keep_largest, "postprocess.keep_largest"),
            "connectivity": CONNECTIVITY,
            "body": "largest component of the crop_foreground voxels of the first channel, on the source grid",
        },
    }


def flat_metadata(spec: dict) -> dict[str, str]:
    """String key/values for ONNX ``metadata_props``: the whole spec as JSON under ``medseg``, and the
    main entries under their own ``medseg.*`` keys for tools that list metadata (Netron, onnx.load)."""
    pre, inf, post = spec["preprocess"], spec["inference"], spec["postprocess"]
    flat = {
        SPEC_KEY: json.dumps(spec, sort_keys=True),
        "medseg.version": spec["medseg_version"],
        "medseg.checkpoint_sha256": spec["checkpoint_sha256"],
        "medseg.orientation": pre["orientation"],
        "medseg.spacing": json.dumps(pre["spacing"]),
        "medseg.normalisation": json.dumps(pre["normalisation"]),
        "medseg.crop_foreground": json.dumps(pre["crop_foreground"]),
        "medseg.roi_size": json.dumps(inf["roi_size"]),
        "medseg.overlap": json.dumps(inf["overlap"]),
        "medseg.blend": inf["blend"],
        "medseg.tta": inf["tta"],
        "medseg.threshold": json.dumps(inf["threshold"]),
        "medseg.labels": json.dumps(spec["labels"]),
        "medseg.min_component_mm3": json.dumps(post["min_component_mm3"]),
        "medseg.keep_largest": json.dumps(post["keep_largest"]),
        "medseg.restrict_to_body": json.dumps(post["restrict_to_body"]),
    }
    return flat
