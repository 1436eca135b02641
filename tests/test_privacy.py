"""Patient identity stays out of every output by default (pipeline/io/privacy.py, README "Privacy").

A DICOM study whose PatientName, PatientID and AccessionNumber are also its folder names goes through
``segment``, ``convert`` and ``evaluate``; then every byte of every file they wrote (masks, sidecars,
manifests, lesion table, index page, QC pictures, logs, the lock, the ONNX cache, convert's NIfTI and
index, evaluate's tables and plots) and the console are searched for those identifiers.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.batch.report.lock import OutputLock
from pipeline.cli import main
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.privacy import Redactor, patient_token
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_checkpoint, torch_threads

NAME, PID, ACCESSION = "DOE^JOHN", "PID12345", "ACC998877"
RAW = [NAME, PID, ACCESSION]  # searched byte for byte in every file, text or binary
# and, where a file holds text (text files, NIfTI headers, PNG text chunks), in any case and with any
# punctuation between their letters; the name parts as words of their own
WORDS = [re.compile(p, re.I) for p in (r"doe[^a-z0-9]*john", r"(?<![a-z])doe(?![a-z])", r"(?<![a-z])john(?![a-z])",
                                       r"pid[^a-z0-9]*12345", r"acc[^a-z0-9]*998877")]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def write_study(root: Path) -> Path:
    """``root/DOE^JOHN/PID12345/ACC998877/CT`` (a DICOM series of that patient), a NIfTI scan, a broken scan
    and an unrecognised file in the patient's folders."""
    affine = make_affine("LPS", spacing=(0.9, 0.9, 2.5))
    image, _ = ct_case((24, 24, 12), seed=0)
    study = root / NAME / PID / ACCESSION
    write_dicom_series(image, affine, study / "CT", patient_id=PID, patient_name=NAME,
                       accession_number=ACCESSION, series_description="abdomen", uid_entropy=["privacy"])
    save_nifti(ct_case((24, 24, 12), seed=1)[0], affine, root / NAME / "followup_0000.nii.gz")
    broken = save_nifti(image, affine, study / f"{PID}_broken.nii.gz")
    broken.write_bytes(broken.read_bytes()[:200])  # fails to read: its error names the file
    (study / "CT" / f"notes_{NAME}.txt").write_text("not a scan")  # skipped: the reason lists file names
    return root


def text_of(path: Path, data: bytes) -> str:
    """What of a file can hold text: all of a text file, a NIfTI header (with extensions), PNG text chunks;
    compressed pixels and weights are left to the byte search."""
    name = path.name
    if name.endswith(".gz"):
        data = gzip.decompress(data)
        name = name[:-3]
    if name.endswith(".nii"):
        return data[: int(struct.unpack("<f", data[108:112])[0])].decode("latin-1")
    if name.endswith(".png"):
        chunks, pos = [], 8
        while pos < len(data):
            length, kind = struct.unpack(">I4s", data[pos: pos + 8])
            body = data[pos + 8: pos + 8 + length]
            if kind in (b"tEXt", b"iTXt"):
                chunks.append(body)
            elif kind == b"zTXt":
                chunks.append(zlib.decompress(body[body.index(b"\0") + 2:]))
            pos += 12 + length
        return b"\n".join(chunks).decode("latin-1")
    if name.endswith((".onnx", ".pt", ".dcm", ".bin")):  # weights (.bin: OpenVINO IR's), pixels
        return ""
    return data.decode("utf-8")


def hits(name: str, data: bytes, text: str) -> list[str]:
    found = [f"{name}: {raw!r} (bytes)" for raw in RAW if raw.encode() in data]
    return found + [f"{name}: /{w.pattern}/" for w in WORDS if w.search(text)]


