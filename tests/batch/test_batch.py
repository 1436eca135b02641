"""``segment_folder`` as a batch: manifest rows and statuses on good and bad inputs, lesion statistics
that match the scans, resume by fingerprint, nothing partial after a failure, sidecars, QC pictures,
index page, DICOM SEG, sharding and the merged manifest.

A stand-in network whose output is known (lesion where the scan is brighter than 100 HU) makes the
masks, and so the lesion statistics, predictable."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.batch import exit_code, segment_folder
from pipeline.batch.report import MANIFEST_COLUMNS, read_manifest_json, rebuild_reports
from pipeline.batch.report.lesions import lesion_stats
from pipeline.batch.report.lock import OutputLock, OutputLockedError
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.infer import Segmenter
from pipeline.io.dicom_write import write_dicom_series
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, torch_threads

SHAPE = (24, 24, 12)


class Above100HU(torch.nn.Module):
    """Stand-in network: with the window [0, 200] HU, lesion where the input is above 0.5 (100 HU)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([(0.5 - x) * 20, (x - 0.5) * 20], dim=1)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def segmenter():
    config = load_config(None, ["preprocess.spacing=null", "preprocess.intensity.window=[0, 200]",
                                "preprocess.crop_foreground=false", "inference.roi_size=[16, 16, 8]",
                                "inference.min_component_mm3=0"])
    return Segmenter(Above100HU(), config, "cpu")


def write_good_scans(folder, n=3):
    """CT-like scans whose lesions (150 HU) are exactly the ct_case labels; LPS, so the affine matters."""
    affine = make_affine("LPS", spacing=(0.8, 0.9, 2.5))
    cases = {}
    for k in range(n):
        image, label = ct_case(SHAPE, seed=k)
        save_nifti(image, affine, folder / f"scan_{k}_0000.nii.gz")
        cases[f"scan_{k}"] = (image, label, affine)
    return cases


def write_bad_inputs(folder):
    bad = save_nifti(ct_case(SHAPE, seed=9)[0], make_affine("RAS"), folder / "corrupt.nii.gz")
    bad.write_bytes(bad.read_bytes()[:400])  # truncated gzip
    (folder / "notes.txt").write_text("not a scan")
    (folder / "empty").mkdir()
    series = write_dicom_series(ct_case(SHAPE, seed=4)[0].astype(np.int16), make_affine("RAS"), folder / "dicom")
    files = sorted((folder / "dicom").iterdir())
    files[5].write_bytes(files[5].read_bytes()[: files[5].stat().st_size // 2])  # a truncated slice
    return series


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def leftovers(folder):
    """Temporary files (atomic writes) anywhere under ``folder``."""
    return [p for p in folder.rglob(".*") if p.is_file() and p.name not in (".medseg.lock",)]


# --- good and bad inputs -----------------------------------------------------------------------------


def test_good_and_bad_inputs(tmp_path, segmenter):
    cases = write_good_scans(tmp_path / "in")
    write_bad_inputs(tmp_path / "in")
    out = tmp_path / "out"

    results = segment_folder(tmp_path / "in", out, segmenter)

    by_id = {r.case_id: r for r in results}
    assert [by_id[c].status for c in cases] == ["done"] * 3
    assert by_id["corrupt"].status == "failed" and "cannot read NIfTI" in by_id["corrupt"].error
    not_done = [r for r in results if r.case_id not in cases]
    assert not_done and all(r.status in ("failed", "skipped") and r.error for r in not_done)
    assert all("\n" not in r.error for r in results)
    assert exit_code(results) == 1

    # The manifest: the contract columns first, one row per result, statuses as returned.
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0])[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS == [
        "case_id", "source", "series_uid", "status", "error", "model_sha256", "seconds_load", "seconds_infer",
        "seconds_write", "shape", "spacing_mm", "lesion_count", "lesion_volume_ml"]
    assert [(r["case_id"], r["status"]) for r in rows] == [(r.case_id, r.status) for r in results]
    done = {r["case_id"]: r for r in rows if r["status"] == "done"}
    assert done["scan_0"]["shape"] == "24x24x12" and done["scan_0"]["spacing_mm"] == "0.8x0.9x2.5"
    assert float(done["scan_0"]["seconds_infer"]) > 0
    meta, json_rows = read_manifest_json(out / "manifest.json")
    assert meta["input_dir"] == "in"  # its name only (pipeline.io.privacy)
    assert [r["status"] for r in json_rows] == [r["status"] for r in rows]
    assert json_rows[0]["shape"] is None or isinstance(json_rows[0]["shape"], list)

    # Nothing partial: outputs only for the done cases, no temporaries.
    names = sorted(p.name for p in out.iterdir())
    for case_id in cases:
        assert f"{case_id}_seg.nii.gz" in names and f"{case_id}_seg.json" in names
    assert not [n for n in names if "corrupt" in n or n.startswith("dicom")]
    assert sorted(p.name for p in (out / "qc").iterdir()) == [f"{c}.png" for c in cases]
    assert leftovers(out) == []
    assert {"manifest.csv", "manifest.json", "lesions.csv", "index.html", "segment.log"} <= set(names)
    assert not (out / ".medseg.lock").exists()

    # The masks are the labels (the stand-in network), in the source grid.
    for case_id, (_, label, affine) in cases.items():
        mask = nib.load(str(out / f"{case_id}_seg.nii.gz"))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), label)
        np.testing.assert_allclose(mask.affine, affine, atol=1e-6)

    # The log names every case.
    log_text = (out / "segment.log").read_text()
    assert all(f"case {c} done" in log_text for c in cases) and "case corrupt failed" in log_text


