"""Segment NIfTI scans with a ``medseg export --format onnx`` file alone, in ~30 statements: MONAI does it.

    python onnx_segment_short.py MODEL.onnx IN_DIR OUT_DIR    # OUT_DIR/<case>_seg.nii.gz: uint8, source grid

Everything comes from the model's ``medseg`` metadata: MONAI transforms preprocess (orientation,
anti-aliasing, spacing, ``window``/``ct``/``zscore`` intensities, crop to body), ``sliding_window_inference``
runs the onnxruntime session with Gaussian (or constant) blending, ``Invertd`` returns to the source grid,
then the threshold/argmax decision and min_component_mm3 (scipy). One channel, 3D, no TTA, no other
post-processing: anything else stops with a message pointing to onnx_segment_example.py (every model).
"""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from scipy import ndimage

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
spec = json.loads(session.get_modelmeta().custom_metadata_map["medseg"])  # everything below comes from it
net, pre, inf, post = (spec[k] for k in ("network", "preprocess", "inference", "postprocess"))
norm, min_mm3, t = pre["normalisation"][0], post["min_component_mm3"], inf["threshold"]
if unhandled := [k for k, v in {"channels > 1": net["in_channels"] > 1, "2D": net["spatial_dims"] == 2,
                                "tta mirror": inf["tta"] != "none", "valid padding": net["padding"] != "same",
                                "zscore_body": norm["scheme"] == "zscore_body",
                                "restrict_to_body": post["restrict_to_body"],
                                "keep_largest": post["keep_largest"]}.items() if v]:
    sys.exit(f"onnx_segment_short.py does not handle {', '.join(unhandled)}: use onnx_segment_example.py")
a = norm.get("clip") or [norm.get("low"), norm.get("high")]  # window: (x - low) / (high - low) in [0, 1]
b = [(v - norm["mean"]) / max(norm["std"], 1e-8) for v in a] if norm["scheme"] == "ct" else [0.0, 1.0]


def antialias(x):  # Gaussian low-pass before downsampling: sigma = max(0, (target / source spacing - 1) / 2)
    s = np.maximum(0, (np.asarray(pre["spacing"]) / np.sqrt((x.affine[:3, :3].numpy() ** 2).sum(0)) - 1) / 2)
    smooth = x.new_tensor(ndimage.gaussian_filter(x[0].numpy(), s, mode="nearest"))[None]
    return x.copy_(smooth) if any(s > 0.05) else x


preprocessing = mt.Compose([step for step in [  # one step a line; None where the spec has none
    mt.LoadImaged("image", reader="NibabelReader", image_only=True),
    mt.EnsureChannelFirstd("image"),
    mt.Orientationd("image", pre["orientation"]),
    mt.Lambdad("image", antialias) if pre["spacing"] else None,
    mt.Spacingd("image", pre["spacing"], mode="bilinear", padding_mode="border") if pre["spacing"] else None,
    mt.NormalizeIntensityd("image") if norm["scheme"] == "zscore" else
    mt.ScaleIntensityRanged("image", *a, *b, clip=True),
    mt.CropForegroundd("image", "image", lambda x: x > (0 if pre["foreground"] == "above_zero" else x.min()),
                       margin=pre["crop_margin"], allow_smaller=True) if pre["crop_foreground"] else None,
] if step])
Path(out := sys.argv[3]).mkdir(parents=True, exist_ok=True)
for path in sorted(Path(sys.argv[2]).glob("*.nii*")):
    d = preprocessing({"image": str(path)})
    y = sliding_window_inference(d["image"][None], inf["roi_size"], inf["sw_batch_size"],
                                 lambda w: w.new_tensor(session.run(None, {net["input"]: w.numpy()})[0]),
                                 inf["overlap"], inf["blend"], inf["sigma_scale"])[0]
    y = y.softmax(0) if len(y) == 2 else y.argmax(0, keepdim=True).float()  # more: argmax, nearest
    back = mt.Invertd("pred", preprocessing, "image", nearest_interp=len(y) == 1)  # to the source grid
    p = back({"image": d["image"], "pred": y})["pred"].numpy()
    labels = (p[0].round() if len(p) == 1 else p[1] > 0.5 if t is None else p[1] >= t).astype(np.uint8)
    affine = np.asarray(d["image"].meta["original_affine"], dtype=np.float64)
    for value in [v for v in np.unique(labels) if v and min_mm3 > 0]:  # 26-connected components < min_mm3
        lab = ndimage.label(labels == value, np.ones((3, 3, 3)))[0]
        labels[(lab > 0) & (np.bincount(lab.ravel())[lab] < min_mm3 / abs(np.linalg.det(affine)))] = 0
    name = path.name.split(".nii")[0].removesuffix("_0000")
    nib.save(nib.Nifti1Image(labels, affine), f"{out}/{name}_seg.nii.gz")
