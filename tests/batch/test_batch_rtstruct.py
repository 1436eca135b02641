"""``segment --dicom-seg --rtstruct``: SEG and RTSTRUCT beside the mask for every DICOM source, anonymised
exports (UIDs only in the file meta) included; failures become ``rtstruct_error``; every file validates."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.batch import exit_code, segment_folder
from pipeline.cli import main
from pipeline.config.schema import OutputConfig
from pipeline.errors import ConfigError
from pipeline.io.dicom_seg import read_dicom_seg
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.rtstruct import read_rtstruct
from tests.batch.test_batch import SHAPE, _one_thread, segmenter  # noqa: F401  (fixtures)
from tests.conftest import make_affine
from tests.dicom_validate import assert_valid
from tests.helpers import ct_case


def _series(folder, seed=3, orientation="LPS"):
    return write_dicom_series(ct_case(SHAPE, seed=seed)[0].astype(np.int16), make_affine(orientation), folder,
                              uid_entropy=[str(folder.name)])


def _anonymise(files):
    """Blank the dataset-level SOP UIDs, as some anonymisers do; the file meta keeps them."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
        ds.save_as(path, enforce_file_format=False)


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def _check_outputs(result, files):
    mask_image = nib.load(result.output)
    mask, affine = np.asarray(mask_image.dataobj), mask_image.affine
    assert mask.any()
    meta_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
                 for f in files]
    np.testing.assert_array_equal(read_rtstruct(result.rtstruct, files, affine, mask.shape), mask)
    np.testing.assert_array_equal(read_dicom_seg(result.dicom_seg, files, affine, mask.shape), mask)
    seg = hd.seg.segread(result.dicom_seg)  # highdicom reads it back, frame per source instance
    by_instance = seg.get_pixels_by_source_instance(meta_uids, assert_missing_frames_are_empty=True)
    assert int(by_instance.sum()) == int(np.count_nonzero(mask))
    rt = pydicom.dcmread(result.rtstruct)
    referenced = {i.ReferencedSOPInstanceUID for i in rt.ReferencedFrameOfReferenceSequence[0]
                  .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert referenced == set(meta_uids)
    assert_valid(result.rtstruct)
    assert_valid(result.dicom_seg)


def test_seg_and_rtstruct_for_classic_and_anonymised_series(tmp_path, segmenter):
    files = {"ct": _series(tmp_path / "in" / "ct"),
             "anon": _series(tmp_path / "in" / "anon", seed=4, orientation="feet_first")}
    _anonymise(files["anon"])
    segmenter.config = replace(segmenter.config, output=OutputConfig(anatomic_region="SCT:10200004:Liver"))
    out = tmp_path / "out"
    results = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True,
                                                    rtstruct=True, qc=False)}
    assert exit_code(list(results.values())) == 0
    for case_id, result in results.items():
        assert result.status == "done", result.error
        assert result.dicom_seg_error == "" and result.rtstruct_error == ""
        assert Path(result.rtstruct) == out / f"{case_id}_rtstruct.dcm"
        _check_outputs(result, [str(f) for f in files[case_id]])
    rows = _manifest(out)
    assert rows["anon"]["rtstruct"].endswith("anon_rtstruct.dcm") and rows["anon"]["rtstruct_error"] == ""
    seg = pydicom.dcmread(results["ct"].dicom_seg)
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "medseg"
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "10200004"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"

    again = segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True, rtstruct=True, qc=False)
    assert all(r.resumed for r in again) and {r.rtstruct for r in again} == {r.rtstruct for r in results.values()}
    (out / "ct_rtstruct.dcm").unlink()  # a missing RTSTRUCT asked for redoes the case
    redone = {r.case_id: r for r in segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True, rtstruct=True,
                                                   qc=False)}
    assert not redone["ct"].resumed and redone["anon"].resumed and Path(redone["ct"].rtstruct).is_file()

    from pipeline.batch.report import rebuild_reports

    (out / "manifest.csv").unlink()
    rebuilt = {row["case_id"]: row for row in rebuild_reports(out)}  # `medseg manifest`, from the sidecars
    assert rebuilt["ct"]["rtstruct"] == str(out / "ct_rtstruct.dcm") and rebuilt["ct"]["rtstruct_error"] == ""


def test_source_without_any_instance_uid_keeps_its_mask(tmp_path, segmenter):
    files = _series(tmp_path / "in" / "ct")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path, enforce_file_format=False)
    out = tmp_path / "out"
    (result,) = segment_folder(tmp_path / "in", out, segmenter, dicom_seg=True, rtstruct=True, qc=False)
    assert result.status == "done" and Path(result.output).is_file()
    for error in (result.dicom_seg_error, result.rtstruct_error):
        assert "has no SOPInstanceUID, neither in the dataset nor as MediaStorageSOPInstanceUID" in error
    assert not (out / "ct_seg.dcm").exists() and not (out / "ct_rtstruct.dcm").exists()
    assert "RTSTRUCT not written" in (out / "segment.log").read_text()
    assert _manifest(out)["ct"]["rtstruct_error"] == result.rtstruct_error
    sidecar = json.loads((out / "ct_seg.json").read_text())
    assert sidecar["rtstruct_error"] == result.rtstruct_error


