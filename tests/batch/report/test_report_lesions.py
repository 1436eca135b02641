"""Lesion statistics on masks with known lesions: volumes in mL, centroids in world mm (through a
non-identity affine), maximum diameters, intensities and probabilities."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from pipeline.batch.report.lesions import LESION_COLUMNS, lesion_stats, max_distance, write_lesions_csv
from tests.conftest import make_affine


@pytest.fixture
def oblique():
    return make_affine("oblique", spacing=(0.8, 0.9, 2.5), origin=(12.0, -30.0, 45.0))


def world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def test_known_lesions_volume_centroid_diameter(oblique):
    labels = np.zeros((30, 28, 12), np.uint8)
    labels[3:7, 4:9, 2:5] = 1  # box: 4 x 5 x 3 = 60 voxels
    labels[20, 20, 8] = 1  # a single voxel
    labels[10:12, 18:20, 9:11] = 2  # another class: 2 x 2 x 2
    image = np.full(labels.shape, 40.0, np.float32)
    image[3:7, 4:9, 2:5] = 150.0
    probability = np.zeros(labels.shape, np.float16)
    probability[5, 6, 3] = 0.875

    lesions = lesion_stats(labels, oblique, image=image, probability=probability, case_id="c1")

    assert [(x.label, x.lesion_id, x.voxels) for x in lesions] == [(1, 1, 60), (1, 2, 1), (2, 1, 8)]
    voxel_ml = abs(np.linalg.det(oblique[:3, :3])) / 1000
    box, single, other = lesions
    assert box.case_id == "c1"
    assert box.volume_ml == pytest.approx(60 * voxel_ml)
    np.testing.assert_allclose(box.centroid_mm, world(oblique, [4.5, 6.0, 3.0]), atol=1e-9)
    np.testing.assert_allclose(single.centroid_mm, world(oblique, [20, 20, 8]), atol=1e-9)
    np.testing.assert_allclose(other.centroid_mm, world(oblique, [10.5, 18.5, 9.5]), atol=1e-9)
    # Farthest voxel centres of a box: opposite corners.
    assert box.max_diameter_mm == pytest.approx(np.linalg.norm(oblique[:3, :3] @ [3, 4, 2]))
    assert single.max_diameter_mm == 0.0
    assert box.mean_intensity == pytest.approx(150.0)
    assert other.mean_intensity == pytest.approx(40.0)
    assert box.max_probability == pytest.approx(0.875)
    assert single.max_probability == 0.0


def test_lesions_are_26_connected_and_numbered_largest_first():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 1  # touching at a corner only: one lesion
    labels[6:9, 6:9, 6:9] = 1
    lesions = lesion_stats(labels, np.eye(4))
    assert [(x.lesion_id, x.voxels) for x in lesions] == [(1, 27), (2, 2)]
    assert lesions[1].max_diameter_mm == pytest.approx(np.sqrt(3))


def test_ball_diameter_with_anisotropic_spacing():
    affine = make_affine("LPS", spacing=(0.7, 0.7, 2.0), origin=(0, 0, 0))
    shape = (80, 80, 30)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T
    centre = affine[:3, :3] @ [40, 40, 15]
    ball = (np.linalg.norm(xyz - centre, axis=-1) <= 10.0).astype(np.uint8)  # 20 mm across
    (lesion,) = lesion_stats(ball, affine)
    assert 18.0 <= lesion.max_diameter_mm <= 20.0
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * 10**3 / 1000, rel=0.05)


@pytest.mark.parametrize("shape", ["flat", "line", "many_flat"])
def test_max_distance_of_degenerate_point_sets(shape):
    rng = np.random.default_rng(0)
    if shape == "flat":
        points = np.c_[rng.uniform(0, 10, (50, 2)), np.zeros(50)]
    elif shape == "line":
        points = np.outer(np.arange(20), [1.0, 2.0, 0.5])
    else:  # more points than the pairwise limit: joggled hull
        points = np.c_[rng.uniform(0, 100, (5000, 2)), np.zeros(5000)]
    assert max_distance(points) == pytest.approx(pdist(points).max(), rel=1e-6)


def test_max_distance_matches_brute_force_on_random_clouds():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 5, 40):
        points = rng.normal(size=(n, 3))
        expected = pdist(points).max() if n > 1 else 0.0
        assert max_distance(points) == pytest.approx(expected)


def test_empty_mask_has_no_lesions():
    assert lesion_stats(np.zeros((4, 4, 4), np.uint8), np.eye(4)) == []


def test_lesions_csv_columns(tmp_path):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    path = write_lesions_csv(lesion_stats(labels, np.eye(4), case_id="a"), tmp_path / "lesions.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == LESION_COLUMNS == [
        "case_id", "label", "lesion_id", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm",
        "centroid_z_mm", "max_diameter_mm", "mean_intensity", "max_probability",
    ]
    assert rows[1][:5] == ["a", "1", "1", "8", "0.008"]
    assert rows[1][-2:] == ["", ""]  # no image, no probability given
    assert not list(itertools.filterfalse(lambda p: p.name == "lesions.csv", tmp_path.iterdir()))
