"""Segment NIfTI scans with a ``medseg export --format onnx`` file alone: nibabel, numpy, scipy, onnxruntime.

    python onnx_segment_example.py MODEL.onnx IN_DIR OUT_DIR     # OUT_DIR/<case>_seg.nii.gz, source geometry

Everything but the weights comes from the model's ``medseg`` metadata (3D or 2D, same padding). Several input
channels: ``IN_DIR/<case>_0000.nii.gz``, ``<case>_0001.nii.gz``... (on channel 0's grid), or one 4D NIfTI.
"""
import itertools
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
from scipy import ndimage


def normalise(x, n):  # one channel, as medseg's preprocessing (spec preprocess.normalisation)
    if n["scheme"] == "window":
        return (np.clip(x, n["low"], n["high"]) - n["low"]) / (n["high"] - n["low"])
    if n["scheme"] == "ct":
        return (np.clip(x, *n["clip"]) - n["mean"]) / max(n["std"], 1e-8)
    body = x > x.min()
    v = x[body] if n["scheme"] == "zscore_body" and body.sum() >= n["min_body_fraction"] * x.size else x
    return (x - v.mean()) / max(v.std(ddof=1) if n["scheme"] == "zscore_body" else v.std(), 1e-8)


def spacing_grid(shape, affine, pixdim):  # MONAI Spacingd's output grid: (shape, affine)
    pixdim = np.where(np.abs(np.sqrt((affine[:3, :3] ** 2).sum(0)) - pixdim) <= 1e-3,
                      np.sqrt((affine[:3, :3] ** 2).sum(0)), pixdim)
    zs = np.linalg.cholesky(affine[:3, :3].T @ affine[:3, :3]).T
    grid = np.eye(4)
    grid[:3, :3] = affine[:3, :3] @ np.linalg.inv(zs) @ np.diag(np.sign(np.diag(zs)) * pixdim)
    corners = np.vstack([np.array(list(itertools.product(*[(0, s - 1) for s in shape]))).T, np.ones(8)])
    dist = np.linalg.solve(grid, affine) @ corners
    out_shape = np.round(np.ptp(dist[:3] / dist[3], axis=1) + 1).astype(int)
    first = [i for i in range(8) if np.allclose(np.min(dist[:3] - dist[:3, i:i + 1], 1), 0, rtol=1e-3)]
    grid[:3, 3] = (affine @ corners)[:3, first[0]] if first else (
        affine[:3, :3] @ (np.asarray(shape) / 2) + affine[:3, 3] - grid[:3, :3] @ (out_shape / 2))
    return tuple(int(v) for v in out_shape), grid


def resample(x, ratio, to_source, shape):  # anti-aliasing before downsampling, then linear, border padding
    if np.any(np.maximum(0, (ratio - 1) / 2) > 0.05):
        x = ndimage.gaussian_filter(x, np.maximum(0, (ratio - 1) / 2), mode="nearest")
    return ndimage.affine_transform(x, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=1, mode="nearest")


def foreground(x, rule):  # x: (C, ...) normalised; the voxels crop-to-body keeps
    if rule == "any_channel_above_its_min":
        return (x > x.reshape(len(x), -1).min(1).reshape((-1,) + (1,) * (x.ndim - 1))).any(0, keepdims=True)
    return x > 0 if rule == "above_zero" else x > x.min()


def among(components, chosen):  # the voxels of the components (not the background, 0) where `chosen` holds
    index = np.flatnonzero(chosen)
    return np.isin(components, index[index != 0])


def largest(mask):
    lab, n = ndimage.label(mask, np.ones((3, 3, 3)))
    return mask if n <= 1 else lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1


def softmax(y, axis):
    e = np.exp(y - y.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def gaussian(roi, scale, floor):  # MONAI's importance map: centred, peak 1, at least `floor`
    axes = [np.exp(-((np.arange(r) - (r - 1) / 2) ** 2) / (2 * (r * scale) ** 2)) for r in roi]
    w = np.einsum("i,j,k->ijk", *axes)
    return np.maximum(w, max(w.min(), floor))


def sliding_window(x, run, roi, overlap, weights, probabilities):  # x: (C, X, Y, Z) -> (K, X, Y, Z)
    pad = [(0, 0)] + [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, x.shape[1:])]
    x = np.pad(x, pad)
    steps = [r if s == r else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, x.shape[1:])]
    starts = [sorted({min(i * t, s - r) for i in range(int(np.ceil((s - r) / t)) + 1)})
              for r, s, t in zip(roi, x.shape[1:], steps)]
    out, norm = None, np.zeros(x.shape[1:], np.float32)
    for corner in itertools.product(*starts):
        box = tuple(slice(c, c + r) for c, r in zip(corner, roi))
        y = run(x[(slice(None),) + box][None])[0]
        out = np.zeros((y.shape[0],) + x.shape[1:], np.float32) if out is None else out
        out[(slice(None),) + box] += y * weights
        norm[box] += weights
    out = out / norm
    if not probabilities:
        out = softmax(out, 0)
    return out[(slice(None),) + tuple(slice(p[0], s - p[1]) for p, s in zip(pad[1:], x.shape[1:]))]