def test_lesion_table_matches_the_constructed_lesions(tmp_path, segmenter):
    cases = write_good_scans(tmp_path / "in", n=2)
    results = segment_folder(tmp_path / "in", tmp_path / "out", segmenter)
    rows = read_csv(tmp_path / "out" / "lesions.csv")
    manifest = {r["case_id"]: r for r in read_csv(tmp_path / "out" / "manifest.csv")}
    for case_id, (image, label, affine) in cases.items():
        expected = lesion_stats(label, affine, image=image)
        got = [r for r in rows if r["case_id"] == case_id]
        assert len(got) == len(expected) == int(manifest[case_id]["lesion_count"]) > 0
        for row, lesion in zip(got, expected):
            assert int(row["voxels"]) == lesion.voxels
            assert float(row["volume_ml"]) == pytest.approx(lesion.volume_ml, rel=1e-5)
            centroid = [float(row[f"centroid_{a}_mm"]) for a in "xyz"]
            np.testing.assert_allclose(centroid, lesion.centroid_mm, atol=1e-3)
            assert float(row["max_diameter_mm"]) == pytest.approx(lesion.max_diameter_mm, rel=1e-5)
            assert float(row["mean_intensity"]) == pytest.approx(150.0)  # HU of the lesions, as read
            assert float(row["max_probability"]) > 0.99
        assert float(manifest[case_id]["lesion_volume_ml"]) == pytest.approx(sum(lesion.volume_ml for lesion in expected),
                                                                             rel=1e-5)
    assert {r.case_id: r.lesion_count for r in results} == {c: len(lesion_stats(v[1], v[2])) for c, v in cases.items()}


