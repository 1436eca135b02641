"""A tiny end-to-end run: synthesize → train → segment (NIfTI and DICOM) → evaluate, and resume."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import evaluate_folder, load_config, segment_folder, synthesize, train
from pipeline.cli import main
from pipeline.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TINY = [
    "synth.cases=6",
    "synth.shape=[48, 48, 16]",
    "synth.dicom_test_cases=1",
    "synth.test_fraction=0.34",
    "preprocess.spacing=[1.6, 1.6, 2.5]",
    "model.features=4",
    "model.depth=3",
    "sampling.patch_size=[16, 16, 8]",
    "sampling.samples_per_volume=1",
    "inference.roi_size=[16, 16, 8]",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.val_every=1",
    "train.warmup_epochs=0",
]


@pytest.fixture
def tiny(tmp_path):
    config = load_config("configs/demo.yaml", TINY + [f"data.root={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'model'}"])
    s = config.synth
    root = synthesize(config.data.root, cases=s.cases, seed=s.seed, test_fraction=s.test_fraction,
                      dicom_test_cases=s.dicom_test_cases, shape=tuple(s.shape), spacing=tuple(s.spacing))
    return config, root


def test_train_segment_evaluate(tiny, tmp_path):
    config, root = tiny
    result = train(config)

    ckpt = torch.load(result.best, weights_only=True)  # self-describing, safe to load
    assert ckpt["config"]["model"]["features"] == 4
    assert ckpt["config"]["data"]["labels"] == {"background": 0, "lesion": 1}
    assert {"torch", "monai", "medseg"} <= set(ckpt["versions"])
    rows = list(csv.DictReader(open(result.log_csv)))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)

    results = segment_folder(root / "imagesTs", tmp_path / "masks", result.best, device="cpu")
    assert {r.status for r in results} == {"done"}
    dataset = json.loads((root / "dataset.json").read_text())
    assert len(results) == dataset["numTest"] == 2
    for r in results:
        mask = nib.load(r.output)
        truth = nib.load(str(root / "labelsTs" / f"{r.case_id}.nii.gz"))
        assert mask.shape == truth.shape
        np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-4)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    cases, summary = evaluate_folder(tmp_path / "masks", root / "labelsTs", tmp_path / "eval")
    assert summary["n_cases"] == 2
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    assert 0.0 <= summary["lesion_recall"] <= 1.0 or np.isnan(summary["lesion_recall"])


def test_resume_continues_from_last_checkpoint(tiny):
    config, _ = tiny
    config.train.epochs = 1
    train(config)
    config.train.epochs = 2
    result = train(config, resume=True)

    rows = list(csv.DictReader(open(result.log_csv)))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert load_checkpoint(result.last).epoch == 2


def test_demo_command_writes_summary(tmp_path, capsys):
    overrides = TINY + [f"data.root={tmp_path / 'data'}"]
    code = main(["demo", "configs/demo.yaml", *overrides, "--out", str(tmp_path / "run"), "-q"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("mean lesion Dice: ")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("mean_dice", "lesion_recall", "lesion_precision", "n_cases", "seconds"):
        assert key in summary
    assert summary["n_cases"] == 2
    assert list((tmp_path / "run" / "model").glob("*.pt"))
    assert len(list((tmp_path / "run" / "masks").glob("*_seg.nii.gz"))) == 2


@pytest.mark.parametrize(
    "variant",
    [
        ["model.spatial_dims=2", "sampling.patch_size=[32, 32]", "inference.roi_size=[32, 32]",
         "sampling.samples_per_volume=2", "model.deep_supervision=true", "augment.elastic_prob=0.5"],
        ["model.padding=valid", "model.depth=2", "sampling.patch_size=[28, 28, 28]", "inference.roi_size=[28, 28, 28]",
         "model.upsample=interp", "model.norm=batch"],
        ["model.deep_supervision=true", "model.depth=3"],
    ],
    ids=["2d-deep-supervision-elastic", "3d-valid-interp-batchnorm", "3d-deep-supervision"],
)
def test_every_variant_trains_and_segments_on_the_source_grid(tiny, tmp_path, variant):
    config, root = tiny
    config = load_config("configs/demo.yaml", TINY + variant + [
        f"data.root={root}", f"train.out_dir={tmp_path / 'variant'}", "train.epochs=1", "train.val_every=1"])

    result = train(config)
    results = segment_folder(root / "imagesTs", tmp_path / "masks", result.best, device="cpu")

    assert [r.status for r in results] == ["done", "done"]
    for r in results:
        truth = nib.load(str(root / "labelsTs" / f"{r.case_id}.nii.gz"))
        mask = nib.load(r.output)
        assert mask.shape == truth.shape
        np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-4)


def test_mr_demo_runs_end_to_end_on_two_sequences(tmp_path, capsys):
    """`medseg demo configs/demo-mr.yaml` (shortened): FLAIR + T1c, NIfTI test cases and a two-series DICOM
    study, masks on channel 0's grid with both classes evaluated."""
    overrides = ["synth.cases=6", "synth.shape=[48, 48, 16]", "synth.dicom_test_cases=1", "synth.test_fraction=0.34",
                 "model.features=4", "model.depth=3", "sampling.patch_size=[16, 16, 8]",
                 "inference.roi_size=[16, 16, 8]", "train.epochs=2", "train.steps_per_epoch=2", "train.val_every=1",
                 f"data.root={tmp_path / 'data'}"]
    code = main(["demo", "configs/demo-mr.yaml", *overrides, "--out", str(tmp_path / "run"), "-q"])

    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["n_failed"] == 0
    config = load_checkpoint(tmp_path / "run" / "model" / "best.pt").config
    assert config.data.channels == ["FLAIR", "T1c"] and config.in_channels == 2
    assert config.data.labels == {"background": 0, "oedema": 1, "core": 2}
    manifest = json.loads((tmp_path / "run" / "masks" / "manifest.json").read_text())["cases"]
    study = [row for row in manifest if row["kind"] == "dicom"]
    assert len(study) == 1 and len(study[0]["channel_series_uids"]) == 2
    for row in manifest:
        truth = nib.load(str(tmp_path / "data" / "labelsTs" / f"{row['case_id']}.nii.gz"))
        mask = nib.load(row["output"])
        assert mask.shape == truth.shape
        np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-4)
    with open(tmp_path / "run" / "evaluation" / "metrics.csv") as handle:
        labels = {row["label"] for row in csv.DictReader(handle)}
    assert labels == {"1", "2"}
