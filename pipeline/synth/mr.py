"""A synthetic two-sequence MR lesion dataset (FLAIR + T1c) in the nnU-Net v2 raw layout.

::

    out_dir/
      dataset.json                 nnU-Net v2 (no file list); recipe and cases under "medseg"
      imagesTr/mr_000_0000.nii.gz  mr_000_0001.nii.gz     labelsTr/mr_000.nii.gz    (FLAIR, T1c; one grid)
      imagesTs/mr_018/FLAIR/IM_*.dcm  mr_018/T1c/IM_*.dcm labelsTs/mr_018.nii.gz    (first test cases: DICOM)
      imagesTs/mr_020_0000.nii.gz  mr_020_0001.nii.gz     labelsTs/mr_020.nii.gz    (other test cases)

Labels 0 background, 1 oedema, 2 core: FLAIR shows oedema and core alike, T1c only the core, so a
model needs both channels (:mod:`pipeline.synth.mr_head`). The last ``round(cases * test_fraction)``
cases are the test split. Case ``n`` is drawn from ``np.random.default_rng([seed, n])`` with orientation
RAS, LPS, oblique in turn, so its content does not depend on how many cases are made. A DICOM test case
is one study of two MR series ("AX FLAIR", "AX T1 POST GAD": same study, frame of reference and
patient) and its T1c lies on another grid than its FLAIR (:func:`~pipeline.synth.mr_phantom.other_grid`);
its label is stored in the FLAIR series' source geometry
(:func:`~pipeline.io.geometry.closest_canonical` of the written volume).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import closest_canonical, voxel_spacing
from pipeline.synth.grid import ORIENTATIONS
from pipeline.synth.mr_head import CHANNELS, LABELS
from pipeline.synth.mr_phantom import MAX_LESIONS, MRCase, make_mr_case
from pipeline.synth.store import save_nifti, split_params, write_dataset_once

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the MR phantom changes, so cached datasets are rebuilt
NO_LESION_INDICES = {4, 11, 15}  # case index % 18: one case in six, spread over the three orientations
PATIENT_ID = "SYNTH-MR"  # no real identity; not the case id (discovery would rename a folder named after it)
SERIES = {"FLAIR": ("AX FLAIR", 1), "T1c": ("AX T1 POST GAD", 2)}  # description, number


def build_mr_case(
    seed: int,
    index: int,
    *,
    shape: tuple[int, int, int] = (96, 96, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    t1c_grid: str = "same",
) -> MRCase:
    """Case number ``index`` of the dataset made with ``seed`` (the arrays :func:`synthesize_mr` writes;
    its DICOM test cases use ``t1c_grid="other"``)."""
    rng = np.random.default_rng([seed, index])
    n_lesions = 0 if index % 18 in NO_LESION_INDICES else int(rng.integers(1, MAX_LESIONS + 1))
    orientation = ORIENTATIONS[index % len(ORIENTATIONS)]
    return make_mr_case(rng, shape=shape, spacing=spacing, orientation=orientation, n_lesions=n_lesions,
                        t1c_grid=t1c_grid)


def synthesize_mr(
    out_dir: str | Path,
    cases: int = 24,
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    dicom_test_cases: int = 2,
    shape: tuple[int, int, int] = (96, 96, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
) -> Path:
    """Write (or reuse) a synthetic FLAIR + T1c lesion dataset in ``out_dir``; returns ``out_dir``.

    If ``out_dir`` already holds a dataset made with the same arguments it is left as it is. Otherwise
    it is built in a temporary sibling folder and renamed into place (an empty folder or another
    synthetic dataset of ours is replaced; anything else is refused).
    """
    params = split_params(cases, seed, test_fraction, dicom_test_cases, shape, spacing, RECIPE_VERSION)
    return write_dataset_once(out_dir, params, marker="medseg.recipe",
                              write=lambda root: _write_dataset(root, params), files=_listed_files)


def _listed_files(meta: dict) -> list[str]:
    return [name for case in meta.get("medseg", {}).get("cases", []) for name in case["files"]]


def _write_dataset(root: Path, params: dict) -> None:
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir()
    n_train = params["cases"] - params["num_test"]
    summaries = []
    for index in range(params["cases"]):
        case_id = f"mr_{index:03d}"
        dicom = n_train <= index < n_train + params["dicom_test_cases"]
        case = build_mr_case(params["seed"], index, shape=params["shape"], spacing=params["spacing"],
                             t1c_grid="other" if dicom else "same")
        if dicom:
            files = _write_dicom_case(root, case, case_id, params["seed"])
        else:
            files = _write_nifti_case(root, case, case_id, "Tr" if index < n_train else "Ts")
        summaries.append(_summary(case, case_id, index < n_train, dicom, files))
        logger.debug("case %s: %s, %d lesions", case_id, case.orientation, len(case.head.lesions))

    meta = {
        "name": "SynthLesionMR",
        "description": "Synthetic FLAIR + T1c head MR with 0-3 lesions: oedema (bright on FLAIR only) around "
                       "an enhancing core (bright on both) (pipeline.synth.mr).",
        "channel_names": {str(n): name for n, name in enumerate(CHANNELS)},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "medseg": {"recipe": params, "num_test": params["num_test"], "cases": summaries},
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_nifti_case(root: Path, case: MRCase, case_id: str, split: str) -> list[str]:
    files = [f"images{split}/{case_id}_{n:04d}.nii.gz" for n in range(len(CHANNELS))]
    files.append(f"labels{split}/{case_id}.nii.gz")
    for array, name in zip((case.flair, case.t1c, case.label), files):
        save_nifti(array, case.affine, root / name)
    return files


def _write_dicom_case(root: Path, case: MRCase, case_id: str, seed: int) -> list[str]:
    """One study of two MR series sharing study, frame of reference and patient; the label in the FLAIR
    series' source geometry."""
    entropy = ["pipeline.synth.mr", str(seed), case_id]
    study_uid = generate_uid(PYDICOM_ROOT_UID, [*entropy, "study"])
    frame_uid = generate_uid(PYDICOM_ROOT_UID, [*entropy, "frame-of-reference"])
    files = []
    for name, volume, affine in (("FLAIR", case.flair, case.affine), ("T1c", case.t1c, case.t1c_affine)):
        description, number = SERIES[name]
        folder = f"imagesTs/{case_id}/{name}"
        write_dicom_series(
            volume,
            affine,
            root / folder,
            patient_id=PATIENT_ID,
            series_description=description,
            series_number=number,
            study_uid=study_uid,
            series_uid=generate_uid(PYDICOM_ROOT_UID, [*entropy, name, "series"]),
            frame_of_reference_uid=frame_uid,
            modality="MR",
            rescale_intercept=0.0,
        )
        files.append(folder)
    label, affine = closest_canonical(case.label, case.affine)  # the FLAIR series' source geometry
    files.append(f"labelsTs/{case_id}.nii.gz")
    save_nifti(np.ascontiguousarray(label), affine, root / files[-1])
    return files


def _summary(case: MRCase, case_id: str, training: bool, dicom: bool, files: list[str]) -> dict:
    head = case.head
    return {
        "id": case_id,
        "split": "train" if training else "test",
        "format": "dicom" if dicom else "nifti",
        "files": files,
        "orientation": case.orientation,
        "shape": list(case.flair.shape),
        "spacing": [round(float(s), 6) for s in voxel_spacing(case.affine)],
        "t1c_grid": "same" if case.same_grid else "other",
        "t1c_shape": list(case.t1c.shape),
        "t1c_spacing": [round(float(s), 6) for s in voxel_spacing(case.t1c_affine)],
        "n_lesions": len(head.lesions),
        "voxels": {name: int(np.count_nonzero(case.label == value)) for name, value in LABELS.items()},
        "gain": [round(g, 4) for g in head.gain],
        "noise": [round(s, 3) for s in head.noise],
        "lesions": case.lesions,
    }