def test_cli_rtstruct_flag(tmp_path, segmenter, monkeypatch):
    from pipeline.infer import Segmenter

    _series(tmp_path / "in" / "ct")
    monkeypatch.setattr(Segmenter, "from_checkpoints", classmethod(lambda cls, *a, **k: segmenter))
    code = main(["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m.pt", "--rtstruct",
                 "--no-qc", "-q", "output.anatomic_region=SCT:10200004:Liver", "input.min_slices=2",
                 "output.rtstruct_rois=lesion"])
    assert code == 0
    assert (tmp_path / "out" / "ct_rtstruct.dcm").is_file() and not (tmp_path / "out" / "ct_seg.dcm").exists()
    rt = pydicom.dcmread(tmp_path / "out" / "ct_rtstruct.dcm")
    assert rt.RTROIObservationsSequence[0].AnatomicRegionSequence[0].CodeValue == "10200004"
    lesions = int(_manifest(tmp_path / "out")["ct"]["lesion_count"])  # one ROI per lesion, as in lesions.csv
    assert lesions >= 2 and [r.ROIName for r in rt.StructureSetROISequence] == \
        [f"lesion {n}" for n in range(1, lesions + 1)]
    assert_valid(tmp_path / "out" / "ct_rtstruct.dcm")


def test_anatomic_region_config_key_is_checked():
    from pipeline.config import load_config

    config = load_config(None, ["output.anatomic_region=SCT:10200004:Liver"])
    assert config.output.anatomic_region == "SCT:10200004:Liver"
    with pytest.raises(ConfigError, match="output.anatomic_region.*SCHEME:CODE:Meaning"):
        load_config(None, ["output.anatomic_region=Liver"])
    assert load_config(None, ["output.rtstruct_rois=lesion"]).output.rtstruct_rois == "lesion"
    with pytest.raises(ConfigError, match="output.rtstruct_rois"):
        load_config(None, ["output.rtstruct_rois=organ"])


def test_multi_channel_study_outputs_reference_channel_zero(tmp_path):
    """A two-series study (FLAIR channel 0, T1c on another grid): the SEG and the RTSTRUCT reference the
    FLAIR series, on whose grid the mask is, and read back onto it equal to the mask."""
    from pipeline.infer import Segmenter
    from tests.infer.test_multichannel import SecondChannelEcho, two_channel_config, write_two_series_study

    write_two_series_study(tmp_path / "in", np.array([12.0, -30.0, 45.0]))
    config = two_channel_config("preprocess.intensity.window=[0, 1000]",
                                "input.channels=[{name: FLAIR, series_description: '*FLAIR*'},"
                                " {name: T1c, series_description: '*T1*POST*'}]")
    (result,) = segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(SecondChannelEcho(), config, "cpu"),
                               dicom_seg=True, rtstruct=True, qc=False)
    assert result.status == "done" and result.dicom_seg_error == "" and result.rtstruct_error == "", result
    flair = sorted(str(p) for p in (tmp_path / "in" / "study" / "flair").iterdir())
    flair_series = pydicom.dcmread(flair[0], stop_before_pixels=True).SeriesInstanceUID
    assert result.channel_series_uids[0] == flair_series
    seg = pydicom.dcmread(result.dicom_seg)
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [flair_series]
    rt = pydicom.dcmread(result.rtstruct)
    rt_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in rt_series] == [flair_series]
    _check_outputs(result, flair)


def test_mosaic_keeps_its_mask_with_the_rtstruct_error(shared_data, tmp_path, segmenter):
    import shutil

    source = shared_data / "dicom/dcm_qa_12bit/In/12bitUnsigned.dcm"
    if not source.is_file():
        pytest.skip(f"sample not present: {source}")
    (tmp_path / "in" / "mosaic").mkdir(parents=True)
    shutil.copy(source, tmp_path / "in" / "mosaic" / source.name)
    (result,) = segment_folder(tmp_path / "in", tmp_path / "out", segmenter, rtstruct=True, qc=False)
    assert result.status == "done" and Path(result.output).is_file()
    assert result.rtstruct == "" and "Siemens mosaic" in result.rtstruct_error
    assert not (tmp_path / "out" / "mosaic_rtstruct.dcm").exists()
    assert "Siemens mosaic" in _manifest(tmp_path / "out")["mosaic"]["rtstruct_error"]