def segment(paths, session, spec):  # paths: one file per channel (or one 4D file)
    pre, inf, post = spec["preprocess"], spec["inference"], spec["postprocess"]
    scan = nib.load(paths[0])
    volumes = [np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths]
    volumes = [v[..., c] for v in volumes for c in range(v.shape[3])] if volumes[0].ndim == 4 else volumes
    source = volumes[0]
    grids = [(nib.load(p).shape[:3], nib.load(p).affine) for p in paths]
    if len(volumes) != spec["network"]["in_channels"] or any(
            s != grids[0][0] or not np.allclose(a, grids[0][1], atol=1e-3) for s, a in grids):
        sys.exit(f"{paths}: expected {spec['network']['in_channels']} channel(s) {spec['channels']} on channel 0's "
                 f"grid, found {len(volumes)}: give one file per channel (<case>_0000 ...) or one 4D NIfTI")
    ornt = nib.orientations.ornt_transform(nib.io_orientation(scan.affine),
                                           nib.orientations.axcodes2ornt(tuple(pre["orientation"])))
    affine = scan.affine @ nib.orientations.inv_ornt_aff(ornt, source.shape)
    oriented = [nib.orientations.apply_orientation(v, ornt) for v in volumes]
    oriented_shape = oriented[0].shape
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    target = spacing if pre["spacing"] is None else np.asarray(pre["spacing"], dtype=np.float64)
    full, grid = (oriented_shape, affine) if pre["spacing"] is None else spacing_grid(oriented_shape, affine, target)
    to_source = np.linalg.solve(affine, grid)  # grid voxel -> oriented source voxel
    x = np.stack([normalise(resample(v, target / spacing, to_source, full), n)
                  for v, n in zip(oriented, pre["normalisation"])])
    box = tuple(slice(0, s) for s in full)
    if pre["crop_foreground"] and foreground(x, pre["foreground"]).any():
        hits = np.nonzero(foreground(x, pre["foreground"]).any(0))
        m = pre["crop_margin"]
        box = tuple(slice(max(h.min() - m, 0), min(h.max() + 1 + m, s)) for h, s in zip(hits, full))
    name, dims = session.get_inputs()[0].name, spec["network"]["spatial_dims"]
    roi = inf["roi_size"] + [1] * (3 - dims)  # a 2D model: windows of depth 1, run as 2D images
    axes = [2 + a for a in (inf["tta_axes"] if inf["tta_axes"] is not None else range(dims))]
    flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]

    def net(w):
        w = np.ascontiguousarray(w if dims == 3 else w[..., 0], np.float32)
        return session.run(None, {name: w})[0] if dims == 3 else session.run(None, {name: w})[0][..., None]

    def run(w):  # a window batch -> logits, or with TTA the mean softmax over the flips
        if inf["tta"] == "none":
            return net(w)
        return np.mean([softmax(np.flip(net(np.flip(w, f)), f), 1) for f in flips], axis=0)
    weights = gaussian(roi, inf["sigma_scale"], inf["weight_floor"]) if inf["blend"] == "gaussian" else 1.0
    probs = sliding_window(x[(slice(None),) + box], run, roi, inf["overlap"], weights, inf["tta"] != "none")
    on_full = np.zeros((1,) + full, np.float32)  # back to the source grid: zero outside the crop, linear
    binary = probs.shape[0] == 2
    on_full[(0,) + box] = probs[1].astype(np.float16) if binary else probs.argmax(0)  # segment keeps P as float16
    to_grid = np.linalg.inv(to_source)
    back = ndimage.affine_transform(on_full[0], to_grid[:3, :3], to_grid[:3, 3], output_shape=oriented_shape,
                                    order=1 if binary else 0, mode="nearest")
    t = inf["threshold"]
    labels = ((back >= t) if t is not None else (back > 0.5)) if binary else np.rint(back)
    labels = nib.orientations.apply_orientation(labels.astype(np.uint8), nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(tuple(pre["orientation"])), nib.io_orientation(scan.affine)))
    if post["restrict_to_body"]:
        body = largest(foreground(normalise(source, pre["normalisation"][0])[None], pre["foreground"])[0])
        for value in post["restrict_to_body"]:
            lab, n = ndimage.label(labels == value, np.ones((3, 3, 3)))
            inside = np.bincount(lab.ravel(), weights=body.ravel(), minlength=n + 1)
            labels[among(lab, inside * 2 < np.bincount(lab.ravel(), minlength=n + 1))] = 0
    min_voxels = post["min_component_mm3"] / abs(np.linalg.det(scan.affine[:3, :3]))
    for value in [v for v in np.unique(labels) if v and min_voxels > 0]:
        lab, n = ndimage.label(labels == value, np.ones((3, 3, 3)))
        labels[among(lab, np.bincount(lab.ravel()) < min_voxels)] = 0
    for value in post["keep_largest"]:
        labels[(labels == value) & ~largest(labels == value)] = 0
    return nib.Nifti1Image(labels, scan.affine)


def cases(in_dir, channels):  # case name -> its files: one per channel (<case>_000N), or one (4D) file
    out = {}
    for path in sorted(Path(in_dir).glob("*.nii*")):
        name = path.name.split(".nii")[0]
        is_channel = channels > 1 and name[-5:-4] == "_" and name[-4:].isdigit()
        out.setdefault(name[:-5] if is_channel or name.endswith("_0000") else name, []).append(str(path))
    return out


def main(model, in_dir, out_dir):
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    spec = json.loads(session.get_modelmeta().custom_metadata_map["medseg"])
    net = spec["network"]
    if net["padding"] != "same":
        sys.exit(f"this example handles same-padding models, not {net}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for case, paths in cases(in_dir, net["in_channels"]).items():
        nib.save(segment(paths, session, spec), str(Path(out_dir) / f"{case}_seg.nii.gz"))
        print(f"{case}: written")


if __name__ == "__main__":
    main(*sys.argv[1:4])
