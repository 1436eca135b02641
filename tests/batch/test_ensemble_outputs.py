"""A batch run with an ensemble, mirror TTA and ``--save-probabilities``: the probability file's geometry,
dtype and values, the manifest/sidecar columns, a failed probability file that keeps its mask, and the
resume fingerprint following the models, the TTA and the probabilities asked for."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.batch import segment_folder
from pipeline.batch.report import read_manifest_json
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.io.probabilities import encode_probabilities
from tests.conftest import make_affine, save_nifti
from tests.helpers import Pointwise, tiny_checkpoint, torch_threads

SHAPE = (20, 18, 10)
AFFINE = make_affine("LPS", spacing=(0.8, 0.9, 2.5))


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def config(*extra):
    return load_config(None, ["preprocess.spacing=null", "preprocess.intensity.window=[0, 200]",
                              "preprocess.crop_foreground=false", "inference.roi_size=[16, 16, 8]",
                              "inference.min_component_mm3=0", *extra])


def write_scans(folder, n=1):
    rng = np.random.default_rng(0)
    scans = {}
    for k in range(n):
        hu = rng.uniform(-100, 300, size=SHAPE).astype(np.float32)
        save_nifti(hu, AFFINE, folder / f"scan_{k}_0000.nii.gz")
        scans[f"scan_{k}"] = hu
    return scans


def softmax_expected(nets, hu):
    """Mean over ``nets`` of softmax(w * x + b), x = clip(hu, 0, 200) / 200: (classes, *SHAPE)."""
    x = torch.from_numpy(np.clip(hu, 0, 200) / 200.0).float()[None, None]
    return torch.stack([torch.softmax(net(x), dim=1)[0] for net in nets]).mean(0).detach().numpy()


def run(tmp_path, model, **kwargs):
    return segment_folder(tmp_path / "in", tmp_path / "out", model, device="cpu", qc=False,
                          isolate_reading=False, **kwargs)


def test_binary_probabilities_in_the_source_geometry(tmp_path):
    hu = write_scans(tmp_path / "in")["scan_0"]
    a, b = Pointwise([-4.0, 4.0], [1.0, -1.0]), Pointwise([-1.0, 3.0], [0.2, -1.0])
    seg = Segmenter(a, config("inference.tta=mirror"), "cpu", backend="torch", members=[(b, "")])
    [result] = run(tmp_path, seg, save_probabilities=True)
    assert result.status == "done" and result.probabilities.endswith("scan_0_prob.nii.gz")
    mask, prob = nib.load(tmp_path / "out" / "scan_0_seg.nii.gz"), nib.load(tmp_path / "out" / "scan_0_prob.nii.gz")
    assert prob.shape == mask.shape == SHAPE
    np.testing.assert_allclose(prob.affine, mask.affine, atol=1e-6)
    np.testing.assert_allclose(prob.affine, AFFINE, atol=1e-5)
    values = np.asanyarray(prob.dataobj)
    assert values.dtype == np.uint8
    expected = softmax_expected([a, b], hu)[1]
    assert np.abs(values.astype(int) - np.rint(expected * 255)).max() <= 1  # float16 on the way
    assert len(np.unique(values)) > 100  # a real probability map, not a mask
    decided = np.abs(expected - 0.5) > 2e-3
    labels = np.asanyarray(mask.dataobj)
    assert 0 < labels.sum() < labels.size
    np.testing.assert_array_equal(labels[decided], (expected > 0.5)[decided])


def test_float16_and_many_class_probabilities(tmp_path):
    hu = write_scans(tmp_path / "in")["scan_0"]
    net = Pointwise([3.0, -2.0, 1.0], [0.0, 0.5, -0.2])
    seg = Segmenter(net, config("data.labels={background: 0, a: 1, b: 2}"), "cpu", backend="torch")
    [result] = run(tmp_path, seg, save_probabilities=True, probabilities_dtype="float16")
    assert result.status == "done"
    prob = nib.load(tmp_path / "out" / "scan_0_prob.nii.gz")
    assert prob.shape == SHAPE + (3,)
    np.testing.assert_allclose(prob.affine, AFFINE, atol=1e-5)
    values = np.asanyarray(prob.dataobj)
    assert values.dtype == np.float32  # NIfTI-1 has no float16: float16 values stored as float32
    np.testing.assert_array_equal(values, values.astype(np.float16).astype(np.float32))
    expected = np.moveaxis(softmax_expected([net], hu), 0, -1)
    np.testing.assert_allclose(values, expected, atol=2e-3)
    np.testing.assert_allclose(values.sum(-1), 1.0, atol=5e-3)
    labels = np.asanyarray(nib.load(tmp_path / "out" / "scan_0_seg.nii.gz").dataobj)
    decided = np.sort(expected, axis=-1)[..., -1] - np.sort(expected, axis=-1)[..., -2] > 1e-2
    np.testing.assert_array_equal(labels[decided], expected.argmax(-1)[decided])


def test_encoding():
    p = np.array([0.0, 0.5, 1 / 255, 0.998, 1.0, 1.2, -0.1], dtype=np.float32)
    np.testing.assert_array_equal(encode_probabilities(p, "uint8"), [0, 128, 1, 254, 255, 255, 0])


def test_a_probability_file_that_cannot_be_written_keeps_the_mask(tmp_path, monkeypatch):
    write_scans(tmp_path / "in")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.batch.write_case.write_probabilities", fail)
    [result] = run(tmp_path, Segmenter(Pointwise([1.0, -1.0], [0.0, 0.0]), config(), "cpu"), save_probabilities=True)
    assert result.status == "done" and "No space left" in result.probabilities_error
    assert (tmp_path / "out" / "scan_0_seg.nii.gz").is_file()
    assert not (tmp_path / "out" / "scan_0_prob.nii.gz").exists()
    sidecar = json.loads((tmp_path / "out" / "scan_0_seg.json").read_text())
    assert "No space left" in sidecar["probabilities_error"] and sidecar["probabilities"] == ""


def test_resume_fingerprint_follows_models_tta_and_probabilities(tmp_path):
    write_scans(tmp_path / "in", n=2)
    a = tiny_checkpoint(tmp_path / "a.pt")
    b = tiny_checkpoint(tmp_path / "b.pt", "model.features=3")

    def resumed(model, **kwargs):
        results = run(tmp_path, model, **kwargs)
        assert all(r.status == "done" for r in results)
        return [r.resumed for r in results]

    assert resumed(a) == [False, False]
    assert resumed(a) == [True, True]
    assert resumed([a, b]) == [False, False]  # another model set
    assert resumed([a, b]) == [True, True]
    assert resumed([b, a]) == [False, False]  # the order is part of it (the manifest records it)
    assert resumed([b, a], tta="mirror") == [False, False]
    assert resumed([b, a], tta="mirror") == [True, True]
    assert resumed([b, a], tta="mirror", save_probabilities=True) == [False, False]
    assert resumed([b, a], tta="mirror", save_probabilities=True) == [True, True]
    assert resumed([b, a], tta="mirror", save_probabilities=True, probabilities_dtype="float16") == [False, False]
    (tmp_path / "out" / "scan_1_prob.nii.gz").unlink()  # a missing probability file is redone
    assert resumed([b, a], tta="mirror", save_probabilities=True, probabilities_dtype="float16") == [True, False]


def test_cli_ensemble_with_tta_and_probabilities(tmp_path):
    write_scans(tmp_path / "in", n=2)
    a = tiny_checkpoint(tmp_path / "a.pt")
    b = tiny_checkpoint(tmp_path / "b.pt", "model.features=3")
    code = main(["segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(a), str(b),
                 "input.min_slices=1", "--tta", "mirror", "--save-probabilities", "--device", "cpu", "--no-qc"])
    assert code == 0
    shas = [Segmenter.from_checkpoint(p, device="cpu").model_sha256 for p in (a, b)]
    meta, rows = read_manifest_json(tmp_path / "out" / "manifest.json")
    assert meta["model_sha256s"] == shas and meta["tta"] == "mirror" and meta["models"] == [str(a), str(b)]
    assert meta["model"] == f"{a};{b}"
    for row in rows:
        assert row["model_sha256s"] == shas and row["tta"] == "mirror" and not row["probabilities_error"]
        assert row["probabilities"].endswith(f"{row['case_id']}_prob.nii.gz")
        prob = nib.load(row["probabilities"])
        mask = nib.load(row["output"])
        assert prob.shape == mask.shape and prob.get_data_dtype() == np.uint8
        np.testing.assert_allclose(prob.affine, mask.affine, atol=1e-6)
    with open(tmp_path / "out" / "manifest.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert csv_rows[0]["model_sha256s"] == ";".join(shas) and csv_rows[0]["tta"] == "mirror"
    sidecar = json.loads((tmp_path / "out" / "scan_0_seg.json").read_text())
    assert sidecar["model_sha256s"] == shas and sidecar["models"] == [str(a), str(b)]
    assert sidecar["tta"] == "mirror" and sidecar["config"]["inference"]["tta"] == "mirror"


def test_cli_single_model_keeps_its_columns(tmp_path):
    write_scans(tmp_path / "in")
    a = tiny_checkpoint(tmp_path / "a.pt")
    assert main(["segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(a), "--device", "cpu",
                 "--no-qc"]) == 0
    meta, [row] = read_manifest_json(tmp_path / "out" / "manifest.json")
    sha = Segmenter.from_checkpoint(a, device="cpu").model_sha256
    assert row["model_sha256"] == sha and row["model_sha256s"] == [sha] and row["tta"] == "none"
    assert row["probabilities"] == "" and meta["model"] == str(a)
    assert not (tmp_path / "out" / "scan_0_prob.nii.gz").exists()


def test_no_tta_keeps_the_fingerprint_of_before():
    """Without TTA the settings identity has no TTA keys: output folders of earlier versions still resume."""
    from pipeline.batch.report.fingerprint import settings_identity

    assert "tta" not in settings_identity(config())["inference"]
    mirrored = settings_identity(config("inference.tta=mirror", "inference.tta_axes=[0, 1]"))["inference"]
    assert mirrored["tta"] == "mirror" and mirrored["tta_axes"] == [0, 1]
