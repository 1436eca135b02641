"""``medseg segment dicomweb+http://...`` as a user runs it, against a real Orthanc that requires basic
auth: the password reaches the archive from the environment or a 0600 file, and appears in no log,
manifest, state file, sidecar, console line or process listing (argv of every process while it runs)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.archive.conftest import PASSWORD, USER
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _medseg(args, env_extra: dict, cwd: Path):
    """Run the CLI in a child process; meanwhile read every process's argv. (stdout, stderr, rc, argvs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_DICOMWEB_")}
    env.update(env_extra, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "segment", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    argvs = set()
    while process.poll() is None:
        argvs |= _all_argv()
        time.sleep(0.1)
    out, err = process.communicate(timeout=300)
    return out, err, process.returncode, argvs


def _all_argv() -> set:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


def _secrets() -> list[str]:
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


def _assert_nowhere(texts, out_dir: Path, forbidden: list[str]) -> None:
    for text in texts:
        for secret in forbidden:
            assert secret not in text
    for path in out_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in forbidden:
                assert secret.encode() not in data, path.name


@pytest.mark.slow
def test_credentials_reach_the_archive_and_nothing_else(orthanc, ct_studies, tmp_path, monkeypatch, capsys):
    model = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    args = [orthanc.dicomweb, str(out), "--model", str(model), "--push", "--no-qc"]

    # no credentials: a one-line error that says where they go, exit 2 (in this process: quicker)
    for name in ("MEDSEG_DICOMWEB_USER", "MEDSEG_DICOMWEB_PASSWORD", "MEDSEG_DICOMWEB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["segment", *args]) == 2
    assert "HTTP 401" in capsys.readouterr().err

    # from the environment
    stdout, stderr, rc, argvs = _medseg(args, {"MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": PASSWORD},
                                        tmp_path)
    assert rc == 0, stderr
    assert "retrieved 2" in stdout and "stored 2 file(s)" in stdout
    assert any("segment" in a and orthanc.dicomweb in a for a in argvs)  # the listing was really read
    rows = json.loads((out / "manifest.json").read_text())["cases"]
    assert len(rows) == 2 and all(r["status"] == "done" and r["pushed"] for r in rows)
    _assert_nowhere([stdout, stderr, *argvs], out, _secrets())
    # patient identity stays out of every file but the SEGs themselves (which must carry it)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            text = path.read_bytes()
            assert b"DOE^JANE" not in text and b"PID-SECRET" not in text, path.name
        assert "JANE" not in path.name and "SECRET" not in path.name

    # from a file: refused unless mode 0600; then a re-run (with --debug logs) retrieves and stores nothing
    credentials = tmp_path / "pacs.txt"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    credentials.chmod(0o644)
    assert main(["segment", *args, "--credentials", str(credentials)]) == 2
    stderr = capsys.readouterr().err
    assert "mode 0644" in stderr and "chmod 600" in stderr
    credentials.chmod(0o600)
    stdout, stderr, rc, argvs = _medseg([*args, "--credentials", str(credentials), "--debug"], {}, tmp_path)
    assert rc == 0, stderr
    assert "retrieved 0, 2 kept from an earlier run; stored 0 file(s)" in stdout
    _assert_nowhere([stdout, stderr, *argvs], out, _secrets())
    assert orthanc.modality_count("SEG") == 2
