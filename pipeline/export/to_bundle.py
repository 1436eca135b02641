"""``medseg export --format bundle``: a MONAI bundle folder that segments a folder of NIfTI files.

::

    OUT/configs/metadata.json    MONAI bundle metadata + the medseg spec (``medseg``)
    OUT/configs/inference.json   LoadImaged → Orientationd → AntiAliasd* → Spacingd → intensity → CropForegroundd,
                                 SlidingWindowInferer, then softmax → Invertd (back to the source grid) →
                                 Decided* → RemoveSmallComponentsd* → KeepLargestd* → SaveImaged
    OUT/models/model.ts          the TorchScript network (:mod:`pipeline.export.to_torchscript`)
    OUT/scripts/medseg_bundle.py the starred steps, per-channel normalisation, TTA mirror, restrict_to_body:
                                 medseg's own, no MONAI equivalent (numpy/scipy/torch/MONAI only)
    OUT/docs/README.md, OUT/LICENSE

Run: ``python -m monai.bundle run --config_file OUT/configs/inference.json --dataset_dir IN --output_dir MASKS``;
masks are ``MASKS/<case>_seg.nii.gz`` in the source geometry. Several input channels (``<case>_0000.nii.gz``
... or a 4D NIfTI), ``intensity.mode: auto`` (CT: clip + z-score as MONAI's ScaleIntensityRange; others: the
body z-score), ``inference.tta: mirror`` and 2D networks (``MedsegInferer``), ``postprocess.restrict_to_body`` are
packaged as bundle code. What the bundle cannot represent is refused (:func:`refusals`): valid-padding networks,
with the reason. The folder is built beside ``OUT`` and renamed into place once the
network verified, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.export.network import Exportable
from pipeline.export.to_torchscript import write_torchscript
from pipeline.io.atomic import fsync_dir, make_partial_dir
from pipeline.model.checkpoint import Checkpoint

BUNDLE_CODE = Path(__file__).with_name("bundle_code") / "medseg_bundle.py"
MODULE = "scripts.medseg_bundle"


def refusals(config: Config) -> list[str]:
    """What of ``config`` a bundle cannot represent, each with why (empty: exportable)."""
    problems = []
    if config.model.padding != "same":
        problems.append("model.padding 'valid': MONAI's SlidingWindowInferer needs outputs the size of the window")
    return problems


def _intensity(config: Config, spec: dict) -> dict:
    norms = spec["preprocess"]["normalisation"]
    schemes = {n["scheme"] for n in norms}
    if schemes == {"window"}:
        norm = norms[0]
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": norm["low"], "a_max": norm["high"],
                "b_min": 0.0, "b_max": 1.0, "clip": True}
    if schemes == {"zscore"}:
        return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True}
    if len(norms) == 1 and schemes == {"ct"}:  # (clip(x, low, high) - mean) / std as one linear rescaling
        norm = norms[0]
        low, high = norm["clip"]
        std = max(norm["std"], 1e-8)
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                "b_min": (low - norm["mean"]) / std, "b_max": (high - norm["mean"]) / std, "clip": True}
    # mode auto, several channels or a body z-score: per channel (CT channels through ScaleIntensityRange)
    return {"_target_": f"{MODULE}.NormalizeChannelsd", "keys": "image", "channels": norms}


def inference_config(config: Config, spec: dict) -> dict:
    pre, inf, post = spec["preprocess"], spec["inference"], spec["postprocess"]
    channels = spec["network"]["in_channels"]
    steps = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": True},
    ]
    if channels > 1:
        steps.append({"_target_": f"{MODULE}.CheckChannelsd", "keys": "image", "channels": channels})
    if post["restrict_to_body"]:
        steps.append({"_target_": f"{MODULE}.KeepSourced", "keys": "image", "name": "source"})
    steps.append({"_target_": "Orientationd", "keys": "image", "axcodes": pre["orientation"]})
    if pre["spacing"] is not None:
        steps += [
            {"_target_": f"{MODULE}.AntiAliasd", "keys": "image", "pixdim": pre["spacing"]},
            {"_target_": "Spacingd", "keys": "image", "pixdim": pre["spacing"], "mode": "bilinear",
             "padding_mode": "border", "dtype": "$torch.float32"},
        ]
    steps.append(_intensity(config, spec))
    if pre["crop_foreground"]:
        crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "margin": pre["crop_margin"],
                "allow_smaller": True}
        if pre["foreground"] == "above_min":
            crop["select_fn"] = {"_target_": f"{MODULE}.above_minimum", "_mode_": "callable"}
        elif pre["foreground"] != "above_zero":
            crop["select_fn"] = {"_target_": f"{MODULE}.{pre['foreground']}", "_mode_": "callable"}
        steps.append(crop)
    mirrored = inf["tta"] == "mirror"
    post_steps = [] if mirrored else [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if spec["network"]["out_channels"] == 2:  # binary: P(lesion) interpolated (linear), decided on the source grid
        post_steps += [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": f"{MODULE}.Decided", "keys": "pred", "threshold": inf["threshold"]},
        ]
    else:  # more classes: the argmax on the preprocessed grid, sampled at the nearest voxel (as segment)
        post_steps += [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": f"{MODULE}.Decided", "keys": "pred", "threshold": None},
        ]
    if post["restrict_to_body"]:
        post_steps.append({"_target_": f"{MODULE}.RestrictToBodyd", "keys": "pred", "values": post["restrict_to_body"],
                           "norm": pre["normalisation"][0], "foreground": pre["foreground"],
                           "source_key": "source"})
    if post["min_component_mm3"] > 0:
        post_steps.append({"_target_": f"{MODULE}.RemoveSmallComponentsd", "keys": "pred",
                           "min_mm3": post["min_component_mm3"]})
    if post["keep_largest"]:
        post_steps.append({"_target_": f"{MODULE}.KeepLargestd", "keys": "pred", "values": post["keep_largest"]})
    post_steps.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                       "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False,
                       "separate_folder": False, "print_log": False})
    dims = spec["network"]["spatial_dims"]
    window = {"roi_size": inf["roi_size"] + ([1] if dims == 2 else []), "sw_batch_size": inf["sw_batch_size"],
              "overlap": inf["overlap"], "mode": inf["blend"], "sigma_scale": inf["sigma_scale"],
              "padding_mode": "constant"}
    if mirrored or dims == 2:  # TTA: the mean softmax over the flips, blended; 2D: windows of depth 1
        inferer = {"_target_": f"{MODULE}.MedsegInferer", "tta": inf["tta"], "tta_axes": inf["tta_axes"],
                   "spatial_dims": dims, **window}
    else:
        inferer = {"_target_": "SlidingWindowInferer", **window}
    datalist = ("$[{'image': f} for f in sorted(glob.glob(@dataset_dir + '/*.nii.gz') + "
                "glob.glob(@dataset_dir + '/*.nii'))]") if channels == 1 else \
        {"_target_": f"{MODULE}.case_list", "dataset_dir": "@dataset_dir", "channels": channels}
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": "$os.path.dirname(os.path.dirname(__import__('scripts.medseg_bundle').__file__))",
        "dataset_dir": "input",
        "output_dir": "output",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "datalist": datalist,
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post_steps},
        "segment": {"_target_": f"{MODULE}.segment_all", "dataset": "@dataset", "network": "@network",
                    "inferer": "@inferer", "postprocessing": "@postprocessing", "device": "@device"},
        "run": ["@segment"],
    }


def metadata(ckpt: Checkpoint, spec: dict) -> dict:
    import monai
    import numpy
    import torch

    config = ckpt.config
    roi = spec["inference"]["roi_size"]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medseg {spec['medseg_version']}"},
        "monai_version": monai.__version__,
        "pytorch_version": str(torch.__version__).split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "scipy": _version("scipy")},
        "name": "medseg lesion segmentation",
        "task": "3D lesion segmentation",
        "description": "A medseg U-Net with its preprocessing and post-processing; masks in the source geometry.",
        "authors": "medseg",
        "copyright": "see LICENSE",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield" if spec["preprocess"]["normalisation"][0]
                                 ["scheme"] in ("window", "ct") else "magnitude", "modality": "CT" if config.data.channels
                                 in ([], ["CT"]) else ",".join(config.data.channels),
                                 "num_channels": config.in_channels, "spatial_shape": roi,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(n): name for n, name in enumerate(config.channel_names)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": config.num_classes,
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True,
                                 "channel_def": {str(v): k for k, v in spec["labels"].items()}}},
        },
        "medseg": spec,
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def readme(spec: dict) -> str:
    pre, inf, post = spec["preprocess"], spec["inference"], spec["postprocess"]
    return f"""# medseg lesion segmentation (MONAI bundle)