def test_sidecar_qc_and_index(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.nii.gz").write_text("<b>not a scan</b>")
    out = tmp_path / "out"
    segment_folder(tmp_path / "in", out, segmenter)

    sidecar = json.loads((out / "scan_1_seg.json").read_text())
    assert sidecar["case_id"] == "scan_1"
    assert sidecar["source"] == "in/scan_1_0000.nii.gz"  # relative to the input folder, by default
    assert len(sidecar["fingerprint"]) == 64
    assert sidecar["config"]["preprocess"]["intensity"]["window"] == [0.0, 200.0]
    assert {"medseg", "torch", "monai", "numpy", "python"} <= set(sidecar["versions"])
    assert sidecar["started"] < sidecar["finished"] and sidecar["host"]
    assert sidecar["shape"] == [24, 24, 12] and sidecar["spacing_mm"] == [0.8, 0.9, 2.5]
    assert sidecar["lesion_count"] == len(sidecar["lesions"]) > 0

    assert (out / "qc" / "scan_0.png").read_bytes()[:4] == b"\x89PNG"

    # keep_paths: the full path, as given.
    segment_folder(tmp_path / "in", tmp_path / "full", segmenter, keep_paths=True)
    sidecar = json.loads((tmp_path / "full" / "scan_1_seg.json").read_text())
    assert sidecar["source"] == str(tmp_path / "in" / "scan_1_0000.nii.gz")
    page = (out / "index.html").read_text()
    for case_id in ("scan_0", "scan_1", "broken"):
        assert f"<td>{case_id}</td>" in page
    assert 'src="qc/scan_0.png"' in page and 'src="qc/broken.png"' not in page


# --- resume ------------------------------------------------------------------------------------------


def test_rerun_resumes_by_fingerprint(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=3)
    out = tmp_path / "out"
    first = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter)}

    second = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter)}
    assert all(r.status == "done" and r.resumed for r in second.values())
    assert {c: r.started for c, r in second.items()} == {c: r.started for c, r in first.items()}
    assert {c: r.lesion_count for c, r in second.items()} == {c: r.lesion_count for c, r in first.items()}
    rows = read_csv(out / "manifest.csv")
    assert [r["resumed"] for r in rows] == ["true"] * 3
    assert len(read_csv(out / "lesions.csv")) == sum(r.lesion_count for r in first.values())

    # A changed source is redone, the others are kept.
    touched = tmp_path / "in" / "scan_1_0000.nii.gz"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter)}
    assert [c for c, r in third.items() if not r.resumed] == ["scan_1"]
    assert third["scan_1"].fingerprint != first["scan_1"].fingerprint

    # Other inference settings, or overwrite, redo everything.
    segmenter.config.inference.overlap = 0.5
    assert not any(r.resumed for r in segment_folder(tmp_path / "in", out, segmenter))
    assert not any(r.resumed for r in segment_folder(tmp_path / "in", out, segmenter, overwrite=True))


def test_missing_qc_picture_makes_the_case_unfinished(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=2)
    out = tmp_path / "out"
    segment_folder(tmp_path / "in", out, segmenter)
    (out / "qc" / "scan_0.png").unlink()
    results = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter)}
    assert not results["scan_0"].resumed and results["scan_1"].resumed
    assert (out / "qc" / "scan_0.png").is_file()


# --- isolation -----------------------------------------------------------------------------------------


def test_a_failure_while_writing_leaves_nothing_of_the_case(tmp_path, segmenter, monkeypatch):
    import pipeline.batch.report.qc as qc

    write_good_scans(tmp_path / "in", n=2)
    out = tmp_path / "out"
    segment_folder(tmp_path / "in", out, segmenter)  # outputs of an earlier run, now to be redone
    real = qc.write_qc_png

    def fail_for_scan_1(path, *args, **kwargs):
        if "scan_1" in str(path):
            raise MemoryError("no memory left for the picture")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(qc, "write_qc_png", fail_for_scan_1)
    results = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter, overwrite=True)}
    assert results["scan_0"].status == "done"
    assert results["scan_1"].status == "failed" and "no memory left" in results["scan_1"].error
    assert not list(out.glob("scan_1*")) and not (out / "qc" / "scan_1.png").exists()
    assert leftovers(out) == []


def test_background_and_sequential_runs_agree(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=3)
    a = segment_folder(tmp_path / "in", tmp_path / "a", segmenter, background=True, qc=False)
    b = segment_folder(tmp_path / "in", tmp_path / "b", segmenter, background=False, qc=False)
    assert [(r.case_id, r.status, r.lesion_count) for r in a] == [(r.case_id, r.status, r.lesion_count) for r in b]
    for r in a:
        np.testing.assert_array_equal(np.asarray(nib.load(r.output).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "b" / f"{r.case_id}_seg.nii.gz")).dataobj))
    assert not list((tmp_path / "a" / "qc").glob("*.png"))  # qc=False


