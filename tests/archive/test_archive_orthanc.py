"""``segment_archive`` against a REAL Orthanc with its DICOMweb plugin (no mock server): search, retrieve,
segment, store the SEGs back, resume, and a series deleted between the search and its retrieval.

The stand-in network marks voxels above 100 HU, so the synthetic studies' masks are their labels.
"""

from __future__ import annotations

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.archive.client import make_client
from pipeline.archive.credentials import Credentials
from pipeline.archive.query import find_series
from pipeline.archive.run import ArchiveOptions, segment_archive
from pipeline.archive.state import STATE_NAME
from pipeline.archive.url import parse_archive_url
from pipeline.batch import exit_code
from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.io.dicom_seg import read_dicom_seg
from tests.archive.conftest import PASSWORD, USER
from tests.batch.test_batch import Above100HU, _one_thread  # noqa: F401  (fixture)

CREDENTIALS = Credentials("basic", user=USER, secret=PASSWORD, origin="test")


@pytest.fixture
def segmenter():
    config = load_config(None, ["preprocess.spacing=null", "preprocess.intensity.window=[0, 200]",
                                "preprocess.crop_foreground=false", "inference.roi_size=[64, 64, 32]",
                                "inference.min_component_mm3=0"])
    return Segmenter(Above100HU(), config, "cpu")


def _client(orthanc, counter=None):
    return make_client(parse_archive_url(orthanc.dicomweb), CREDENTIALS, counter=counter)


def _run(orthanc, out, segmenter, on_case=None, rtstruct=False, **options):
    options.setdefault("credentials", CREDENTIALS)
    return segment_archive(orthanc.dicomweb, out, segmenter, archive=ArchiveOptions(**options), qc=False,
                           isolate_reading=False, on_case=on_case, rtstruct=rtstruct)


def _rows(out) -> dict:
    return {r["case_id"]: r for r in json.loads((out / "manifest.json").read_text())["cases"]}


def test_query_finds_the_ct_studies(orthanc, ct_studies, real_series):
    found = find_series(_client(orthanc), "Modality=CT")
    assert len(found.studies) == 3  # two synthetic studies and the real ct-3slice
    assert sorted(s.modality for s in found.series) == ["CT", "CT", "CT"]
    everything = find_series(_client(orthanc))
    assert len(everything.studies) == 5 and len(everything.series) == 5
    assert {"DOE^JANE0", "PID-SECRET-1"} <= everything.patient_values  # known, so redacted from logs
    dated = find_series(_client(orthanc), "Modality=CT&StudyDate=20240101-20241231")
    assert len(dated.studies) == 2  # only the synthetic ones are of 2024


def test_push_stores_one_seg_per_series_equal_to_the_mask_and_resumes(orthanc, ct_studies, tmp_path, segmenter):
    out = tmp_path / "out"
    events = []
    first = _run(orthanc, out, segmenter, query="Modality=CT&StudyDate=20240101-20241231", push=True,
                 before_retrieve=lambda series: events.append(("retrieve", series.name)),
                 on_case=lambda result: events.append(("written", result.case_id)))
    assert exit_code(first.results) == 0
    # retrieval overlaps the batch run: the second series is asked for before the first case is written
    assert [kind for kind, _ in events] == ["retrieve", "retrieve", "written", "written"]
    assert (first.retrieved, first.kept, first.stored, first.push_failed) == (2, 0, 2, 0)
    assert first.peak_series_on_disk <= 3
    assert not (out / ".cache" / "dicomweb").exists()  # the cache is gone once the cases are written
    rows = _rows(out)
    assert sorted(r["status"] for r in rows.values()) == ["done", "done"]
    assert all(r["pushed"] is True and not r["push_error"] for r in rows.values())
    assert orthanc.modality_count("SEG") == 2  # one SEG per series
    uid_to_study = {pydicom.dcmread(files[0]).SeriesInstanceUID: (files, label)
                    for files, label in ct_studies.values()}
    client = _client(orthanc)
    for case_id, row in rows.items():
        files, label = uid_to_study[row["series_uid"]]
        local = pydicom.dcmread(out / f"{case_id}_seg.dcm")
        # the SEG as the archive gives it back (WADO-RS), decoded by highdicom
        back = client.retrieve_instance(local.StudyInstanceUID, local.SeriesInstanceUID, local.SOPInstanceUID)
        seg = hd.seg.Segmentation.from_dataset(back)
        sop_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
        pixels = seg.get_pixels_by_source_instance(sop_uids, assert_missing_frames_are_empty=True)
        mask = nib.load(out / f"{case_id}_seg.nii.gz")
        onto_grid = read_dicom_seg(_saved(back, tmp_path / f"{case_id}.dcm"), files, mask.affine, mask.shape)
        np.testing.assert_array_equal(onto_grid, np.asarray(mask.dataobj))  # the archive's SEG is the mask
        # ... and highdicom's frames are the label (the known network's mask): file k's pixel (row r,
        # column c) is voxel (c, r, k) of the volume the series was written from
        assert label.sum() > 0
        np.testing.assert_array_equal(pixels[..., 0], label.transpose(2, 1, 0))

    second = _run(orthanc, out, segmenter, query="Modality=CT&StudyDate=20240101-20241231", push=True)
    assert (second.retrieved, second.kept, second.stored) == (0, 2, 0)
    assert second.requests == {"GET": 3}  # one study search + one series search per study; no WADO, no STOW
    assert all(r.resumed and r.pushed for r in second.results)
    assert orthanc.modality_count("SEG") == 2

    # a partial push (one file lost by the archive's bookkeeping): the re-run stores exactly that one
    state = json.loads((out / STATE_NAME).read_text())
    lost_uid = sorted(state["series"])[0]
    state["series"][lost_uid]["pushed"] = {}
    (out / STATE_NAME).write_text(json.dumps(state))
    third = _run(orthanc, out, segmenter, query="Modality=CT&StudyDate=20240101-20241231", push=True)
    assert (third.retrieved, third.stored) == (0, 1)
    assert third.requests.get("POST") == 1


