"""medseg bench --levers: the figures of each lever against the reference pass, on a tiny trained-shaped model."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.benchmarks import levers
from pipeline.infer.windows import WindowGrid
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_checkpoint, torch_threads

SHAPE = (40, 40, 16)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def held_out(tmp_path):
    root = tmp_path / "data"
    affine = make_affine("RAS", spacing=(1.0, 1.0, 2.5), origin=(0.0, 0.0, 0.0))
    test = []
    for n in range(2):
        image, label = ct_case(SHAPE, seed=n)
        save_nifti(image, affine, root / "imagesTs" / f"case_{n:03d}_0000.nii.gz")
        save_nifti(label, affine, root / "labelsTs" / f"case_{n:03d}.nii.gz")
        test.append({"image": f"imagesTs/case_{n:03d}_0000.nii.gz", "label": f"labelsTs/case_{n:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}, "test": test}))
    return root


def test_levers_against_the_reference(tmp_path, held_out):
    model = tiny_checkpoint(tmp_path / "tiny.pt", "inference.overlap=0.25")
    chosen = {"same": ("inference.overlap=0.5",), "overlap_0": ("inference.overlap=0",),
              "skip_body": ("inference.skip_empty=body", "inference.skip_margin_mm=0"),
              levers.DEFAULT: ("inference.backend=torch",)}
    lines = []
    results = levers.run_levers(model, held_out, repeats=1, levers=chosen, progress=lines.append,
                                large_shape=(48, 40, 24), work_dir=tmp_path / "work")
    rows = results["levers"]
    assert list(rows) == ["reference", "same", "overlap_0", "skip_body", "default"]
    # the default lever runs the checkpoint's own settings (its overlap 0.25), not the reference's 0.5
    assert rows["default"]["windows"] == 2 * len(WindowGrid(SHAPE, (16, 16, 8), 0.25))
    assert results["cases"] == ["case_000", "case_001"]
    ref = rows["reference"]
    assert ref["ratio"] == 1.0 and ref["dice_vs_reference_min"] == 1.0 and ref["gt_dice_delta"] == 0.0
    assert ref["meets_contract"]
    assert rows["same"]["dice_vs_reference"] == [1.0, 1.0] and rows["same"]["meets_contract"]
    # tiny config: no resampling, no crop, window 16x16x8: the grid of the 40x40x16 scans
    assert ref["windows"] == 2 * len(WindowGrid(SHAPE, (16, 16, 8), 0.5)) and ref["skipped"] == 0
    assert rows["overlap_0"]["windows"] == 2 * len(WindowGrid(SHAPE, (16, 16, 8), 0.0))
    assert rows["skip_body"]["windows"] + rows["skip_body"]["skipped"] == ref["windows"]
    assert set(ref["recall_by_size"]) == {"lt100", "100to1000", "ge1000"}
    assert results["best"] in rows and rows[results["best"]]["meets_contract"]
    assert 0.0 <= ref["gt_dice"] <= 1.0
    assert lines
    large = results["large"]
    assert list(large["runs"]) == ["reference", "same", "overlap_0", "skip_body", "default"]
    assert large["runs"]["reference"]["dice_vs_reference"] == 1.0 and large["runs"]["same"]["dice_vs_reference"] == 1.0
    assert large["runs"]["overlap_0"]["windows"] < large["runs"]["reference"]["windows"]
    assert large["lever"] in large["runs"]
    assert large["default"] == "default"
    assert results["segment_seconds_48x40x24"] == large["runs"]["default"]["seconds"]
    assert results["segment_seconds_48x40x24_best"] == large["runs"][large["lever"]]["seconds"]
    assert results["speedup_vs_reference_pass"] == pytest.approx(
        results["segment_seconds_48x40x24_reference"] / results["segment_seconds_48x40x24"])

    path = tmp_path / "table.txt"
    with open(path, "w") as handle:
        levers.print_levers(results, file=handle)
    text = path.read_text()
    assert "overlap_0" in text and "best lever meeting the contract" in text and "48x40x24 synthetic CT" in text


def test_meets_contract_thresholds():
    row = {"dice_vs_reference_min": 0.98, "lesion_recall_vs_reference": 0.99, "gt_dice_delta": -0.005}
    assert levers.meets_contract(row)
    assert not levers.meets_contract({**row, "dice_vs_reference_min": 0.979})
    assert not levers.meets_contract({**row, "lesion_recall_vs_reference": 0.98})
    assert not levers.meets_contract({**row, "gt_dice_delta": 0.0051})
    assert levers.meets_contract({**row, "lesion_recall_vs_reference": math.nan, "gt_dice_delta": math.nan})


def test_held_out_cases_needs_a_test_list(tmp_path):
    from pipeline.errors import InputError

    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(InputError, match="'test' list"):
        levers.held_out_cases(tmp_path)
    with pytest.raises(InputError, match="dataset.json"):
        levers.held_out_cases(tmp_path / "missing")


def test_select_levers():
    from pipeline.errors import InputError

    assert levers.select_levers(None) is None
    assert levers.select_levers(["overlap_0.25"]) == {"overlap_0.25": ("inference.overlap=0.25",)}
    with pytest.raises(InputError, match="unknown lever 'fast'"):
        levers.select_levers(["fast"])


def test_cli_bench_levers_writes_the_contract_figures(tmp_path, held_out, capsys):
    from pipeline.cli import main

    model = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "levers.json"
    code = main(["bench", "--levers", "--model", str(model), "--data", str(held_out), "--repeats", "1",
                 "--lever", "overlap_0.25", "--json", str(out), "--quiet"])
    assert code == 0
    saved = json.loads(out.read_text())
    assert list(saved["levers"]) == ["reference", "overlap_0.25"]
    assert saved["agreement_dice_min"] <= 1.0 and saved["best"] in saved["levers"]
    assert "best lever meeting the contract" in capsys.readouterr().out
