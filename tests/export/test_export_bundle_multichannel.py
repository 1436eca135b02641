"""Bundle and ONNX exports of the models users train: two MR channels (FLAIR, T1c from
``pipeline.synth.synthesize_mr``), ``intensity.mode: auto`` (body z-score per channel), ``tta: mirror``
and ``restrict_to_body``, held to ``segment``'s masks in the source geometry. Also the CT scheme of
``auto`` (clip + dataset z-score) against medseg's own preprocessing, and the bundle's case listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.export import export_model
from pipeline.infer import Segmenter
from tests.export.conftest import dice
from tests.helpers import tiny_config_overrides, torch_threads

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "export" / "onnx_segment_example.py"
SHAPE, SPACING = (48, 48, 16), (3.0, 3.0, 6.0)
TRAIN_SHAPE = (40, 40, 16)  # the preprocessed (3.3 mm, cropped) cases, padded/cut to one size
OVERRIDES = (
    "model.features=4",
    "data.channels=[FLAIR, T1c]",
    "preprocess.intensity.mode=auto",
    "preprocess.spacing=[3.3, 3.3, 6.0]",
    "preprocess.crop_foreground=true",
    "inference.roi_size=[24, 24, 8]",
    "inference.sw_batch_size=2",
    "inference.tta=mirror",
    "inference.min_component_mm3=40",
    "postprocess.restrict_to_body=[lesion]",
)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory):
    """A tiny 2-channel U-Net fitted (60 Adam steps) to all 8 synthetic FLAIR + T1c cases as medseg
    preprocesses them (oedema and core as one ``lesion`` class), so its masks are non-empty; the 4 imagesTs cases
    are the ones segmented: channel files, one case as a 4D NIfTI instead."""
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint
    from pipeline.synth import synthesize_mr

    root = tmp_path_factory.mktemp("export-mr")
    data = synthesize_mr(root / "mr", cases=8, seed=0, dicom_test_cases=0, test_fraction=0.5, shape=SHAPE,
                         spacing=SPACING)
    from pipeline.io.channels import Channels
    from pipeline.transforms.preprocess import preprocess_transforms

    config = load_config(None, tiny_config_overrides(*OVERRIDES))
    torch.manual_seed(0)
    network = build_model(config.model, in_channels=2, out_channels=config.num_classes)
    prepare = preprocess_transforms(config.preprocess, label_key="label", num_classes=3, channels=["FLAIR", "T1c"])
    xs, ys = [], []
    for label in sorted(data.glob("labels*/*.nii.gz")):  # medseg's own preprocessing (grid, z-score, crop)
        images = [str(label.parent.parent / f"images{label.parent.name[6:]}" /
                      label.name.replace(".nii.gz", f"_000{c}.nii.gz")) for c in range(2)]
        item = prepare({"image": Channels(tuple(images)), "label": str(label)})
        image, target = item["image"].as_tensor(), item["label"].as_tensor()[0] > 0
        pad = [(0, 0)] + [(0, max(0, s - n)) for s, n in zip(TRAIN_SHAPE, image.shape[1:])]
        xs.append(np.pad(image.numpy(), pad, mode="edge")[(slice(None),) + tuple(slice(0, s) for s in TRAIN_SHAPE)])
        ys.append(np.pad(target.numpy(), pad[1:])[tuple(slice(0, s) for s in TRAIN_SHAPE)])
    x, y = torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()
    optimiser = torch.optim.Adam(network.parameters(), lr=0.03)
    with torch_threads(1):
        for _ in range(60):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(x), y, weight=torch.tensor([1.0, 10.0]))
            loss.backward()
            optimiser.step()
    ckpt = save_checkpoint(root / "best.pt", Checkpoint(config=config, state_dict=network.state_dict(), epoch=1))
    cases = root / "cases"
    cases.mkdir()
    tests = sorted((data / "imagesTs").glob("*_0000.nii.gz"))
    for first in tests[:-1]:
        for c in range(2):
            (cases / first.name.replace("_0000", f"_000{c}")).write_bytes(
                first.with_name(first.name.replace("_0000", f"_000{c}")).read_bytes())
    last = tests[-1]  # one case as a 4D NIfTI (the channels on the 4th axis)
    volumes = [nib.load(str(last.with_name(last.name.replace("_0000", f"_000{c}")))) for c in range(2)]
    nib.save(nib.Nifti1Image(np.stack([np.asarray(v.dataobj) for v in volumes], axis=-1), volumes[0].affine),
             str(cases / last.name.replace("_0000", "")))
    return ckpt, cases


@pytest.fixture(scope="module")
def mr_reference(mr_model):
    """``segment``'s labels per case (name without _0000): the reference. One held-out case has no lesion
