"""Datasets as users ship them reach train → segment → evaluate: nnU-Net v2 (.nii.gz and .nrrd endings),
MSD 4D, and a two-series DICOM study; the masks are on each source's grid (shape and affine in world
coordinates) and agree with the known labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.batch import segment_folder
from pipeline.config import load_config
from pipeline.evaluate import evaluate_folder
from pipeline.io.reader import ScanReader
from pipeline.training import train
from tests.dataset.builders import write_msd_4d, write_nnunet_v2

pytestmark = pytest.mark.slow

SHAPE = (24, 20, 12)
TRAIN = [f"case_{n:03d}" for n in range(4)]
TEST = ["test_000", "test_001"]


def tiny_config(root: Path, out: Path, *extra):
    return load_config(None, [
        f"data.root={root}", f"train.out_dir={out}", "train.device=cpu", "data.val_fraction=0.25",
        "model.features=8", "model.depth=2", "sampling.patch_size=[16, 16, 8]", "sampling.batch_size=2",
        "sampling.samples_per_volume=2", "inference.roi_size=[16, 16, 8]", "inference.min_component_mm3=0",
        "preprocess.spacing=null", "preprocess.crop_foreground=false", "preprocess.intensity.mode=auto",
        "train.epochs=6", "train.steps_per_epoch=10", "train.val_every=6", "train.lr=0.01", "train.warmup_epochs=0",
        "augment.rotate_prob=0", "augment.scale_prob=0", "augment.noise_prob=0",
        *extra,
    ])


def nnunet(root: Path, ending: str) -> None:
    write_nnunet_v2(root, TRAIN, channels=2, ending=ending, shape=SHAPE)
    write_nnunet_v2(root, TEST, channels=2, ending=ending, shape=SHAPE, split="Ts")
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = len(TRAIN)  # the Ts call rewrote it
    (root / "dataset.json").write_text(json.dumps(meta))


def msd(root: Path) -> None:
    write_msd_4d(root / "tr", TRAIN, shape=SHAPE)
    write_msd_4d(root / "ts", TEST, shape=SHAPE)
    (root / "tr").rename(root / "ds")
    (root / "ts" / "imagesTr").rename(root / "ds" / "imagesTs")
    (root / "ts" / "labelsTr").rename(root / "ds" / "labelsTs")


def labels_in_nifti(labels_dir: Path, out: Path) -> Path:
    """``evaluate`` reads NIfTI references: the labels as NIfTI with their own affine (ScanReader's RAS)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(labels_dir.iterdir()):
        loaded = ScanReader().read(str(path))
        case = path.name.split(".")[0]
        image = nib.Nifti1Image(np.asarray(loaded.array).astype(np.uint8), loaded.affine)
        nib.save(image, str(out / f"{case}.nii.gz"))
    return out


@pytest.mark.parametrize("layout", ["nnunet-nii.gz", "nnunet-nrrd", "msd-4d"])
def test_layout_trains_segments_and_evaluates(tmp_path, layout):
    if layout.startswith("nnunet"):
        root = tmp_path / "ds"
        nnunet(root, "." + layout.split("-", 1)[1])
    else:
        msd(tmp_path)
        root = tmp_path / "ds"

    result = train(tiny_config(root, tmp_path / "model"))

    from pipeline.model.checkpoint import load_checkpoint

    config = load_checkpoint(result.best).config
    assert config.data.channels == ["FLAIR", "T1c"] if layout.startswith("nnunet") else ["FLAIR", "T1w"]
    assert config.data.labels == {"background": 0, "edema": 1, "tumour": 2}
    cases = segment_folder(root / "imagesTs", tmp_path / "masks", result.best, device="cpu", qc=False)
    assert sorted((c.case_id, c.status) for c in cases) == [(t, "done") for t in TEST], [c.error for c in cases]
    references = labels_in_nifti(root / "labelsTs", tmp_path / "refs")
    for case in TEST:
        mask = nib.load(str(tmp_path / "masks" / f"{case}_seg.nii.gz"))
        reference = nib.load(str(references / f"{case}.nii.gz"))
        assert mask.shape == reference.shape
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)  # the same world grid
    rows, summary = evaluate_folder(tmp_path / "masks", references, tmp_path / "eval")
    assert len(rows) == len(TEST) * 2  # one row per case and label
    assert summary["mean_dice"] > 0.7, summary
