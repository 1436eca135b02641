"""A synthetic dataset in the nnU-Net / Medical Segmentation Decathlon raw layout.

::

    out_dir/
      dataset.json
      imagesTr/synth_000_0000.nii.gz   labelsTr/synth_000.nii.gz   (training cases)
      imagesTs/synth_018/              labelsTs/synth_018.nii.gz   (the first test cases: DICOM series)
      imagesTs/synth_020_0000.nii.gz   labelsTs/synth_020.nii.gz   (the other test cases: NIfTI)

The last ``round(cases * test_fraction)`` cases are the test split. Case ``n`` is drawn from its own
generator ``np.random.default_rng([seed, n])`` with orientation RAS, LPS, oblique in turn, so its
content does not depend on how many cases are made. A DICOM test case's label is stored in the
series' source geometry (:func:`~pipeline.io.geometry.closest_canonical` of the written volume).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.io.atomic import make_partial_dir
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import closest_canonical
from pipeline.synth.phantom import ORIENTATIONS, SynthCase, make_case

logger = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when the phantom changes, so cached datasets are rebuilt
NO_LESION_INDICES = {5, 9, 16}  # case index % 18: one case in six, spread over the three orientations


def build_case(
    seed: int,
    index: int,
    *,
    shape: tuple[int, int, int] = (160, 160, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
) -> SynthCase:
    """Case number ``index`` of the dataset made with ``seed`` (the same arrays :func:`synthesize` writes)."""
    rng = np.random.default_rng([seed, index])
    n_lesions = 0 if index % 18 in NO_LESION_INDICES else int(rng.integers(1, 7))
    orientation = ORIENTATIONS[index % len(ORIENTATIONS)]
    return make_case(rng, shape=shape, spacing=spacing, orientation=orientation, n_lesions=n_lesions)


def synthesize(
    out_dir: str | Path,
    cases: int = 24,
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    dicom_test_cases: int = 2,
    shape: tuple[int, int, int] = (160, 160, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
) -> Path:
    """Write (or reuse) a synthetic CT lesion dataset in ``out_dir``; returns ``out_dir``.

    If ``out_dir`` already holds a dataset made with the same arguments it is left as it is. Otherwise
    the dataset is built in a temporary sibling folder and renamed into place, so an interrupted run
    never leaves half a dataset behind.
    """
    out_dir = Path(out_dir)
    params = _params(cases, seed, test_fraction, dicom_test_cases, shape, spacing)
    if _is_complete(out_dir, params):
        logger.info("synthetic dataset already in %s (seed %d, %d cases)", out_dir, seed, cases)
        return out_dir
    _check_replaceable(out_dir)

    tmp_dir = make_partial_dir(out_dir)
    try:
        started = time.perf_counter()
        _write_dataset(tmp_dir, params)
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %d synthetic cases to %s in %.1f s", cases, out_dir, time.perf_counter() - started)
    return out_dir


def _params(cases, seed, test_fraction, dicom_test_cases, shape, spacing) -> dict:
    shape = [int(n) for n in shape]
    spacing = [float(s) for s in spacing]
    if int(cases) < 1:
        raise ConfigError(f"synthesize: expected cases >= 1, found {cases}.")
    if not 0 <= float(test_fraction) < 1:
        raise ConfigError(f"synthesize: expected 0 <= test_fraction < 1, found {test_fraction}.")
    if int(dicom_test_cases) < 0:
        raise ConfigError(f"synthesize: expected dicom_test_cases >= 0, found {dicom_test_cases}.")
    if len(shape) != 3 or len(spacing) != 3:
        raise ConfigError(f"synthesize: expected 3D shape and spacing, found {shape} and {spacing}.")
    n_test = int(round(int(cases) * float(test_fraction)))
    return {
        "seed": int(seed),
        "cases": int(cases),
        "test_fraction": float(test_fraction),
        "num_test": n_test,
        "dicom_test_cases": min(int(dicom_test_cases), n_test),
        "shape": shape,
        "spacing": spacing,
        "recipe_version": RECIPE_VERSION,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, params: dict) -> bool:
    meta = _read_json(out_dir / "dataset.json")
    if not meta or meta.get("synthesis") != params:
        return False
    entries = meta.get("training", []) + meta.get("test", [])
    return all((out_dir / entry[key]).exists() for entry in entries for key in ("image", "label"))


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or one of our own synthetic datasets may be replaced."""
    if not out_dir.exists():
        return
    meta = _read_json(out_dir / "dataset.json") if out_dir.is_dir() else None
    ours = bool(meta) and "synthesis" in meta
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not ours):
        raise InputError(
            f"synthesize: expected {out_dir} to be missing, empty, or a synthetic dataset made by this "
            "tool, found other content. Choose another output folder or move that one away."
        )
    logger.info("replacing the synthetic dataset in %s (different arguments)", out_dir)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_dataset(root: Path, params: dict) -> None:
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir()
    n_train = params["cases"] - params["num_test"]
    training, test, summaries = [], [], []
    for index in range(params["cases"]):
        case_id = f"synth_{index:03d}"
        case = build_case(params["seed"], index, shape=params["shape"], spacing=params["spacing"])
        if index < n_train:
            entry = _write_nifti_case(root, case, case_id, "Tr")
            training.append(entry)
        elif index - n_train < params["dicom_test_cases"]:
            entry = _write_dicom_case(root, case, case_id, params["seed"])
            test.append(entry)
        else:
            entry = _write_nifti_case(root, case, case_id, "Ts")
            test.append(entry)
        summaries.append(_summary(case, case_id, entry))
        logger.debug("case %s: %s, %d lesions", case_id, case.orientation, len(case.lesions))

    meta = {
        "name": "SynthLesionCT",
        "description": "Synthetic CT scans of a liver-like organ with 0-6 round lesions (pipeline.synth).",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(training),
        "numTest": len(test),
        "file_ending": ".nii.gz",
        "training": training,
        "test": test,
        "seed": params["seed"],
        "synthesis": params,
        "cases": summaries,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _write_nifti_case(root: Path, case: SynthCase, case_id: str, split: str) -> dict:
    entry = {"image": f"images{split}/{case_id}_0000.nii.gz", "label": f"labels{split}/{case_id}.nii.gz"}
    _save_nifti(case.image, case.affine, root / entry["image"])
    _save_nifti(case.label, case.affine, root / entry["label"])
    return entry


def _write_dicom_case(root: Path, case: SynthCase, case_id: str, seed: int) -> dict:
    entry = {"image": f"imagesTs/{case_id}", "label": f"labelsTs/{case_id}.nii.gz"}
    write_dicom_series(
        case.image,
        case.affine,
        root / entry["image"],
        patient_id="SYNTHETIC",  # not the case id: discovery would replace a folder named after the patient
        series_description=f"synthetic CT {case_id}",
        uid_entropy=["pipeline.synth", str(seed), case_id],
    )
    label, affine = closest_canonical(case.label, case.affine)  # the series' source geometry
    _save_nifti(label, affine, root / entry["label"])
    return entry


def _summary(case: SynthCase, case_id: str, entry: dict) -> dict:
    return {
        "id": case_id,
        "image": entry["image"],
        "format": "nifti" if entry["image"].endswith(".nii.gz") else "dicom",
        "orientation": case.orientation,
        "shape": list(case.image.shape),
        "spacing": [round(float(s), 6) for s in np.linalg.norm(case.affine[:3, :3], axis=0)],
        "n_lesions": len(case.lesions),
        "lesion_fraction": round(case.lesion_fraction, 8),
        "noise_hu": round(case.noise_hu, 3),
        "lesions": [
            {
                "centre_mm": [round(v, 3) for v in lesion["centre_mm"]],
                "diameters_mm": [round(v, 3) for v in lesion["diameters_mm"]],
                "contrast_hu": round(lesion["contrast_hu"], 3),
                "shape": lesion["shape"],
                "touches_border": lesion["touches_border"],
            }
            for lesion in case.lesions
        ],
    }