def test_no_patient_identity_in_any_output(tmp_path, monkeypatch, capsys, caplog):
    root = write_study(tmp_path / "in")
    model = tiny_checkpoint(tmp_path / "model" / "best.pt")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(cache))
    locks: list[bytes] = []
    release = OutputLock.release

    def keep_lock(self):  # the lock exists only while the run holds it
        if self.path.is_file():
            locks.append(self.path.read_bytes())
        release(self)

    monkeypatch.setattr(OutputLock, "release", keep_lock)
    out, conv, evaluation, truth = (tmp_path / n for n in ("out", "conv", "eval", "truth"))
    assert main(["segment", str(root), str(out), "--model", str(model), "--device", "cpu"]) == 1  # 1 failed
    assert main(["convert", str(root), str(conv)]) == 1
    truth.mkdir()
    for mask in sorted(out.glob("*_seg.nii.gz")):  # ground truth: the masks themselves
        nib.save(nib.load(str(mask)), str(truth / mask.name.replace("_seg.nii.gz", ".nii.gz")))
    assert main(["evaluate", str(out), str(truth), "--out", str(evaluation)]) == 0
    console = capsys.readouterr()

    # What the run made, in the public form.
    token = patient_token(NAME)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {r["case_id"]: r for r in manifest["cases"] if r["case_id"]}
    dicom_id = f"{token}_{patient_token(PID)}_{patient_token(ACCESSION)}_CT"
    assert rows[dicom_id]["status"] == "done"
    assert rows[dicom_id]["source"] == f"in/{token}/{patient_token(PID)}/{patient_token(ACCESSION)}/CT"
    assert rows[f"{token}_followup"]["source"] == f"in/{token}/followup_0000.nii.gz"
    failed = [r for r in manifest["cases"] if r["status"] == "failed"]
    assert len(failed) == 1 and "cannot read NIfTI 'in/patient-" in failed[0]["error"]
    assert manifest["input_dir"] == "in" and locks and b"pid" in locks[0]

    files = sorted(p for folder in (out, conv, evaluation, cache) for p in folder.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"manifest.csv", "manifest.json", "lesions.csv", "index.html", "segment.log", f"{dicom_id}_seg.nii.gz",
            f"{dicom_id}_seg.json", f"{dicom_id}.png", f"{dicom_id}.nii.gz", "index.csv", "metrics.csv",
            "summary.json", "dice.png"} <= names
    assert any(n.endswith(".onnx") for n in names)
    found = []
    for path in files:
        data = path.read_bytes()
        found += hits(str(path.relative_to(tmp_path)), data, text_of(path, data))
    for n, lock in enumerate(locks):
        found += hits(f"lock {n}", lock, lock.decode())
    for what, text in (("stdout", console.out), ("stderr", console.err), ("log records", caplog.text)):
        found += hits(what, text.encode(), text)
    assert len(files) >= 20
    assert found == [], found
    # The search finds what it looks for: in a source slice, and in the forms text takes.
    source = next((root / NAME / PID / ACCESSION / "CT").glob("*.dcm"))
    assert len(hits("source", source.read_bytes(), "")) == 3
    assert len(hits("text", b"", "doe, john: Doe John pid-12345 acc_998877")) == 5


def test_keep_paths_writes_the_full_paths(tmp_path, monkeypatch):
    root = write_study(tmp_path / "in")
    model = tiny_checkpoint(tmp_path / "model" / "best.pt")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["segment", str(root), str(tmp_path / "out"), "--model", str(model), "--device", "cpu",
                 "--backend", "torch", "--keep-paths"]) == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_dir"] == str(root)
    sources = {r["source"] for r in manifest["cases"]}
    assert str(root / NAME / PID / ACCESSION / "CT") in sources
    assert main(["convert", str(root), str(tmp_path / "conv"), "--keep-paths"]) == 1
    assert str(root / NAME / "followup_0000.nii.gz") in (tmp_path / "conv" / "index.csv").read_text()


def test_dicom_seg_carries_the_patient_module(tmp_path, monkeypatch):
    """The standard requires it: the SEG is the one output with the patient's identity (README, Privacy)."""
    pytest.importorskip("highdicom")
    import pydicom

    root = write_study(tmp_path / "in")
    model = tiny_checkpoint(tmp_path / "model" / "best.pt")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["segment", str(root), str(tmp_path / "out"), "--model", str(model), "--device", "cpu",
                 "--backend", "torch", "--dicom-seg", "--no-qc"]) == 1
    (seg,) = (tmp_path / "out").glob("*_seg.dcm")
    ds = pydicom.dcmread(str(seg))
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (NAME, PID, ACCESSION)
    assert patient_token(NAME) in seg.name  # its file name, like every other, does not name the patient
    from tests.dicom_validate import assert_valid

    assert_valid(seg)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            assert not [raw for raw in RAW if raw.encode() in path.read_bytes()], path


def test_redactor_paths_and_messages(tmp_path):
    redact = Redactor(tmp_path / "in", [NAME, PID, ACCESSION])
    assert redact.path(tmp_path / "in" / "Doe_John_2020" / "ct") == f"in/{patient_token('Doe_John_2020')}/ct"
    assert redact.path(tmp_path / "in" / "chest") == "in/chest"
    message = redact.text(f"cannot read '{tmp_path}/in/Doe_John_2020/ct/x.dcm' of john doe, {PID}x")
    assert message == (f"cannot read 'in/{patient_token('Doe_John_2020')}/ct/x.dcm' of "
                       f"{patient_token('JOHN')} {patient_token('DOE')}, {patient_token(PID)}x")
    assert Redactor("in", []).text("the in folder") == "the in folder"  # a bare name is not replaced
    kept = Redactor(tmp_path / "in", [NAME], keep_paths=True)
    assert kept.path(tmp_path / "in" / NAME) == str(tmp_path / "in" / NAME) and kept.text(NAME) == NAME


def test_mask_header_carries_no_source_texts(tmp_path):
    from pipeline.io.write import write_mask

    affine = make_affine("RAS")
    source = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine)
    source.header["descrip"], source.header["aux_file"] = NAME.encode(), PID.encode()
    source.header.extensions.append(nib.nifti1.Nifti1Extension("comment", ACCESSION.encode()))
    nib.save(source, str(tmp_path / "scan.nii.gz"))
    write_mask(np.zeros((4, 4, 4), np.uint8), affine, tmp_path / "mask.nii.gz", source=tmp_path / "scan.nii.gz")
    data = gzip.decompress((tmp_path / "mask.nii.gz").read_bytes())
    assert not [raw for raw in RAW if raw.encode() in data]
    assert nib.load(str(tmp_path / "mask.nii.gz")).header["descrip"].tobytes().rstrip(b"\0") == b"medseg mask"
