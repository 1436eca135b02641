"""A 2-channel model beats a 1-channel one where one channel alone cannot separate the classes.

The MR phantom (`medseg synth --kind mr`) draws oedema bright on FLAIR only and an enhancing core bright
on T1c only (FLAIR shows core and oedema alike). The same small network, trained the same way on the
same cases, once on FLAIR + T1c and once on FLAIR alone, is evaluated on held-out cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.batch import segment_folder
from pipeline.config import load_config
from pipeline.evaluate import evaluate_folder
from pipeline.synth import synthesize_mr
from pipeline.training import train
from tests.helpers import torch_threads

pytestmark = pytest.mark.slow


def flair_only(root: Path, out: Path) -> Path:
    """The same dataset with channel 0 (FLAIR) alone."""
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "FLAIR"}
    for split in ("imagesTr", "imagesTs"):
        (out / split).mkdir(parents=True)
        for path in (root / split).glob("*_0000.nii.gz"):
            shutil.copy(path, out / split / path.name)
    for split in ("labelsTr", "labelsTs"):
        shutil.copytree(root / split, out / split)
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def train_and_score(root: Path, work: Path) -> tuple[float, float]:
    """(mean Dice over cases and both classes, mean core Dice over the test cases that have a core)."""
    config = load_config(None, [
        f"data.root={root}", f"train.out_dir={work / 'model'}", "train.device=cpu", "data.val_fraction=0.2",
        "model.features=8", "model.depth=3", "sampling.patch_size=[32, 32, 16]", "sampling.batch_size=2",
        "sampling.samples_per_volume=2", "sampling.pos_ratio=3", "inference.roi_size=[32, 32, 16]",
        "inference.min_component_mm3=0", "preprocess.spacing=[2.0, 2.0, 4.0]", "preprocess.intensity.mode=auto",
        "train.epochs=30", "train.steps_per_epoch=10", "train.val_every=30", "train.lr=0.01",
        "train.warmup_epochs=0", "augment.rotate_prob=0", "augment.scale_prob=0",
    ])
    best = train(config).best
    segment_folder(root / "imagesTs", work / "masks", best, device="cpu", qc=False)
    rows, summary = evaluate_folder(work / "masks", root / "labelsTs", work / "eval")
    with_core = {path.name.split(".")[0] for path in (root / "labelsTs").glob("*.nii.gz")
                 if (np.asarray(nib.load(str(path)).dataobj) == 2).any()}
    core = [row.dice for row in rows if row.label == 2 and row.case_id in with_core]
    return float(summary["mean_dice"]), float(np.mean(core))


def test_two_channels_beat_one(tmp_path, capsys):
    root = synthesize_mr(tmp_path / "mr", cases=14, seed=3, test_fraction=0.3, dicom_test_cases=0,
                         shape=(48, 48, 16), spacing=(2.0, 2.0, 4.0))
    one = flair_only(root, tmp_path / "flair")

    with torch_threads(2):  # fixed, so the figures do not move with OMP_NUM_THREADS (float sums differ)
        two_channels, two_core = train_and_score(root, tmp_path / "two")
        one_channel, one_core = train_and_score(one, tmp_path / "one")

    with capsys.disabled():
        print(f"\nmean Dice over oedema and core: FLAIR + T1c {two_channels:.3f}, FLAIR alone {one_channel:.3f}; "
              f"core Dice where there is a core: {two_core:.3f} vs {one_core:.3f}")
    assert two_channels > one_channel
    assert two_core > one_core + 0.1  # FLAIR shows the core as oedema: only T1c tells them apart