Exported by medseg {spec['medseg_version']} from checkpoint sha256 `{spec['checkpoint_sha256']}`.

## Run

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

segments every case of `IN` into `OUT/<case>_seg.nii.gz` (uint8, labels {spec['labels']}), in each scan's own
geometry (shape and affine). Channels: {spec['channels']}; {"one `IN/<case>.nii.gz` per case" if len(spec['channels']) == 1
else "per case `IN/<case>_0000.nii.gz` ... one file per channel in this order, all on channel 0's grid "
"(the mask is named after the `_0000` file), or one 4D NIfTI"}. Needs torch, MONAI, nibabel and scipy.
Run from another folder with `--bundle_root THIS_FOLDER` if `scripts` is not found.

## What it does

- orientation {pre['orientation']}, spacing {pre['spacing']} mm (Gaussian anti-aliasing first, then linear,
  border padding), intensity per channel {pre['normalisation']}, crop to the body ({pre['foreground']}):
  {pre['crop_foreground']} (margin {pre['crop_margin']} voxels);
- sliding window {inf['roi_size']}, overlap {inf['overlap']}, {inf['blend']} blending (sigma = roi / 8);
  test-time augmentation {inf['tta']} (mirror: the mean softmax over every flip of the axes
  {inf['tta_axes']}, null: all);
