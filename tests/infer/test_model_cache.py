"""The model cache: least-recently-used pruning beyond MEDSEG_CACHE_MAX_GB, `medseg cache list|clear`."""

from __future__ import annotations

import os

import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.infer.cache import cache_dir, clear_cache, list_cache, max_cache_bytes, prune_cache, touch


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDSEG_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache"


def put(kind: str, name: str, size: int, used: float):
    path = cache_dir() / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (used, used))
    return path


def fill():
    """Five entries of 100 bytes (the OpenVINO IR: 60 + 40 bytes in two files), used at t = 1000..5000."""
    return {
        "old_onnx": put("onnx", "a.onnx", 100, 1000),
        "ir_xml": put("openvino", "a-ov.xml", 60, 2000),
        "ir_bin": put("openvino", "a-ov.bin", 40, 2000),
        "int8": put("int8", "a-int8.onnx", 100, 3000),
        "decision": put("backend", "a.json", 100, 4000),
        "new_onnx": put("onnx", "b.onnx", 100, 5000),
    }


def test_prune_deletes_least_recently_used_beyond_the_cap_and_keeps_the_newest():
    files = fill()
    deleted = prune_cache(max_bytes=300)
    assert deleted == [files["old_onnx"], files["ir_bin"], files["ir_xml"]] or \
        deleted == [files["old_onnx"], files["ir_xml"], files["ir_bin"]]  # the IR's two files go together
    assert {p.name for p in cache_dir().rglob("*") if p.is_file()} == {"a-int8.onnx", "a.json", "b.onnx"}
    assert list_cache()["total_bytes"] == 300
    assert prune_cache(max_bytes=300) == []  # within the cap: nothing more


def test_prune_never_deletes_the_file_just_written():
    files = fill()
    touch(files["int8"])  # used now: the newest
    deleted = prune_cache(keep=[files["old_onnx"]], max_bytes=200)
    assert files["old_onnx"].is_file() and files["int8"].is_file()
    assert not files["ir_xml"].exists() and not files["decision"].exists() and not files["new_onnx"].exists()
    assert len(deleted) == 4


def test_cap_from_the_environment(monkeypatch):
    assert max_cache_bytes() == 2_000_000_000  # default 2 GB
    monkeypatch.setenv("MEDSEG_CACHE_MAX_GB", "0.0000003")
    assert max_cache_bytes() == 300
    files = fill()
    prune_cache(keep=[files["new_onnx"]])
    assert list_cache()["total_bytes"] == 300 and files["new_onnx"].is_file()
    monkeypatch.setenv("MEDSEG_CACHE_MAX_GB", "0")
    assert max_cache_bytes() is None and prune_cache() == []
    monkeypatch.setenv("MEDSEG_CACHE_MAX_GB", "lots")
    with pytest.raises(ConfigError, match="MEDSEG_CACHE_MAX_GB: expected a number"):
        max_cache_bytes()


def test_clear_empties_what_it_says():
    fill()
    assert clear_cache("int8") == {"files": 1, "bytes": 100}
    listing = list_cache()
    assert listing["kinds"]["int8"]["files"] == 0
    assert listing["kinds"]["onnx"]["files"] == 2 and listing["kinds"]["openvino"]["files"] == 2
    assert clear_cache("openvino") == {"files": 2, "bytes": 100}
    assert clear_cache("all") == {"files": 3, "bytes": 300}
    assert list_cache()["total_bytes"] == 0
    with pytest.raises(ConfigError, match="expected one of onnx, int8, openvino, backend, all"):
        clear_cache("tensorrt")


def test_cli_cache_list_and_clear(capsys):
    fill()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "500 B" not in out and "0.0 MB" in out and "a-ov.xml, a-ov.bin" in out.replace("a-ov.bin, a-ov.xml", "a-ov.xml, a-ov.bin")
    assert "onnx" in out and "2 file(s)" in out and "cap 2.00 GB" in out
    assert main(["cache", "clear", "--what", "onnx"]) == 0
    assert "deleted 2 file(s)" in capsys.readouterr().out
    assert not list((cache_dir() / "onnx").iterdir())
    assert (cache_dir() / "int8" / "a-int8.onnx").is_file()
    assert main(["cache", "clear"]) == 0
    assert list_cache()["total_bytes"] == 0
