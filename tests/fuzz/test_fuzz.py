"""``medseg segment`` over a corpus of bad inputs (:mod:`tests.fuzz.corpus`) beside good cases, in one
run through the CLI: every bad entry is ``failed`` or ``skipped`` with a one-line reason, the good
cases are ``done`` with the masks the model gives them alone, exit code 1, no traceback on stderr.

The entry -> status -> reason table is printed (``pytest -s``) and written to ``<tmp>/fuzz_table.md``.
"""

from __future__ import annotations

import csv
import faulthandler
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.batch import folder as batch
from pipeline.cli import main
from pipeline.io.discover import discover
from tests.fuzz.corpus import VANISHING, build_corpus, is_unreadable, running_as_root
from tests.helpers import tiny_checkpoint

ROOT_NAME = "corpus"


@pytest.fixture
def hang_guard():
    """A hang is a defect too: dump the stacks and end the process rather than wait forever."""
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()


def _rows_by_entry(manifest: Path, entries) -> dict[str, list[dict]]:
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    found: dict[str, list[dict]] = {entry.name: [] for entry in entries}
    for row in rows:
        parts = Path(row["source"]).parts
        assert parts[0] == ROOT_NAME and len(parts) > 1, row  # paths relative to the input folder
        found[parts[1]].append(row)
    return found


def _table(entries, by_entry) -> str:
    lines = ["| entry | what | status | reason |", "|---|---|---|---|"]
    for entry in entries:
        for row in by_entry[entry.name] or [{"status": "(no row)", "error": ""}]:
            reason = row["error"] or (f"(accepted: {entry.tolerated})" if entry.tolerated else "")
            reason = reason.replace("|", "\\|")
            lines.append(f"| {entry.name} | {entry.what} | {row['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def test_segment_survives_the_corpus(tmp_path, capsys, monkeypatch, hang_guard):
    root = tmp_path / ROOT_NAME
    entries = build_corpus(root)
    assert len([e for e in entries if not e.good]) >= 40
    if running_as_root():  # mode 000 does not stop root: the FIFO and folder entries stand in for it
        assert not is_unreadable(root / "unreadable_chmod_000" / "scan.nii.gz")

    start = time.perf_counter()
    found = discover(root / "ten_thousand_files")
    assert time.perf_counter() - start < 30 and not found.cases
    assert "10000 files" in found.skipped[0].reason

    real_discover = batch.discover

    def discover_then_delete(*args, **kwargs):  # the file goes between discovery and reading
        discovery = real_discover(*args, **kwargs)
        (root / VANISHING / "scan.nii.gz").unlink()
        return discovery

    monkeypatch.setattr(batch, "discover", discover_then_delete)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt", "preprocess.spacing=[1.0, 1.0, 2.5]")
    out = tmp_path / "out"

    code = main(["segment", "-q", str(root), str(out), "--model", str(checkpoint), "--device", "cpu"])

    stdout, stderr = capsys.readouterr()
    by_entry = _rows_by_entry(out / "manifest.csv", entries)
    table = _table(entries, by_entry)
    (tmp_path / "fuzz_table.md").write_text(table)
    with capsys.disabled():
        print(f"\n{table}\n(table: {tmp_path / 'fuzz_table.md'})")
    assert code == 1, stderr
    assert "Traceback" not in stderr + stdout
    for entry in entries:
        rows = by_entry[entry.name]
        assert rows, f"{entry.name}: no manifest row"
        for row in rows:
            if entry.good:
                assert row["status"] == "done", (entry.name, row["error"])
            elif entry.tolerated and row["status"] == "done":
                continue
            else:
                assert row["status"] in ("failed", "skipped"), (entry.name, row["status"])
                assert row["error"] and "\n" not in row["error"] and "Traceback" not in row["error"], row
    _check_good_masks(root, out, checkpoint, by_entry, entries)


def _check_good_masks(root: Path, out: Path, checkpoint: Path, by_entry, entries) -> None:
    """Each good case's mask is what the model gives that scan on its own, in the scan's grid."""
    from pipeline.infer import Segmenter
    from pipeline.io.discover import discover as find

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    for entry in entries:
        if not entry.good:
            continue
        (row,) = by_entry[entry.name]
        case = find(root / entry.name).cases[0]
        expected = segmenter.segment(case.reader_input)
        mask = nib.load(row["output"])
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.labels)
        np.testing.assert_allclose(mask.affine, expected.affine, atol=1e-5)
        assert out in Path(row["output"]).parents
