"""Tiny datasets in the layouts users ship (nnU-Net v2, MSD 4D, plain folder, our synthetic one).

Every builder writes seeded volumes (12x10x8 by default, a different non-trivial affine per case: RAS,
LPS, oblique in turn) and returns ``{case_id: WrittenCase}`` with the arrays and affine written, so a
test can compare what is read back with what was written. NRRD/MHA files are written by SimpleITK in
its LPS convention from our RAS affines (:func:`pipeline.io.geometry.set_sitk_geometry`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from tests.conftest import make_affine

SHAPE = (12, 10, 8)
CHANNEL_NAMES = ("FLAIR", "T1c", "T2", "T1")
LABELS = {"background": 0, "edema": 1, "tumour": 2}
MSD_CASES = ("BRATS_001", "BRATS_002", "BRATS_003")
CASES = ("case_000", "case_001", "case_002")


@dataclass
class WrittenCase:
    case_id: str
    images: list[np.ndarray]  # one 3D array per channel (MSD 4D: the channels of the 4D file)
    label: Optional[np.ndarray]
    affine: np.ndarray  # RAS, shared by the channels and the label
    image_paths: list[Path]  # one per channel; MSD 4D: [the 4D file]
    label_path: Optional[Path]


def case_affine(index: int) -> np.ndarray:
    orientation = ("RAS", "LPS", "oblique")[index % 3]
    return make_affine(orientation, spacing=(0.8, 0.9, 2.5), origin=(12.0 - index, -30.0 + 2 * index, 45.0))


def case_arrays(index: int, channels: int, shape=SHAPE) -> tuple[list[np.ndarray], np.ndarray]:
    """Float32 channels and a uint8 label with the values of :data:`LABELS` (boxes, edema around tumour)."""
    rng = np.random.default_rng([7, index])
    label = np.zeros(shape, np.uint8)
    label[2:9, 2:8, 1:6] = 1
    label[4:7, 3:6, 2:5] = 2
    images = [(rng.normal(100.0 * (c + 1), 10.0, shape) + 40.0 * label).astype(np.float32) for c in range(channels)]
    return images, label


def write_volume(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """``array`` ([i, j, k] or [i, j, k, c] for NIfTI) with the RAS ``affine``, in the format of its ending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        image = nib.Nifti1Image(array, affine)
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        nib.save(image, str(path))
        return path
    import SimpleITK as sitk

    from pipeline.io.geometry import set_sitk_geometry

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    set_sitk_geometry(image, affine)
    sitk.WriteImage(image, str(path))
    return path


def write_nnunet_v2(root: Path, cases: Sequence[str] = CASES, channels: int = 2, ending: str = ".nii.gz",
                    shape=SHAPE, labels: Optional[dict] = None, split: str = "Tr",
                    extra: Optional[dict] = None) -> dict[str, WrittenCase]:
    """``dataset.json`` (channel_names, labels, numTraining, file_ending, + ``extra`` keys),
    ``images<split>/<case>_000k<ending>``, ``labels<split>/<case><ending>``."""
    written = _write_channel_files(root, cases, channels, ending, shape, split)
    meta = {"name": "tiny", "channel_names": {str(c): CHANNEL_NAMES[c] for c in range(channels)},
            "labels": dict(LABELS if labels is None else labels), "numTraining": len(cases), "file_ending": ending,
            **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return written


def write_folder(root: Path, cases: Sequence[str] = CASES, channels: int = 1, ending: str = ".nii.gz",
                 shape=SHAPE, split: str = "Tr") -> dict[str, WrittenCase]:
    """A plain folder: the files of :func:`write_nnunet_v2`, no ``dataset.json``."""
    return _write_channel_files(root, cases, channels, ending, shape, split)


def write_msd_4d(root: Path, cases: Sequence[str] = MSD_CASES, modalities: Sequence[str] = ("FLAIR", "T1w"),
                 shape=SHAPE) -> dict[str, WrittenCase]:
    """MSD/Decathlon: ``imagesTr/<case>.nii.gz`` 4D (channels on the 4th axis) when several modalities,
    ``labels`` as value -> name, and a ``training`` list of ``./imagesTr/...`` paths."""
    written, training = {}, []
    for index, case_id in enumerate(cases):
        images, label = case_arrays(index, len(modalities), shape)
        affine = case_affine(index)
        volume = np.stack(images, axis=-1) if len(modalities) > 1 else images[0]
        image_path = write_volume(volume, affine, root / "imagesTr" / f"{case_id}.nii.gz")
        label_path = write_volume(label, affine, root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        written[case_id] = WrittenCase(case_id, images, label, affine, [image_path], label_path)
    meta = {"name": "BRATS", "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
            "modality": {str(c): m for c, m in enumerate(modalities)},
            "labels": {str(v): name for name, v in LABELS.items()},
            "numTraining": len(cases), "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return written


def write_synth(root: Path, cases: int = 4) -> Path:
    """Our own synthetic CT dataset (:func:`pipeline.synth.synthesize`), small: 32x32x12, one test case."""
    from pipeline.synth import synthesize

    return synthesize(root, cases=cases, seed=0, test_fraction=0.25, dicom_test_cases=0, shape=(32, 32, 12),
                      spacing=(1.5, 1.5, 3.0))


def _write_channel_files(root: Path, cases: Sequence[str], channels: int, ending: str, shape,
                         split: str) -> dict[str, WrittenCase]:
    written = {}
    for index, case_id in enumerate(cases):
        images, label = case_arrays(index, channels, shape)
        affine = case_affine(index)
        paths = [write_volume(image, affine, root / f"images{split}" / f"{case_id}_{c:04d}{ending}")
                 for c, image in enumerate(images)]
        label_path = write_volume(label, affine, root / f"labels{split}" / f"{case_id}{ending}")
        written[case_id] = WrittenCase(case_id, images, label, affine, paths, label_path)
    return written