# --- errors before any work ----------------------------------------------------------------------------


def test_output_folder_in_use_is_refused(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=1)
    (tmp_path / "out").mkdir()
    with OutputLock(tmp_path / "out" / ".medseg.lock"):
        with pytest.raises(OutputLockedError, match="in use by another medseg run"):
            segment_folder(tmp_path / "in", tmp_path / "out", segmenter)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qc"]


def test_unwritable_output_is_refused_before_any_work(tmp_path, segmenter):
    write_good_scans(tmp_path / "in", n=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot write to output folder"):
        segment_folder(tmp_path / "in", tmp_path / "file" / "out", segmenter)


# --- DICOM SEG -------------------------------------------------------------------------------------


def test_dicom_seg_for_dicom_sources(tmp_path, segmenter, monkeypatch):
    import pipeline.io.dicom_seg as dicom_seg

    calls = []

    def fake_write(labels, affine, source_files, out_path, label_names, **identity):
        assert sorted(identity) == ["anatomic_region", "model_sha256"]  # what the SEG records of the model
        calls.append((labels.shape, len(source_files), list(label_names)))
        out_path.write_bytes(b"DICM")
        return out_path

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", fake_write)
    write_good_scans(tmp_path / "in", n=1)
    write_dicom_series(ct_case(SHAPE, seed=3)[0].astype(np.int16), make_affine("RAS"), tmp_path / "in" / "ct")
    results = {r.case_id: r for r in segment_folder(tmp_path / "in", tmp_path / "out", segmenter, dicom_seg=True)}
    assert results["ct"].status == "done", results["ct"].error
    assert calls == [(SHAPE, SHAPE[2], ["background", "lesion"])]
    assert (tmp_path / "out" / "ct_seg.dcm").read_bytes() == b"DICM"
    assert results["ct"].dicom_seg.endswith("ct_seg.dcm") and results["scan_0"].dicom_seg == ""
    # Resume needs the SEG too when it is asked for.
    (tmp_path / "out" / "ct_seg.dcm").unlink()
    again = {r.case_id: r for r in segment_folder(tmp_path / "in", tmp_path / "out", segmenter, dicom_seg=True)}
    assert again["scan_0"].resumed and not again["ct"].resumed and len(calls) == 2


# --- shards and the merged manifest ---------------------------------------------------------------


def test_shards_cover_every_case_once_and_merge(tmp_path, segmenter):
    cases = write_good_scans(tmp_path / "in", n=5)
    (tmp_path / "in" / "junk.nii.gz").write_text("junk")
    out = tmp_path / "out"
    parts = [segment_folder(tmp_path / "in", out, segmenter, shard=f"{i}/2", qc=False) for i in (1, 2)]
    ids = [r.case_id for part in parts for r in part if r.status == "done"]
    assert sorted(ids) == sorted(cases)
    assert (out / "manifest.shard-1-of-2.csv").is_file() and (out / "manifest.shard-2-of-2.json").is_file()
    assert (out / "segment.shard-2-of-2.log").is_file() and not (out / "manifest.csv").exists()

    rows = rebuild_reports(out)
    assert [(r["case_id"], r["status"]) for r in rows] == sorted([(c, "done") for c in cases] + [("junk", "failed")])
    merged = read_csv(out / "manifest.csv")
    assert [r["case_id"] for r in merged] == [r["case_id"] for r in rows]
    lesions = read_csv(out / "lesions.csv")
    assert len(lesions) == sum(int(r["lesion_count"]) for r in merged if r["status"] == "done")
    assert (out / "index.html").is_file()

    # Without any manifest, the sidecars alone rebuild the done cases.
    for path in out.glob("manifest*"):
        path.unlink()
    rebuilt = rebuild_reports(out)
    assert [r["case_id"] for r in rebuilt] == sorted(cases)
    assert len(read_csv(out / "lesions.csv")) == len(lesions)
