"""``segment_folder`` on DICOM sources: what reading assumed reaches the sidecar; a DICOM SEG that cannot
be written never costs the case its mask (``dicom_seg_error``)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.batch import exit_code, segment_folder
from pipeline.batch.report.manifest import ALL_COLUMNS, MANIFEST_COLUMNS
from pipeline.config import InputConfig
from pipeline.io.dicom_seg import read_dicom_seg
from pipeline.io.dicom_write import write_dicom_series
from tests.batch.test_batch import SHAPE, _one_thread, segmenter  # noqa: F401  (fixtures)
from tests.conftest import make_affine
from tests.dicom_validate import assert_valid
from tests.helpers import ct_case


def _ct_series(folder, seed=3):
    return write_dicom_series(ct_case(SHAPE, seed=seed)[0].astype(np.int16), make_affine("RAS"), folder)


def test_assumptions_are_recorded_in_the_sidecar(tmp_path, segmenter):
    for path in _ct_series(tmp_path / "in" / "ct"):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    refused = segment_folder(tmp_path / "in", tmp_path / "out", segmenter)
    assert refused[0].status == "failed" and "input.on_missing_spacing=assume" in refused[0].error

    results = segment_folder(tmp_path / "in", tmp_path / "out2", segmenter,
                             select=InputConfig(on_missing_spacing="assume"))
    assert results[0].status == "done", results[0].error
    sidecar = json.loads((tmp_path / "out2" / "ct_seg.json").read_text())
    assert sidecar["assumptions"] == ["in-plane spacing 1 x 1 mm (no PixelSpacing)"]


# --- DICOM SEG: written for enhanced sources, never at the cost of the mask ----------------------------


def _copy_sample(shared_data, relative: str, folder):
    source = shared_data / relative
    if not source.is_file():
        pytest.skip(f"sample not present: {source}")
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(source, folder / source.name)


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def test_new_columns_follow_the_existing_ones():
    assert ALL_COLUMNS[-2:] == ["pushed", "push_error"]  # archive runs (pipeline.archive)
    assert ALL_COLUMNS[-10:-2] == ["dicom_seg_error", "channel_series_uids", "model_sha256s", "tta", "probabilities",
                                   "probabilities_error", "rtstruct", "rtstruct_error"]
    assert ALL_COLUMNS[:-10] == MANIFEST_COLUMNS + [
        "kind", "resumed", "seconds_post", "seconds", "output", "sidecar", "qc_png", "dicom_seg",
        "fingerprint", "started", "finished", "host"]


def test_seg_written_for_an_enhanced_source_and_mask_kept_for_a_mosaic(shared_data, tmp_path, segmenter):
    _copy_sample(shared_data, "dicom/dcm_qa_enh/In/Siemens/XA10/6_1.dcm", tmp_path / "in" / "enh")
    _copy_sample(shared_data, "dicom/dcm_qa_12bit/In/12bitUnsigned.dcm", tmp_path / "in" / "mosaic")
    out = tmp_path / "out"
    results = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True, qc=False)}
    assert exit_code(list(results.values())) == 0
    assert {c: r.status for c, r in results.items()} == {"enh": "done", "mosaic": "done"}, \
        {c: r.error for c, r in results.items()}

    enh = results["enh"]
    assert enh.dicom_seg_error == "" and Path(enh.dicom_seg).is_file()
    mask = np.asarray(nib.load(enh.output).dataobj)
    source = [str(p) for p in (tmp_path / "in" / "enh").iterdir()]
    np.testing.assert_array_equal(read_dicom_seg(enh.dicom_seg, source, nib.load(enh.output).affine, mask.shape), mask)
    assert_valid(enh.dicom_seg)

    mosaic = results["mosaic"]
    assert Path(mosaic.output).is_file() and mosaic.dicom_seg == "" and not (out / "mosaic_seg.dcm").exists()
    assert "Siemens mosaic" in mosaic.dicom_seg_error
    rows = _manifest(out)
    assert rows["mosaic"]["status"] == "done" and "Siemens mosaic" in rows["mosaic"]["dicom_seg_error"]
    assert rows["enh"]["dicom_seg_error"] == "" and rows["enh"]["dicom_seg"].endswith("enh_seg.dcm")


def test_a_failing_seg_writer_keeps_the_mask_and_reports_the_error(tmp_path, segmenter, monkeypatch):
    import pipeline.io.dicom_seg as dicom_seg

    def broken(*args, **kwargs):
        raise RuntimeError("highdicom refused the source\nsecond line")

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", broken)
    _ct_series(tmp_path / "in" / "ct")
    out = tmp_path / "out"
    results = segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True)
    assert exit_code(results) == 0
    (result,) = results
    assert result.status == "done" and result.error == ""
    assert result.dicom_seg_error == "RuntimeError: highdicom refused the source"
    assert (out / "ct_seg.nii.gz").is_file() and (out / "ct_seg.json").is_file() and (out / "qc" / "ct.png").is_file()
    assert not (out / "ct_seg.dcm").exists()
    assert _manifest(out)["ct"]["dicom_seg_error"] == "RuntimeError: highdicom refused the source"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"][0]["dicom_seg_error"] == "RuntimeError: highdicom refused the source"
    assert "DICOM SEG not written" in (out / "segment.log").read_text()

    # The same settings give the same failure: a re-run keeps the case instead of redoing it.
    again = segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True)
    assert again[0].resumed and again[0].dicom_seg_error == "RuntimeError: highdicom refused the source"