- binary models: softmax, inverted back to the source grid (linear), then threshold {inf['threshold']}
  (null: > 0.5); more classes: the argmax on the model's grid, inverted at the nearest voxel;
- components of label values {post['restrict_to_body']} mostly outside the body (largest component of
  channel 0's crop-to-body voxels) removed; components under {post['min_component_mm3']} mm³ removed;
  largest component only for label values {post['keep_largest']}.

`scripts/medseg_bundle.py` holds the steps MONAI has no transform for (anti-aliasing, per-channel and body
z-score normalisation, mirroring, the decision, component rules) and the loop. `configs/metadata.json` key `medseg` holds the full spec.
"""


LICENSE_TEXT = """Apache License 2.0 applies to the medseg code in scripts/ and to these configs
(https://www.apache.org/licenses/LICENSE-2.0). The model weights in models/ are licensed by whoever trained
them; check with them before redistributing.
"""


def write_bundle(ckpt: Checkpoint, target: Exportable, spec: dict, out: Path, overwrite: bool = False) -> float:
    """Build the bundle in a partial folder beside ``out``, verify its network, rename it into place."""
    problems = refusals(ckpt.config)
    if problems:
        raise ConfigError("export --format bundle: this model cannot be represented as a MONAI bundle: "
                          + "; ".join(problems) + ". Nothing was written")
    partial = make_partial_dir(out)
    try:
        (partial / "configs").mkdir()
        (partial / "models").mkdir()
        (partial / "scripts").mkdir()
        (partial / "docs").mkdir()
        (partial / "configs" / "inference.json").write_text(json.dumps(inference_config(ckpt.config, spec),
                                                                       indent=2) + "\n")
        (partial / "configs" / "metadata.json").write_text(json.dumps(metadata(ckpt, spec), indent=2) + "\n")
        (partial / "scripts" / "__init__.py").write_text("")
        shutil.copyfile(BUNDLE_CODE, partial / "scripts" / "medseg_bundle.py")
        (partial / "docs" / "README.md").write_text(readme(spec))
        (partial / "LICENSE").write_text(LICENSE_TEXT)
        diff = write_torchscript(target, spec, partial / "models" / "model.ts")
        if out.is_dir() and overwrite:
            shutil.rmtree(out)
        elif out.exists() and overwrite:
            out.unlink()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return diff
