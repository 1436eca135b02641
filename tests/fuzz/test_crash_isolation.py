"""A native crash while reading one scan (here ``os.abort()`` in the reader process, as GDCM or ITK
would die on a file that crashes them) fails that case only: the others are done, the run goes on with
a new reader process, and ``medseg segment`` exits 1 with the reason in the manifest."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.io import isolated
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.isolated import IsolatedReader, ReaderCrashed
from tests.conftest import make_affine, save_nifti
from tests.fuzz.crash import abort_on_marker, exit_on_marker
from tests.helpers import ct_case, tiny_checkpoint


def test_a_crashing_read_fails_its_case_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(isolated, "READ_FUNCTION", abort_on_marker)
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.5))
    for name in ("a_good", "b_crash_me", "c_good"):  # case-id order: the crash is between two good cases
        save_nifti(ct_case((24, 24, 12), seed=1)[0], affine, tmp_path / "in" / f"{name}.nii.gz")
    write_dicom_series(ct_case((24, 24, 12), seed=2)[0].astype(np.int16), affine, tmp_path / "in" / "d_dicom")
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")

    code = main(["segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(checkpoint),
                 "--device", "cpu", "--no-qc"])

    _, stderr = capsys.readouterr()
    assert code == 1, stderr
    with open(tmp_path / "out" / "manifest.csv", newline="") as handle:
        rows = {r["case_id"]: r for r in csv.DictReader(handle)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "a_good": "done", "b_crash_me": "failed", "c_good": "done", "d_dicom": "done"}
    assert rows["b_crash_me"]["error"] == "the reader crashed (signal SIGABRT) on in/b_crash_me.nii.gz"
    assert "Traceback" not in stderr and not (tmp_path / "out" / "b_crash_me_seg.nii.gz").exists()


def test_the_reader_gives_what_read_scan_gives_and_its_errors(tmp_path):
    from pipeline.errors import InputError
    from pipeline.io.read_scan import read_scan

    image = ct_case((10, 12, 6), seed=3)[0]
    path = save_nifti(image, make_affine("LPS"), tmp_path / "scan.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all" * 30)
    with IsolatedReader(abort_on_marker) as reader:
        loaded = reader.read(str(path))
        direct = read_scan(str(path))
        np.testing.assert_array_equal(loaded.array, direct.array)
        np.testing.assert_allclose(loaded.affine, direct.affine)
        assert loaded.array.flags.writeable and (loaded.source, loaded.source_format) == (str(path), "nifti")
        with pytest.raises(InputError, match="cannot read NIfTI"):
            reader.read(str(tmp_path / "bad.nii.gz"))
        with pytest.raises(ReaderCrashed, match="SIGABRT"):
            reader.read(str(tmp_path / "crash_me.nii.gz"))
        np.testing.assert_array_equal(reader.read(str(path)).array, direct.array)  # a new reader
    assert not list(tmp_path.glob("*.npy"))
    with IsolatedReader(exit_on_marker) as reader:  # a reader that exits (and removes its folder)
        with pytest.raises(ReaderCrashed, match=r"exited unexpectedly \(status 3\)"):
            reader.read(str(tmp_path / "crash_me.nii.gz"))
        np.testing.assert_array_equal(reader.read(str(path)).array, direct.array)


def test_without_background_threads_and_after_the_caller_dies(tmp_path, monkeypatch):
    from pipeline.batch import segment_folder

    monkeypatch.setattr(isolated, "READ_FUNCTION", abort_on_marker)
    affine = make_affine("RAS", spacing=(1.0, 1.0, 2.5))
    for name in ("a", "b_crash_me", "c"):
        save_nifti(ct_case((24, 24, 12), seed=1)[0], affine, tmp_path / "in" / f"{name}.nii.gz")
    results = segment_folder(tmp_path / "in", tmp_path / "out", tiny_checkpoint(tmp_path / "model.pt"),
                             device="cpu", qc=False, background=False)
    assert [(r.case_id, r.status) for r in results] == [("a", "done"), ("b_crash_me", "failed"), ("c", "done")]
    assert "signal SIGABRT" in results[1].error

    reader = IsolatedReader()  # a caller that goes away without closing: the pipe closes, the reader ends
    reader.start()
    folder, process = reader._folder, reader._process
    reader._conn.close()
    process.wait(timeout=30)
    assert not folder.exists()