def test_push_with_rtstruct_stores_a_seg_and_an_rtstruct_per_series(orthanc, ct_studies, tmp_path, segmenter):
    from pipeline.io.rtstruct import read_rtstruct

    out = tmp_path / "out"
    run = _run(orthanc, out, segmenter, query="Modality=CT&StudyDate=20240101-20241231", push=True, rtstruct=True)
    assert exit_code(run.results) == 0 and (run.stored, run.push_failed) == (4, 0)
    assert orthanc.modality_count("SEG") == 2 and orthanc.modality_count("RTSTRUCT") == 2
    uid_to_study = {pydicom.dcmread(files[0]).SeriesInstanceUID: files for files, _ in ct_studies.values()}
    client = _client(orthanc)
    for result in run.results:
        local = pydicom.dcmread(out / f"{result.case_id}_rtstruct.dcm")
        back = client.retrieve_instance(local.StudyInstanceUID, local.SeriesInstanceUID, local.SOPInstanceUID)
        mask = nib.load(out / f"{result.case_id}_seg.nii.gz")
        onto_grid = read_rtstruct(_saved(back, tmp_path / f"{result.case_id}_rt.dcm"),
                                  uid_to_study[result.series_uid], mask.affine, mask.shape)
        np.testing.assert_array_equal(onto_grid, np.asarray(mask.dataobj))  # the archive's RTSTRUCT is the mask
    again = _run(orthanc, out, segmenter, query="Modality=CT&StudyDate=20240101-20241231", push=True, rtstruct=True)
    assert (again.retrieved, again.stored) == (0, 0)


def test_a_series_deleted_after_the_search_fails_alone(orthanc, ct_studies, tmp_path, segmenter):
    victim = pydicom.dcmread(ct_studies["synth1"][0][0]).SeriesInstanceUID

    def delete_before_retrieve(series):
        if series.series_uid == victim:
            orthanc.delete_series(victim)

    out = tmp_path / "out"
    run = _run(orthanc, out, segmenter, push=True, before_retrieve=delete_before_retrieve)
    by_uid = {r.series_uid: r for r in run.results}
    assert by_uid[victim].status == "failed"
    assert "404" in by_uid[victim].error and "no longer in the archive" in by_uid[victim].error
    others = [r for uid, r in by_uid.items() if uid != victim]
    assert len(others) == 1 and others[0].status == "done" and others[0].pushed
    assert exit_code(run.results) == 1  # as for folders: some failed
    assert _rows(out)[by_uid[victim].case_id]["error"] == by_uid[victim].error


