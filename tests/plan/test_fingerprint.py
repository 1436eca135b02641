"""``dataset_fingerprint`` on a two-case dataset whose lesions, intensities and geometry are known exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.plan.fingerprint import axis_order, dataset_fingerprint, equivalent_diameter_mm
from tests.conftest import save_nifti

SHAPE = (20, 20, 10)


@pytest.fixture()
def known_dataset(tmp_path):
    """Case ``a`` (RAS, 1 x 1 x 2 mm): a 3x3x2 cube of lesion (18 voxels, CT 100) and two voxels touching only
    at a corner (one 26-connected lesion, CT 200). Case ``b``: no lesion, stored with its axes permuted
    (array axis 0 along S at 2 mm, axes 1, 2 along R, A at 1 mm)."""
    root = tmp_path / "known"
    image, label = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 2:4] = 1
    image[2:5, 2:5, 2:4] = 100.0
    for index in ((10, 10, 5), (11, 11, 6)):
        label[index] = 1
        image[index] = 200.0
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    save_nifti(image, affine, root / "imagesTr" / "a_0000.nii.gz")
    save_nifti(label, affine, root / "labelsTr" / "a.nii.gz")
    permuted = np.zeros((4, 4))
    permuted[0, 1] = permuted[1, 2] = 1.0  # array axis 1 -> R, axis 2 -> A
    permuted[2, 0] = 2.0  # array axis 0 -> S, 2 mm
    permuted[3, 3] = 1.0
    b_shape = (SHAPE[2], SHAPE[0], SHAPE[1])
    save_nifti(np.full(b_shape, -50.0, np.float32), permuted, root / "imagesTr" / "b_0000.nii.gz")
    save_nifti(np.zeros(b_shape, np.uint8), permuted, root / "labelsTr" / "b.nii.gz")
    manifest = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def test_fingerprint_of_known_lesions(known_dataset):
    fp = dataset_fingerprint(known_dataset)
    assert fp["num_cases"] == 2 and fp["channels"] == ["CT"] and fp["orientation"] == "RAS"
    lesions = fp["lesions"]["lesion"]
    assert lesions["count"] == 2 and lesions["per_case"] == [2, 0]
    assert lesions["volumes_mm3"] == [36.0, 4.0]  # 18 and 2 voxels of 2 mm3
    assert lesions["diameters_mm"] == [round(equivalent_diameter_mm(36.0), 4), round(equivalent_diameter_mm(4.0), 4)]
    assert lesions["diameters_mm"][0] == pytest.approx((6 * 36 / math.pi) ** (1 / 3), abs=1e-4)
    assert lesions["cases_with_lesion_fraction"] == 0.5 and fp["cases_with_lesion_fraction"] == 0.5
    assert fp["class_fractions"] == {"background": 1 - 20 / 8000, "lesion": 20 / 8000}  # 2 cases of 4000


def test_fingerprint_spacing_and_shape_on_the_ras_axes(known_dataset):
    cases = {case["case_id"]: case for case in dataset_fingerprint(known_dataset)["cases"]}
    assert cases["a"]["shape"] == [20, 20, 10] and cases["a"]["spacing"] == [1.0, 1.0, 2.0]
    assert cases["b"]["shape"] == [20, 20, 10] and cases["b"]["spacing"] == [1.0, 1.0, 2.0]  # stored as 10x20x20


def test_fingerprint_foreground_intensities(known_dataset):
    stats = dataset_fingerprint(known_dataset)["intensity"]["CT"]
    # foreground: 18 voxels of 100 and 2 of 200 (case b has none; its -50 never counts)
    assert (stats["min"], stats["max"], stats["median"], stats["samples"]) == (100.0, 200.0, 100.0, 20)
    assert stats["mean"] == pytest.approx(110.0) and stats["std"] == pytest.approx(30.0)
    assert stats["percentile_00_5"] == 100.0 and stats["percentile_99_5"] == pytest.approx(200.0)


def test_fingerprint_is_json(known_dataset):
    fp = dataset_fingerprint(known_dataset)
    assert json.loads(json.dumps(fp)) == fp


def test_axis_order_of_a_permuted_affine():
    affine = np.zeros((4, 4))
    affine[0, 1] = affine[1, 2] = affine[3, 3] = 1.0
    affine[2, 0] = 2.0
    assert axis_order(affine, "RAS") == [1, 2, 0]
    assert axis_order(np.diag([-1.0, -1.0, 1.0, 1.0]), "LPS") == [0, 1, 2]
