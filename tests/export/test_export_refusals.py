"""What ``medseg export`` refuses, and that a refused export leaves nothing behind."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.errors import CheckpointError, ConfigError
from pipeline.export import export_model
from tests.helpers import tiny_checkpoint


@pytest.mark.parametrize("overrides, reason", [
    (("model.padding=valid",), "model.padding 'valid'"),
])
def test_bundle_refuses_what_it_cannot_represent(tmp_path, overrides, reason):
    ckpt = tiny_checkpoint(tmp_path / "model.pt", *overrides)
    with pytest.raises(ConfigError, match="cannot be represented as a MONAI bundle") as info:
        export_model(ckpt, tmp_path / "bundle", "bundle")
    assert reason in str(info.value) and "Nothing was written" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torchscript", "m.ts"), ("bundle", "bundle")])
def test_verification_mismatch_removes_the_output(tmp_path, monkeypatch, fmt, name):
    import pipeline.export.network as network

    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr(network, "TOLERANCE", -1.0)  # nothing can match: the export must be refused
    with pytest.raises(ConfigError, match=rf"export verification \({'torchscript' if fmt == 'bundle' else fmt}\)"):
        export_model(ckpt, tmp_path / name, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_existing_output_needs_overwrite(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "m.onnx").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export_model(ckpt, tmp_path / "m.onnx", "onnx")
    assert (tmp_path / "m.onnx").read_text() == "keep me"
    export_model(ckpt, tmp_path / "m.onnx", "onnx", overwrite=True)
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_text("no")
    with pytest.raises(CheckpointError):
        export_model(tmp_path / "x.pt", tmp_path / "m.onnx", "onnx")


def test_cli_export(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    assert main(["export", str(ckpt), str(tmp_path / "m.ts"), "--format", "torchscript"]) == 0
    assert "exported torchscript" in capsys.readouterr().out
    assert (tmp_path / "m.ts").is_file()
    assert main(["-q", "export", str(ckpt), str(tmp_path / "m.ts")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    valid = tiny_checkpoint(tmp_path / "valid.pt", "model.padding=valid")
    assert main(["-q", "export", str(valid), str(tmp_path / "b"), "--format", "bundle"]) == 2
    assert "model.padding 'valid'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