(an empty mask must stay empty); the others are non-empty, so Dice means something."""
    from pipeline.io.channels import Channels

    ckpt, cases = mr_model
    segmenter = Segmenter.from_checkpoint(ckpt, device="cpu", backend="torch")
    out = {}
    with torch_threads(1):
        for path in sorted(cases.glob("*.nii.gz")):
            name = path.name.removesuffix(".nii.gz")
            if name.endswith("_0001"):
                continue
            source = Channels((str(path), str(path).replace("_0000", "_0001"))) if name.endswith("_0000") \
                else str(path)
            out[name.removesuffix("_0000")] = segmenter.segment(source)
    sizes = {k: int(r.labels.sum()) for k, r in out.items()}
    assert len(out) == 4 and sum(sizes.values()) > 150 and sorted(sizes.values())[1] > 20, sizes
    print("segment lesion voxels", sizes)
    return out


def _check(masks: dict, reference: dict) -> dict:
    scores = {}
    for case, ref in reference.items():
        mask = masks[case]
        assert mask.shape == ref.labels.shape  # the source geometry: shape and affine
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-5)
        labels = np.asarray(mask.dataobj)
        scores[case] = dice(labels, ref.labels)
    assert min(scores.values()) >= 0.99, scores
    return scores


@pytest.mark.slow
def test_bundle_run_two_channel_auto_mirror_body(mr_model, mr_reference, tmp_path):
    ckpt, cases = mr_model
    bundle = export_model(ckpt, tmp_path / "bundle", "bundle").path
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["inferer"]["_target_"] == "scripts.medseg_bundle.MedsegInferer"
    assert [t["_target_"].split(".")[-1] for t in config["preprocessing"]["transforms"]][-3:] == \
        ["Spacingd", "NormalizeChannelsd", "CropForegroundd"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "FLAIR", "1": "T1c"}
    out = tmp_path / "masks"
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--dataset_dir", str(cases),
                          "--output_dir", str(out)], capture_output=True, text=True, env=_env(), timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    masks = {p.name.removesuffix("_seg.nii.gz").removesuffix("_0000"): nib.load(str(p)) for p in out.iterdir()}
    assert sorted(masks) == sorted(mr_reference)
    assert all(m.get_data_dtype() == np.uint8 for m in masks.values())
    print("bundle dice", _check(masks, mr_reference))


@pytest.mark.slow
def test_onnx_example_two_channel_auto_mirror_body(mr_model, mr_reference, tmp_path):
    ckpt, cases = mr_model
    model = export_model(ckpt, tmp_path / "model.onnx", "onnx").path
    out = tmp_path / "masks"
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), str(cases), str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    masks = {p.name.removesuffix("_seg.nii.gz"): nib.load(str(p)) for p in out.iterdir()}
    assert sorted(masks) == sorted(mr_reference)
    print("onnx dice", _check(masks, mr_reference))


CORE_MARGIN = 2.0  # class 2 where the lesion logit margin (l1 - l0) exceeds this; class 1 below it


@pytest.fixture(scope="module")
def three_class_model(mr_model):
    """The same network with a 3-class head built from its 2-class one (no training): background as is,
    ``rim`` where the lesion wins by at most CORE_MARGIN logits, ``core`` beyond (l2 = l0 + 2 (l1 - l0) -
    margin), so the many-class decision (argmax on the model's grid, nearest voxel back) is exercised."""
    from dataclasses import replace

    from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    ckpt_path, cases = mr_model
    ckpt = load_checkpoint(ckpt_path)
    state = {k: v.clone() for k, v in ckpt.state_dict.items()}
    w, b = state["head.weight"], state["head.bias"]
    state["head.weight"] = torch.cat([w, 2 * w[1:2] - w[0:1]])
    state["head.bias"] = torch.cat([b, (2 * b[1] - b[0] - CORE_MARGIN)[None]])
    config = replace(ckpt.config, data=replace(ckpt.config.data, labels={"background": 0, "rim": 1, "core": 2}),
                     postprocess=replace(ckpt.config.postprocess, restrict_to_body=["rim", "core"],
                                         keep_largest=["core"]))
    path = save_checkpoint(ckpt_path.with_name("three.pt"), Checkpoint(config=config, state_dict=state, epoch=1))
    from pipeline.io.channels import Channels

    segmenter = Segmenter.from_checkpoint(path, device="cpu", backend="torch")
    reference = {}
    with torch_threads(1):
        for path0 in sorted(cases.glob("*_0000.nii.gz")):
            source = Channels((str(path0), str(path0).replace("_0000", "_0001")))
            reference[path0.name.removesuffix("_0000.nii.gz")] = segmenter.segment(source).labels
    sizes = {k: [int((r == v).sum()) for v in (1, 2)] for k, r in reference.items()}
    assert sum(s[0] for s in sizes.values()) > 30 and sum(s[1] for s in sizes.values()) > 30, sizes
    print("segment voxels (rim, core)", sizes)
    return path, cases, reference


@pytest.mark.slow
def test_bundle_and_onnx_three_class_decision(three_class_model, tmp_path):
    path, cases, reference = three_class_model
    bundle = export_model(path, tmp_path / "bundle", "bundle").path
    channel_files = tmp_path / "in"  # the channel-file cases (the 4D one is covered above)
    channel_files.mkdir()
    for f in cases.glob("*_000?.nii.gz"):
        (channel_files / f.name).write_bytes(f.read_bytes())
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--dataset_dir", str(channel_files),
                          "--output_dir", str(tmp_path / "b")], capture_output=True, text=True, env=_env(),
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    model = export_model(path, tmp_path / "model.onnx", "onnx").path
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), str(channel_files), str(tmp_path / "o")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    scores = {}
    for case, ref in reference.items():
        for kind, mask in (("bundle", tmp_path / "b" / f"{case}_0000_seg.nii.gz"),
                           ("onnx", tmp_path / "o" / f"{case}_seg.nii.gz")):
            labels = np.asarray(nib.load(str(mask)).dataobj)
            assert labels.shape == ref.shape
            scores[kind, case] = [dice(labels == v, ref == v) for v in (1, 2)]
    print("three-class dice (rim, core)", scores)
    assert min(min(s) for s in scores.values()) >= 0.99, scores
