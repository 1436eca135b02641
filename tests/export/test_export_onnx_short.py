"""``pipeline/export/onnx_segment_short.py``: the ~30-statement MONAI + onnxruntime script, run as its users
run it, against ``segment``'s masks on the held-out cases (RAS, LPS, feet-first, oblique); its length; its
refusal."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.export import export_model
from pipeline.infer import Segmenter
from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tests.export.conftest import dice
from tests.helpers import torch_threads

SHORT = Path(__file__).resolve().parents[2] / "pipeline" / "export" / "onnx_segment_short.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def code_lines(source: str) -> tuple[int, int]:
    """(statements, physical lines) of code: the module docstring, blank lines and comments not counted.
    Statements are logical lines (a call wrapped over three lines at the 110-character width counts once)."""
    tree = ast.parse(source)
    doc = tree.body[0]
    skip = set(range(doc.lineno, doc.end_lineno + 1)) if isinstance(doc, ast.Expr) else set()
    statements = sum(isinstance(n, ast.stmt) for n in ast.walk(tree)) - (1 if skip else 0)
    physical = sum(1 for n, line in enumerate(source.splitlines(), 1)
                   if n not in skip and line.strip() and not line.strip().startswith("#"))
    return statements, physical


def run_short(model: Path, cases: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHORT), str(model), str(cases), str(out)], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_short_script_reproduces_segment(trained_checkpoint, held_out_cases, tmp_path):
    model = export_model(trained_checkpoint, tmp_path / "model.onnx", "onnx").path
    run = run_short(model, held_out_cases, tmp_path / "masks")
    assert run.returncode == 0, run.stderr[-2000:]
    segmenter = Segmenter.from_checkpoint(trained_checkpoint, device="cpu", backend="torch")
    paths = sorted(held_out_cases.glob("*.nii.gz"))
    assert len(paths) == 4
    for path in paths:
        with torch_threads(1):
            reference = segmenter.segment(str(path))
        assert reference.labels.sum() > 100  # non-empty masks: the Dice means something
        mask = nib.load(str(tmp_path / "masks" / f"{path.name.removesuffix('_0000.nii.gz')}_seg.nii.gz"))
        assert mask.get_data_dtype() == np.uint8 and mask.shape == reference.labels.shape
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)
        np.testing.assert_allclose(mask.affine, nib.load(str(path)).affine, atol=1e-5)
        assert dice(np.asarray(mask.dataobj), reference.labels) >= 0.99, path.name


def test_short_script_stays_short_and_imports_no_medseg():
    source = SHORT.read_text()
    statements, physical = code_lines(source)
    assert statements <= 40 and physical <= 55, (statements, physical)
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"json", "sys", "pathlib", "nibabel", "numpy", "onnxruntime", "torch", "monai", "scipy"}
    assert imported <= allowed


def test_code_lines_counts_code_only():
    source = '"""doc\n\nmore"""\nimport os\n\n# note\nx = f(1,\n      2)  # one\nfor i in x:\n    pass\n'
    assert code_lines(source) == (4, 5)


def test_short_script_refuses_what_it_does_not_handle(trained_checkpoint, held_out_cases, tmp_path):
    """The same weights with mirror TTA and keep_largest: one line naming both and the full example script."""
    ckpt = load_checkpoint(trained_checkpoint)
    config = replace(ckpt.config, inference=replace(ckpt.config.inference, tta="mirror"),
                     postprocess=replace(ckpt.config.postprocess, keep_largest=["lesion"]))
    checkpoint = save_checkpoint(tmp_path / "tta.pt",
                                 Checkpoint(config=config, state_dict=ckpt.state_dict, epoch=1))
    model = export_model(checkpoint, tmp_path / "model.onnx", "onnx").path
    run = run_short(model, held_out_cases, tmp_path / "masks")
    assert run.returncode == 1
    message = run.stderr.strip().splitlines()[-1]
    assert "tta mirror" in message and "keep_largest" in message and "onnx_segment_example.py" in message
    assert not (tmp_path / "masks").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["zscore", "ct"])
def test_short_script_follows_the_zscore_and_ct_schemes(held_out_cases, tmp_path, scheme):
    """zscore: a model trained under intensity.mode=zscore (crop above the minimum). ct: the fixture's weights
    under intensity.mode=auto with one CT channel: (clip(x, -150, 250) - 50) / 200, crop above the minimum."""
    from pipeline.config import load_config
    from tests.export.conftest import OVERRIDES, train_tiny
    from tests.helpers import tiny_config_overrides

    extra = ["preprocess.intensity.mode=zscore"] if scheme == "zscore" else []
    path = train_tiny(tmp_path / "m.pt", *extra)
    if scheme == "ct":
        ckpt = load_checkpoint(path)
        config = load_config(None, tiny_config_overrides(
            *OVERRIDES, "preprocess.intensity.mode=auto", "data.channels=[CT]",
            "preprocess.intensity.channels=[{name: CT, scheme: ct, clip: [-150.0, 250.0], mean: 50.0, "
            "std: 200.0}]"))
        path = save_checkpoint(tmp_path / "ct.pt",
                               Checkpoint(config=config, state_dict=ckpt.state_dict, epoch=1))
    model = export_model(path, tmp_path / "model.onnx", "onnx").path
    import onnx

    spec = json.loads({p.key: p.value for p in onnx.load(str(model)).metadata_props}["medseg"])
    assert spec["preprocess"]["normalisation"][0]["scheme"] == scheme
    run = run_short(model, held_out_cases, tmp_path / "masks")
    assert run.returncode == 0, run.stderr[-2000:]
    segmenter = Segmenter.from_checkpoint(path, device="cpu", backend="torch")
    for source in sorted(held_out_cases.glob("*.nii.gz")):
        with torch_threads(1):
            reference = segmenter.segment(str(source)).labels
        mask = np.asarray(nib.load(str(tmp_path / "masks" / source.name.replace("_0000", "_seg"))).dataobj)
        assert reference.sum() > 50 and dice(mask, reference) >= 0.99, (source.name, reference.sum())


@pytest.mark.slow
def test_short_script_many_classes_argmax(trained_checkpoint, held_out_cases, tmp_path):
    """The fixture's network with a 3-class head built from its 2-class one (no training): ``rim`` where the
    lesion wins by at most 2 logits, ``core`` beyond, so the argmax decision (nearest voxel back) runs.
    A KNOWN GAP, held to 0.97 (lesion) / 0.9 (per class), not 0.99: the argmax is sampled at the nearest
    voxel by segment (scipy-like order 0) and here by MONAI's Invertd (torch grid_sample, which most likely
    rounds half-voxel ties the other way: on the RAS case 1.0 and 1.2 mm grids meet at exact ties)."""
    import torch

    ckpt = load_checkpoint(trained_checkpoint)
    state = {k: v.clone() for k, v in ckpt.state_dict.items()}
    w, b = state["head.weight"], state["head.bias"]
    state["head.weight"] = torch.cat([w, 2 * w[1:2] - w[0:1]])
    state["head.bias"] = torch.cat([b, (2 * b[1] - b[0] - 2.0)[None]])
    labels = {"background": 0, "rim": 1, "core": 2}
    config = replace(ckpt.config, data=replace(ckpt.config.data, labels=labels))
    path = save_checkpoint(tmp_path / "three.pt", Checkpoint(config=config, state_dict=state, epoch=1))
    model = export_model(path, tmp_path / "model.onnx", "onnx").path
    run = run_short(model, held_out_cases, tmp_path / "masks")
    assert run.returncode == 0, run.stderr[-2000:]
    segmenter = Segmenter.from_checkpoint(path, device="cpu", backend="torch")
    for source in sorted(held_out_cases.glob("*.nii.gz")):
        with torch_threads(1):
            reference = segmenter.segment(str(source)).labels
        mask = np.asarray(nib.load(str(tmp_path / "masks" / source.name.replace("_0000", "_seg"))).dataobj)
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert dice(mask, reference) >= 0.97, source.name  # the lesion as a whole (rim + core): 0.974-1.0
        for value in (1, 2):  # per class, measured 0.91-1.0 (onnx_segment_example.py: 0.92-1.0)
            assert (reference == value).sum() > 50, (source.name, value)
            assert dice(mask == value, reference == value) >= 0.9, (source.name, value)