def _saved(dataset, path):
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_real_series_each_get_one_seg_in_the_archive(orthanc, ct_studies, real_series, tmp_path, segmenter):
    """The real ct-3slice, GE MR (130 files without extension) and Siemens sagittal (JPEG Lossless, kept as
    stored: no transcoding) series beside the synthetic studies: one SEG per series back in Orthanc, each
    equal to its mask on the series' grid."""
    out = tmp_path / "out"
    run = _run(orthanc, out, segmenter, push=True, max_series=2)
    assert exit_code(run.results) == 0, [(r.case_id, r.error, r.push_error) for r in run.results]
    assert (run.studies, run.series, run.retrieved) == (5, 5, 5)
    assert run.peak_series_on_disk <= 2
    rows = _rows(out).values()
    assert all(row["status"] == "done" for row in rows)
    # every series gets its SEG (the GE MR too: its ImageOrientationPatient varies in the 9th decimal), stored
    written = [row for row in rows if row["dicom_seg"]]
    assert len(written) == 5 and run.stored == 5 == orthanc.modality_count("SEG")
    assert all(row["pushed"] is True and not row["push_error"] for row in rows)
    files_of = {pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID: files
                for files in [*real_series.values(), *(f for f, _ in ct_studies.values())]}
    client = _client(orthanc)
    for row in written:
        assert row["pushed"] is True
        local = pydicom.dcmread(out / f"{row['case_id']}_seg.dcm", stop_before_pixels=True)
        back = client.retrieve_instance(local.StudyInstanceUID, local.SeriesInstanceUID, local.SOPInstanceUID)
        assert hd.seg.Segmentation.from_dataset(back).number_of_segments >= 1
        mask = nib.load(out / f"{row['case_id']}_seg.nii.gz")
        onto_grid = read_dicom_seg(_saved(back, tmp_path / f"{row['case_id']}.dcm"), files_of[row["series_uid"]],
                                   mask.affine, mask.shape)
        np.testing.assert_array_equal(onto_grid, np.asarray(mask.dataobj))


def test_a_refused_store_fails_alone_and_the_re_run_pushes_exactly_it(tmp_path, segmenter):
    """Orthanc refuses one study's SEG (a Lua ReceivedInstanceFilter, while a flag file exists); its
    DICOMweb plugin still answers the STOW with success, so only asking it afterwards shows the refusal."""
    from tests.archive.conftest import write_ct_studies
    from tests.archive.orthanc_server import OrthancServer, skip_reason

    if skip_reason():
        pytest.skip(skip_reason())
    flag = tmp_path / "refuse-seg"
    flag.write_text("on")
    lua = f'''
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == "SEG" and dicom.PatientID == "PID-SECRET-1" then
    local f = io.open("{flag}", "r")
    if f ~= nil then f:close() return false end
  end
  return true
end
'''
    orthanc = OrthancServer(tmp_path / "orthanc", users={USER: PASSWORD}, lua=lua).start()
    try:
        studies = write_ct_studies(tmp_path / "ct")
        for files, _ in studies.values():
            orthanc.upload(files)
        refused_uid = pydicom.dcmread(studies["synth1"][0][0]).SeriesInstanceUID
        out = tmp_path / "out"
        first = _run(orthanc, out, segmenter, push=True)
        assert (first.stored, first.push_failed) == (1, 1)
        by_uid = {r.series_uid: r for r in first.results}
        assert by_uid[refused_uid].status == "done" and by_uid[refused_uid].pushed is False
        assert by_uid[refused_uid].push_error == (f"{by_uid[refused_uid].case_id}_seg.dcm: store refused: the "
                                                  "archive answered the STOW-RS request but does not hold the instance")
        row = _rows(out)[by_uid[refused_uid].case_id]
        assert row["pushed"] is False and "store refused" in row["push_error"]
        assert orthanc.modality_count("SEG") == 1

        flag.unlink()  # the archive accepts it now: the re-run stores exactly the missing SEG
        second = _run(orthanc, out, segmenter, push=True)
        assert (second.retrieved, second.stored, second.push_failed) == (0, 1, 0)
        assert second.requests["POST"] == 1
        done = [r for r in second.results if r.status == "done"]
        assert len(done) == 2 and all(r.pushed and not r.push_error for r in done)
        skipped = [r for r in second.results if r.status == "skipped"]  # the SEG stored by the first run
        assert [r.error for r in skipped] == ["modality SEG: not an image series (not retrieved)"]
        assert orthanc.modality_count("SEG") == 2
    finally:
        orthanc.stop()


def test_a_retrieval_that_times_out_fails_alone(orthanc, ct_studies, tmp_path, segmenter):
    """Orthanc is frozen (SIGSTOP) just before one series is retrieved and thawed after the client's
    timeout: that series fails with the timeout as its reason, the next one is retrieved."""
    import os
    import signal
    import threading

    from pipeline.archive.client import ClientOptions

    frozen = []

    def freeze_once(series):
        if not frozen:
            frozen.append(series.series_uid)
            os.kill(orthanc.process.pid, signal.SIGSTOP)
            threading.Timer(2.5, os.kill, (orthanc.process.pid, signal.SIGCONT)).start()

    out = tmp_path / "out"
    run = _run(orthanc, out, segmenter, before_retrieve=freeze_once, client=ClientOptions(timeout_s=2.0, attempts=1))
    by_uid = {r.series_uid: r for r in run.results}
    assert by_uid[frozen[0]].status == "failed"
    assert by_uid[frozen[0]].error == "retrieve failed: the archive did not answer within 2 s (timeout)"
    assert [r.status for uid, r in by_uid.items() if uid != frozen[0]] == ["done"]
    assert run.retrieved == 1 and exit_code(run.results) == 1
