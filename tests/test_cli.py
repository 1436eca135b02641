"""The ``medseg`` command line: bad input gives one ``error:`` line and a non-zero exit, never a traceback;
``--debug`` shows the traceback; one bad scan fails alone while the others are segmented."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import CheckpointError, ConfigError, InputError
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_checkpoint, tiny_config_overrides, torch_threads, write_msd_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_scans(folder: Path, n=2, shape=(24, 24, 12)) -> list[Path]:
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.5))
    return [save_nifti(ct_case(shape, seed=k)[0], affine, folder / f"scan_{k}_0000.nii.gz") for k in range(n)]


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "model" / "best.pt")


# --- help ------------------------------------------------------------------------------------------


def test_help_is_quick_and_exits_zero():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: medseg")
    for command in ("synth", "train", "segment", "evaluate", "demo"):
        assert command in result.stdout
    assert result.stderr == ""
    assert seconds < 10  # heavy libraries are imported lazily


def test_help_imports_no_heavy_library():
    code = "import sys, pipeline.cli; print([m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "[]"


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", "--help"])
    assert info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_argparse_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as info:
        main(["synth", "out", "--cases", "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("kind, channels", [(None, {"0": "CT"}), ("mr", {"0": "FLAIR", "1": "T1c"})])
def test_synth_kind(tmp_path, capsys, kind, channels):
    out = tmp_path / "ds"
    argv = ["synth", str(out), "--cases", "2", "--test-fraction", "0.5", "--dicom-test-cases", "0"]
    code, stdout, _ = run(capsys, *argv, *(["--kind", kind] if kind else []))
    assert code == 0 and str(out) in stdout
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == channels


# --- segment ---------------------------------------------------------------------------------------


def test_segment_missing_input(tmp_path, capsys, checkpoint):
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, "segment", str(missing), str(tmp_path / "out"), "--model", str(checkpoint))
    assert code == 2
    assert_one_error_line(err, "input folder not found", str(missing))
    assert not (tmp_path / "out").exists()


def test_segment_missing_input_in_a_subprocess(tmp_path):
    """The real process: logging to stderr as configured by the CLI, still one line and no traceback."""
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "segment", str(missing), str(tmp_path / "out"), "--model", "x.pt"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "input folder not found", str(missing))


def test_segment_missing_checkpoint(tmp_path, capsys):
    write_scans(tmp_path / "in", n=1)
    missing = tmp_path / "model" / "best.pt"
    code, out, err = run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(missing))
    assert code == 2
    assert_one_error_line(err, "model checkpoint not found", str(missing), "medseg train")




@pytest.mark.parametrize("content", [b"not a checkpoint at all", pytest.param(b""),
                                     b"PK\x03\x04 truncated zip"], ids=["text", "empty", "truncated"])
def test_segment_model_that_is_not_a_checkpoint(tmp_path, capsys, content):
    write_scans(tmp_path / "in", n=1)
    fake = tmp_path / "fake.pt"
    fake.write_bytes(content)
    code, out, err = run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(fake))
    assert code == 2
    assert_one_error_line(err, "checkpoint", str(fake))


def test_segment_model_that_is_a_foreign_torch_file(tmp_path, capsys):
    import torch

    write_scans(tmp_path / "in", n=1)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    code, out, err = run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(foreign))
    assert code == 2
    assert_one_error_line(err, "is not a medseg checkpoint", str(foreign))


def test_segment_empty_input_folder(tmp_path, capsys, checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no scans here")
    code, out, err = run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(checkpoint))
    assert code == 2
    assert_one_error_line(err, "no scans found", str(tmp_path / "in"))


def test_segment_good_scans(tmp_path, capsys, checkpoint):
    scans = write_scans(tmp_path / "in", n=2)
    code, out, err = run(capsys, "segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(checkpoint), "--device", "cpu")
    assert code == 0, err
    assert f"segmented 2/2 cases into {tmp_path / 'out'}" in out
    for k, scan in enumerate(scans):
        mask = nib.load(str(tmp_path / "out" / f"scan_{k}_seg.nii.gz"))
        assert mask.shape == (24, 24, 12) and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, nib.load(str(scan)).affine, atol=1e-6)


def test_segment_truncated_scan_fails_alone(tmp_path, capsys, checkpoint):
    write_scans(tmp_path / "in", n=2)
    bad = save_nifti(ct_case((40, 40, 20), seed=9)[0], make_affine("RAS"), tmp_path / "in" / "bad.nii.gz")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    code, out, err = run(capsys, "segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(checkpoint), "--device", "cpu")

    assert code == 1
    assert "segmented 2/3 cases" in out and "1 failed" in out
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1
    assert failed[0].startswith("failed: bad (in/bad.nii.gz): cannot read NIfTI 'in/bad.nii.gz'")  # no full path
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["scan_0_seg.nii.gz", "scan_1_seg.nii.gz"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written


def test_segment_only_bad_scans_exits_2(tmp_path, capsys, checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.nii.gz").write_text("not a scan")
    code, out, err = run(capsys, "segment", "-q", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(checkpoint), "--device", "cpu")
    assert code == 2
    assert "segmented 0/1 cases" in out
    assert "failed: junk" in err and "Traceback" not in err


# --- train -----------------------------------------------------------------------------------------


def test_train_config_typo(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run(capsys, "train", "configs/demo.yaml", "train.epoch=5")
    assert code == 2
    assert_one_error_line(err, "unknown config key 'train.epoch'", "Did you mean 'train.epochs'?")
    assert out == ""


def test_train_missing_config(tmp_path, capsys):
    code, out, err = run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_one_error_line(err, "config file not found", str(tmp_path / "nope.yaml"))


def test_train_bad_override_value(capsys):
    code, out, err = run(capsys, "train", str(ROOT / "configs" / "demo.yaml"), "inference.overlap=1.5")
    assert code == 2
    assert_one_error_line(err, "'inference.overlap'", "1.5", "[0.0, 0.95]")


def test_train_missing_data_root(tmp_path, capsys):
    code, out, err = run(capsys, "train", "-q", str(ROOT / "configs" / "demo.yaml"),
                         f"data.root={tmp_path / 'nodata'}", f"train.out_dir={tmp_path / 'run'}",
                         "train.device=cpu")
    assert code == 2
    assert_one_error_line(err, "training data folder not found", str(tmp_path / "nodata"))


def train_args(tmp_path, *extra):
    return [
        "train", "-q", str(ROOT / "configs" / "demo.yaml"),
        *tiny_config_overrides(),
        f"data.root={tmp_path / 'ds'}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "sampling.samples_per_volume=1",
        "sampling.batch_size=1",
        *extra,
    ]


def test_train_label_outside_classes(tmp_path, capsys):
    """The dataset check before training lists every case whose label is outside the classes, on one line."""
    write_msd_dataset(tmp_path / "ds", n_cases=3, label_values=[2, 2, 2])
    code, out, err = run(capsys, *train_args(tmp_path))
    assert code == 2
    line = assert_one_error_line(err, "has 3 problem(s)", "holds values [2] outside the labels", "medseg check")
    assert all(f"labelsTr/case_00{k}.nii.gz" in line for k in range(3))
    assert "--debug" not in line


def test_train_tiny_run_writes_checkpoints(tmp_path, capsys):
    write_msd_dataset(tmp_path / "ds", n_cases=3)
    code, out, err = run(capsys, *train_args(tmp_path))
    assert code == 0, err
    assert f"best checkpoint: {tmp_path / 'run' / 'best.pt'}" in out
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()


# --- evaluate --------------------------------------------------------------------------------------


def test_evaluate_grid_mismatch(tmp_path, capsys):
    save_nifti(np.zeros((8, 8, 4), np.uint8), make_affine("RAS"), tmp_path / "pred" / "c1_seg.nii.gz")
    save_nifti(np.zeros((8, 8, 5), np.uint8), make_affine("RAS"), tmp_path / "gt" / "c1.nii.gz")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"))
    assert code == 2
    assert_one_error_line(err, "case c1", "not on the same grid")


def test_evaluate_prints_table_and_summary(tmp_path, capsys):
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:5, 2:5, 1:3] = 1
    save_nifti(label, make_affine("RAS"), tmp_path / "pred" / "c1_seg.nii.gz")
    save_nifti(label, make_affine("RAS"), tmp_path / "gt" / "c1.nii.gz")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                         str(tmp_path / "report"))
    assert code == 0
    assert "c1" in out and "1.000" in out and "lesion recall: 1.00" in out
    assert (tmp_path / "report" / "summary.json").is_file()


# --- --debug ---------------------------------------------------------------------------------------


def test_debug_reraises_config_error(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="train.epochs"):
        main(["train", "--debug", "configs/demo.yaml", "train.epoch=5"])


def test_debug_reraises_input_error(tmp_path):
    with pytest.raises(InputError, match="input folder not found"):
        main(["segment", "--debug", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", "x.pt"])


def test_debug_reraises_checkpoint_error(tmp_path):
    write_scans(tmp_path / "in", n=1)
    with pytest.raises(CheckpointError, match="model checkpoint not found"):
        main(["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "x.pt"),
              "--debug"])




def test_debug_before_the_command_reraises(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="train.epochs"):
        main(["--debug", "train", "configs/demo.yaml", "train.epoch=5"])


class _Terminal(io.StringIO):
    """stderr as a terminal: progress bars are drawn only there (pipeline/progress.py)."""

    def isatty(self) -> bool:
        return True


def as_terminal(monkeypatch) -> _Terminal:
    """Replace stderr in the test's body (pytest's capture resets it after the fixtures)."""
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.mark.parametrize("quiet_first", [True, False])
def test_quiet_hides_progress(tmp_path, monkeypatch, checkpoint, quiet_first):
    write_scans(tmp_path / "in", n=1)
    terminal = as_terminal(monkeypatch)
    command = ["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(checkpoint),
               "--device", "cpu"]
    assert main(["-q", *command] if quiet_first else [command[0], "-q", *command[1:]]) == 0
    assert "segment:" not in terminal.getvalue()  # the tqdm bar over cases


def test_progress_is_shown_on_a_terminal(tmp_path, monkeypatch, checkpoint):
    write_scans(tmp_path / "in", n=1)
    terminal = as_terminal(monkeypatch)
    assert main(["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(checkpoint),
                 "--device", "cpu"]) == 0
    assert "segment:" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_no_progress_bar_off_a_terminal(tmp_path, capsys, caplog, checkpoint):
    """A log file, CI or a pipe gets one line per case, never carriage-return frames."""
    write_scans(tmp_path / "in", n=2)
    code, out, err = run(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                         "--model", str(checkpoint), "--device", "cpu")
    assert code == 0
    assert "\r" not in err and "segment:" not in err
    assert "case scan_0 done" in caplog.text and "case scan_1 done" in caplog.text


def test_train_device_sets_train_device(monkeypatch):
    import pipeline.config

    seen = []

    def fake_load(path, overrides):
        seen.append(list(overrides))
        raise ConfigError("stop here")

    monkeypatch.setattr(pipeline.config, "load_config", fake_load)
    assert main(["train", "configs/demo.yaml", "train.epochs=1", "--device", "cpu"]) == 2
    assert seen == [["train.epochs=1", "train.device=cpu"]]
