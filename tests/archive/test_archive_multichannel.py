"""Against a REAL Orthanc: a two-channel model (FLAIR + T1c picked by ``input.channels`` within a study)
reading whole studies from the archive, and SEGs stored case by case as they are written.

The stand-in network (:class:`~tests.infer.test_multichannel.SecondChannelEcho`) marks where channel 1
(T1c, on another grid) is bright, on channel 0's (FLAIR) grid.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.archive.run import ArchiveOptions, segment_archive
from pipeline.archive.state import STATE_NAME
from pipeline.batch import exit_code, segment_folder
from pipeline.infer import Segmenter
from pipeline.io.validate import dciodvfy_available
from tests.archive.test_archive_orthanc import CREDENTIALS, _client, _run, segmenter  # noqa: F401  (fixture)
from tests.batch.test_batch import _one_thread  # noqa: F401  (fixture)
from tests.dicom_validate import assert_valid

RULES = ("input.channels=[{name: FLAIR, series_description: '*FLAIR*'},"
         " {name: T1c, series_description: '*T1*POST*'}]")
CENTRES = ([12.0, -30.0, 45.0], [-8.0, 14.0, 20.0], [0.0, 0.0, 0.0])


def write_study(root, k: int, with_t1c: bool = True) -> dict:
    """Study ``k``: FLAIR (channel 0, oblique 1x1x3 mm, uniform) and T1c (LPS 1.4x1.4x2 mm, shifted, a
    ball of radius 6 mm); deterministic UIDs of its own. Returns {"study", "flair", "t1c": UIDs, "files"}."""
    from pipeline.io.dicom_write import write_dicom_series
    from tests.conftest import make_affine
    from tests.infer.test_multichannel import _ball

    centre = np.array(CENTRES[k])
    affine0 = make_affine("oblique", spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    affine0[:3, 3] = centre - affine0[:3, :3] @ np.array([18.3, 20.1, 5.6])
    affine1 = make_affine("LPS", spacing=(1.4, 1.4, 2.0))
    affine1[:3, 3] = centre - affine1[:3, :3] @ np.array([15.2, 13.7, 9.4])
    study = f"1.2.826.0.1.3680043.8.498.4242{k}"
    common = dict(modality="MR", rescale_intercept=0.0, study_uid=study, patient_id=f"PID-MC-{k}",
                  patient_name=f"DOE^MC{k}", frame_of_reference_uid=f"{study}.9", study_date="20240401")
    files = write_dicom_series(np.full((40, 36, 12), 300, np.int16), affine0, root / f"study{k}" / "flair",
                               series_description="AX FLAIR", series_number=3, series_uid=f"{study}.3", **common)
    uids = {"study": study, "flair": f"{study}.3", "t1c": ""}
    if with_t1c:
        t1c = np.where(_ball((34, 30, 20), affine1, centre, 6.0), 1000, 0).astype(np.int16)
        files += write_dicom_series(t1c, affine1, root / f"study{k}" / "t1", series_description="AX T1 POST GAD",
                                    series_number=7, series_uid=f"{study}.7", **common)
        uids["t1c"] = f"{study}.7"
    uids["files"] = files
    return uids


@pytest.fixture
def two_channel():
    from tests.infer.test_multichannel import SecondChannelEcho, two_channel_config

    return Segmenter(SecondChannelEcho(), two_channel_config("preprocess.intensity.window=[0, 1000]", RULES), "cpu")


def _multi_run(orthanc, out, segmenter, **options):
    options.setdefault("credentials", CREDENTIALS)
    return segment_archive(orthanc.dicomweb, out, segmenter, archive=ArchiveOptions(**options), qc=False,
                           isolate_reading=False, rtstruct=True)


def test_two_channel_studies_from_the_archive_equal_the_folder_run(orthanc, tmp_path, two_channel):
    studies = [write_study(tmp_path / "local", 0), write_study(tmp_path / "local", 1),
               write_study(tmp_path / "local", 2, with_t1c=False)]
    for study in studies:
        assert orthanc.upload(study["files"]) == len(study["files"])
    local = {r.channel_series_uids[0]: r
             for r in segment_folder(tmp_path / "local", tmp_path / "out_local", two_channel, qc=False,
                                     dicom_seg=True) if r.status == "done"}
    assert len(local) == 2

    out = tmp_path / "out"
    good = [studies[0]["study"], studies[1]["study"]]
    first = _multi_run(orthanc, out, two_channel, studies=good, push=True, max_series=1)
    assert exit_code(first.results) == 0, [(r.case_id, r.error) for r in first.results]
    assert first.peak_series_on_disk == 1  # max_series counts studies here
    assert (first.studies, first.series, first.retrieved, first.stored, first.push_failed) == (2, 4, 2, 4, 0)
    done = {r.channel_series_uids[0]: r for r in first.results if r.status == "done"}
    assert sorted(done) == sorted(s["flair"] for s in studies[:2])
    client = _client(orthanc)
    for study in studies[:2]:
        result = done[study["flair"]]
        assert result.channel_series_uids == [study["flair"], study["t1c"]]
        assert result.case_id.startswith("study-") and result.pushed
        mask = np.asarray(nib.load(result.output).dataobj)
        assert mask.sum() > 50  # the ball
        np.testing.assert_array_equal(mask, np.asarray(nib.load(local[study["flair"]].output).dataobj))
        # the SEG the archive holds now: in the study, referencing channel 0's (FLAIR) series
        local_seg = pydicom.dcmread(result.dicom_seg, stop_before_pixels=True)
        back = client.retrieve_instance(local_seg.StudyInstanceUID, local_seg.SeriesInstanceUID,
                                        local_seg.SOPInstanceUID)
        assert back.StudyInstanceUID == study["study"]
        assert [s.SeriesInstanceUID for s in back.ReferencedSeriesSequence] == [study["flair"]]
        local_rt = pydicom.dcmread(result.rtstruct, stop_before_pixels=True)
        rt = client.retrieve_instance(local_rt.StudyInstanceUID, local_rt.SeriesInstanceUID, local_rt.SOPInstanceUID)
        rt_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
        assert rt.StudyInstanceUID == study["study"]
        assert [s.SeriesInstanceUID for s in rt_series] == [study["flair"]]
        if dciodvfy_available():  # as the archive gives them back: 0 errors
            for name, dataset in (("seg", back), ("rt", rt)):
                dataset.save_as(tmp_path / f"{result.case_id}_{name}_back.dcm", enforce_file_format=True)
                assert_valid(tmp_path / f"{result.case_id}_{name}_back.dcm")
    assert orthanc.modality_count("SEG") == 2 and orthanc.modality_count("RTSTRUCT") == 2
    state = json.loads((out / STATE_NAME).read_text())["series"]
    assert sorted(state) == sorted(good)  # one entry per study, with its channels' series
    assert all(entry["status"] == "done" and len(entry["pushed"]) == 2 for entry in state.values())

    again = _multi_run(orthanc, out, two_channel, studies=good, push=True)
    assert (again.retrieved, again.kept, again.stored) == (0, 2, 0)
    assert again.requests == {"GET": 4}  # two study searches + two series searches; no WADO, no STOW
    assert sorted(r.channel_series_uids[0] for r in again.results if r.status == "done") == sorted(done)
    assert all(r.resumed and r.pushed for r in again.results if r.status == "done")

    # every study now: the one without its T1c series fails alone, naming the channel (as from a folder)
    third = _multi_run(orthanc, out, two_channel, push=True)
    assert (third.studies, third.retrieved, third.kept, third.stored) == (3, 1, 2, 0)
    failed = [r for r in third.results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].series_uid == studies[2]["flair"]
    assert failed[0].case_id.startswith("study-")  # a one-series study too
    assert "channel 1 (T1c): no series" in failed[0].error
    assert sorted(r.status for r in third.results) == ["done", "done", "failed", *["skipped"] * 4]  # SEG, RTSTRUCT
    assert exit_code(third.results) == 1
    local_failed = [r for r in segment_folder(tmp_path / "local", tmp_path / "out_local", two_channel, qc=False)
                    if r.status == "failed"]
    assert len(local_failed) == 1 and "channel 1 (T1c): no series" in local_failed[0].error


def test_two_channel_model_without_channel_rules_is_refused(tmp_path):
    from pipeline.errors import InputError
    from tests.infer.test_multichannel import SecondChannelEcho, two_channel_config

    bare = Segmenter(SecondChannelEcho(), two_channel_config(), "cpu")
    with pytest.raises(InputError, match="input.channels"):
        segment_archive("dicomweb+http://127.0.0.1:9/dicom-web", tmp_path / "out", bare,
                        archive=ArchiveOptions(credentials=CREDENTIALS))


def test_an_interrupted_run_has_pushed_its_written_case_and_the_re_run_pushes_the_rest(
        orthanc, ct_studies, tmp_path, segmenter):  # noqa: F811
    written = []

    def interrupt_after_first(result):
        written.append(result.case_id)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(orthanc, out, segmenter, push=True, on_case=interrupt_after_first)
    assert len(written) == 1
    assert orthanc.modality_count("SEG") == 1  # stored although the run never reached its end
    state = json.loads((out / STATE_NAME).read_text())["series"]
    pushed = {name for entry in state.values() for name in entry.get("pushed", {})}
    assert pushed == {f"{written[0]}_seg.dcm"}

    rerun = _run(orthanc, out, segmenter, push=True)
    assert exit_code(rerun.results) == 0
    assert (rerun.retrieved, rerun.kept, rerun.stored, rerun.push_failed) == (1, 1, 1, 0)
    assert rerun.requests.get("POST") == 1  # exactly the rest
    assert orthanc.modality_count("SEG") == 2
    assert all(r.pushed for r in rerun.results if r.status == "done")


class _SlowArchive:
    """A stand-in STOW-RS client (unit test): stores after ``delay`` s, holds what it stored."""

    def __init__(self, delay=0.0, refuse=()):
        import threading

        self.delay, self.refuse, self.held, self.calls = delay, set(refuse), set(), 0
        self.gate = threading.Event()  # stores wait until it is set
        self.gate.set()

    def store_instances(self, datasets, study_instance_uid=None):
        import time

        import requests

        self.calls += 1
        assert self.gate.wait(30), "the test never released the store"
        time.sleep(self.delay)
        for ds in datasets:
            if str(ds.SOPInstanceUID) in self.refuse:
                response = requests.Response()
                response.status_code, response.reason = 409, "Conflict"
                raise requests.HTTPError(response=response)
            self.held.add(str(ds.SOPInstanceUID))

    def search_for_instances(self, study_instance_uid=None, search_filters=None):
        return [{}] if search_filters["SOPInstanceUID"] in self.held else []


def _fake_seg(path, uid):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.save_as(path, enforce_file_format=True)


def test_pusher_stores_in_the_background_bounded_and_resumable(tmp_path):
    """The worker stores while the caller goes on (submit returns before the STOW ends), the queue is
    bounded, a refused store is the case's push_error alone, and a second pusher over the same state
    stores exactly what is missing."""

    from pipeline.archive.push import Pusher
    from pipeline.archive.state import ArchiveState
    from pipeline.batch.result import CaseResult

    results = []
    for k in range(4):
        _fake_seg(tmp_path / f"c{k}_seg.dcm", f"1.2.3.{k}")
        results.append(CaseResult(f"c{k}", "src", "done", dicom_seg=str(tmp_path / f"c{k}_seg.dcm")))
    state = ArchiveState(tmp_path / STATE_NAME, "http://archive")
    archive = _SlowArchive(delay=0.2, refuse={"1.2.3.2"})
    recorded = []
    pusher = Pusher(archive, state, tmp_path, record=recorded.append, redact_text=str, max_queued=1)
    archive.gate.clear()  # the first STOW cannot finish before the test lets it
    pusher.submit(results[0], "s0")
    assert archive.held == set()  # submit returned without waiting for the STOW
    archive.gate.set()
    for k in (1, 2, 3):
        pusher.submit(results[k], f"s{k}")
    pusher.close()
    assert archive.held == {"1.2.3.0", "1.2.3.1", "1.2.3.3"} and (pusher.stored, pusher.failed) == (3, 1)
    assert [r.case_id for r in recorded] == ["c0", "c1", "c2", "c3"]
    assert [r.pushed for r in results] == [True, True, False, True]
    assert results[2].push_error == "c2_seg.dcm: store refused: HTTP 409 Conflict"
    on_disk = json.loads((tmp_path / STATE_NAME).read_text())["series"]
    assert sorted(on_disk) == ["s0", "s1", "s3"]  # recorded only once held

    archive.refuse.clear()
    again = Pusher(archive, ArchiveState(tmp_path / STATE_NAME, "http://archive"), tmp_path, record=lambda r: None,
                   redact_text=str)
    for k, result in enumerate(results):
        again.submit(result, f"s{k}")
    again.close()
    assert (again.stored, again.failed, archive.calls) == (1, 0, 5)  # exactly the missing one


_KILLED_RUN = '''
import json, os, signal, sys, time
from pathlib import Path
from pipeline.archive.run import ArchiveOptions, segment_archive
from pipeline.config import load_config
from pipeline.infer import Segmenter
from tests.batch.test_batch import Above100HU

url, out = sys.argv[1], Path(sys.argv[2])
config = load_config(None, ["preprocess.spacing=null", "preprocess.intensity.window=[0, 200]",
                            "preprocess.crop_foreground=false", "inference.roi_size=[64, 64, 32]",
                            "inference.min_component_mm3=0"])

def killed_once_stored(result):
    deadline = time.time() + 30
    while time.time() < deadline:  # the first case's SEG stored (by the pusher thread), then a hard kill
        try:
            series = json.loads((out / "dicomweb-state.json").read_text())["series"]
            if any(entry.get("pushed") for entry in series.values()):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

segment_archive(url, out, Segmenter(Above100HU(), config, "cpu"), archive=ArchiveOptions(push=True), qc=False,
                isolate_reading=False, on_case=killed_once_stored)
'''


def test_a_killed_run_has_stored_its_first_case_and_the_re_run_stores_exactly_the_rest(
        orthanc, ct_studies, tmp_path, segmenter):  # noqa: F811
    """A child process running ``segment_archive --push`` is killed (SIGKILL, no clean-up) after its first
    case: that case's SEG is in the archive, the state file is whole, and the re-run stores the other."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.archive.conftest import PASSWORD, USER

    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MEDSEG_DICOMWEB_USER=USER,
               MEDSEG_DICOMWEB_PASSWORD=PASSWORD)
    child = subprocess.run([sys.executable, "-c", _KILLED_RUN, orthanc.dicomweb, str(out)], env=env, cwd=root,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert orthanc.modality_count("SEG") == 1
    state = json.loads((out / STATE_NAME).read_text())["series"]  # whole: written atomically
    assert sum(len(entry.get("pushed", {})) for entry in state.values()) == 1

    rerun = _run(orthanc, out, segmenter, push=True)
    assert exit_code(rerun.results) == 0
    assert (rerun.retrieved, rerun.kept, rerun.stored) == (1, 1, 1)
    assert rerun.requests.get("POST") == 1
    assert orthanc.modality_count("SEG") == 2
