"""HD95, ASSD and NSD: known answers in mm (isotropic and anisotropic voxels), edge cases, and agreement
with MONAI and with a brute-force computation on random blobs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from pipeline.evaluate import assd, hd95, nsd, surface_distances
from pipeline.evaluate.surface import surface_voxels, union_bbox
from tests.evaluate.blobs import random_blob

SHAPE = (20, 18, 16)


def cube(start, size, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_force(pred, truth, spacing):
    """Reference: SciPy erosion surfaces, all pairwise distances."""
    surf = [np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing) for m in (pred, truth)]
    pairwise = cdist(surf[0], surf[1])
    return pairwise.min(axis=1), pairwise.min(axis=0)


# --- surfaces --------------------------------------------------------------------------------------


def test_surface_of_cubes():
    assert surface_voxels(cube((2, 2, 2), 3)).sum() == 27 - 1
    assert surface_voxels(cube((2, 2, 2), 5)).sum() == 125 - 27
    assert surface_voxels(cube((2, 2, 2), 2)).sum() == 8


def test_surface_is_monai_erosion_definition_on_blobs():
    for seed in range(3):
        mask = random_blob(seed=seed)
        np.testing.assert_array_equal(surface_voxels(mask), mask & ~ndimage.binary_erosion(mask))


def test_voxels_on_the_array_border_are_surface():
    full = np.ones((4, 5, 6), bool)
    surface = surface_voxels(full)
    assert surface.sum() == full.size - 2 * 3 * 4
    assert not surface[1:-1, 1:-1, 1:-1].any()


def test_union_bbox_with_margin_is_clipped():
    a, b = cube((0, 3, 5), 2), cube((6, 4, 5), 3)
    assert union_bbox(a, b, margin=1) == (slice(0, 10), slice(2, 8), slice(4, 9))
    assert union_bbox(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)) is None


# --- known answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, expected",
                         [((1.0, 1.0, 1.0), 5.0), ((2.0, 0.5, 1.0), math.sqrt(6**2 + 2**2))])
def test_two_single_voxels(spacing, expected):
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[2, 3, 4] = True
    b[5, 7, 4] = True  # offset (3, 4, 0) voxels
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert assd(a, b, spacing) == pytest.approx(expected)
    assert nsd(a, b, spacing, tolerance_mm=expected - 1e-6) == 0.0
    assert nsd(a, b, spacing, tolerance_mm=expected) == 1.0  # within means distance <= tolerance


@pytest.mark.parametrize("axis, spacing", [(0, (2.0, 0.7, 1.3)), (1, (0.8, 0.8, 1.5)), (2, (0.8, 0.9, 2.5))])
def test_parallel_plates_three_voxels_apart(axis, spacing):
    """Two one-voxel-thick plates spanning the volume: every directed distance is 3 voxels along ``axis``."""
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    index_a, index_b = [slice(None)] * 3, [slice(None)] * 3
    index_a[axis], index_b[axis] = 4, 7
    a[tuple(index_a)] = b[tuple(index_b)] = True
    gap = 3 * spacing[axis]
    d = surface_distances(a, b, spacing)
    np.testing.assert_allclose(d.pred_to_gt, gap)
    np.testing.assert_allclose(d.gt_to_pred, gap)
    assert d.hausdorff(95) == pytest.approx(gap) and d.average() == pytest.approx(gap)
    assert d.surface_dice(gap - 1e-6) == 0.0 and d.surface_dice(gap) == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (2.0, 0.6, 1.7)])
def test_identical_cubes_shifted_three_voxels(spacing):
    """Cube side 6, shifted 3 voxels along axis 0. The farthest surface voxels (A's far face from B's, and
    back) are 3 voxels apart along axis 0; every other distance agrees with the brute-force reference."""
    a, b = cube((3, 5, 5), 6), cube((6, 5, 5), 6)
    d = surface_distances(a, b, spacing)
    ref_ab, ref_ba = brute_force(a, b, spacing)
    np.testing.assert_allclose(d.pred_to_gt, ref_ab, atol=1e-9)
    np.testing.assert_allclose(d.gt_to_pred, ref_ba, atol=1e-9)
    assert d.pred_to_gt.max() == pytest.approx(3 * spacing[0])
    assert d.gt_to_pred.max() == pytest.approx(3 * spacing[0])
    # Surface voxels shared by both cubes (side faces over the common x range) are at distance 0.
    assert np.count_nonzero(d.pred_to_gt == 0) == np.count_nonzero(surface_voxels(a) & surface_voxels(b))
    expected_hd95 = max(np.percentile(ref_ab, 95), np.percentile(ref_ba, 95))
    assert d.hausdorff(95) == pytest.approx(expected_hd95)
    assert d.average() == pytest.approx(np.concatenate([ref_ab, ref_ba]).mean())


def test_shifted_cube_directed_distances_by_hand():
    """1 mm voxels; A = x 3..6, B = x 5..8 (side 4, y and z 5..8). A's surface is 4³ − 2³ = 56 voxels:
    * face x=3 (16 voxels): 2 mm from B's face x=5;
    * rim of x=4 (12): 1 mm from B's face x=5;
    * rims of x=5 and x=6 (24): on B's surface, 0 mm;
    * the 4 inner voxels of face x=6 (inside B): 1 mm from B's face x=5."""
    a, b = cube((3, 5, 5), 4), cube((5, 5, 5), 4)
    d = surface_distances(a, b, (1.0, 1.0, 1.0))
    assert d.pred_to_gt.size == 56
    values, counts = np.unique(np.round(d.pred_to_gt, 6), return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0.0: 24, 1.0: 12 + 4, 2.0: 16}


def test_identical_masks_have_zero_distances():
    mask = random_blob(seed=3)
    d = surface_distances(mask, mask, (0.8, 0.9, 2.5))
    assert d.hausdorff(95) == 0.0 and d.average() == 0.0 and d.surface_dice(0.0) == 1.0


def test_disjoint_masks():
    a, b = cube((1, 1, 1), 3), cube((12, 1, 1), 3)  # facing faces x=3 and x=12: 9 voxels apart at 1.5 mm
    d = surface_distances(a, b, (1.5, 1.0, 1.0))
    assert d.pred_to_gt.min() == pytest.approx(9 * 1.5)
    assert d.surface_dice(5.0) == 0.0 and d.hausdorff() > 9 * 1.5


def test_both_empty():
    empty = np.zeros(SHAPE, bool)
    assert hd95(empty, empty) == 0.0 and assd(empty, empty) == 0.0 and nsd(empty, empty) == 1.0


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_one_empty(which):
    mask, empty = cube((2, 2, 2), 4), np.zeros(SHAPE, bool)
    pair = (empty, mask) if which == "pred" else (mask, empty)
    assert math.isnan(hd95(*pair)) and math.isnan(assd(*pair))
    assert nsd(*pair) == 0.0


def test_spacing_must_match_dimensions():
    with pytest.raises(ValueError, match="expected 3 spacing values"):
        hd95(cube((1, 1, 1), 2), cube((1, 1, 1), 2), (1.0, 1.0))


# --- independent implementations -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kdtree", "edt"])
@pytest.mark.parametrize("seed", range(3))
def test_both_methods_match_brute_force(seed, method):
    spacing = (0.8, 1.1, 2.5)
    pred, truth = random_blob(seed=seed), random_blob(seed=seed + 100)
    d = surface_distances(pred, truth, spacing, method=method)
    ref_ab, ref_ba = brute_force(pred, truth, spacing)
    np.testing.assert_allclose(d.pred_to_gt, ref_ab, atol=1e-9)
    np.testing.assert_allclose(d.gt_to_pred, ref_ba, atol=1e-9)


def test_dense_surfaces_use_the_distance_transform_and_agree():
    rng = np.random.default_rng(0)
    pred, truth = rng.random((16, 16, 10)) < 0.3, rng.random((16, 16, 10)) < 0.3  # speckle: all surface
    auto = surface_distances(pred, truth, (1.0, 1.0, 2.0))
    tree = surface_distances(pred, truth, (1.0, 1.0, 2.0), method="kdtree")
    np.testing.assert_allclose(auto.pred_to_gt, tree.pred_to_gt)
    np.testing.assert_allclose(auto.gt_to_pred, tree.gt_to_pred)


def _monai(pred, truth, spacing, tolerance):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(truth)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                               spacing=spacing)
        sd = compute_surface_dice(y_pred, y, [tolerance], include_background=True, spacing=spacing)
    return float(hd[0, 0]), float(asd[0, 0]), float(sd[0, 0])


@pytest.mark.parametrize(
    "shape, spacing, seed",
    [((30, 26, 18), (1.0, 1.0, 1.0), 0), ((30, 26, 18), (0.8, 1.1, 2.5), 1),
     ((30, 26, 18), (0.7, 0.7, 3.0), 2), ((40, 36), (0.6, 1.4), 3)],
    ids=["iso", "aniso", "thick-slices", "2d"],
)
def test_matches_monai(shape, spacing, seed):
    """Same HD95, ASSD and NSD as MONAI (float32 there): far tighter than one voxel spacing."""
    pred, truth = random_blob(shape, seed=seed), random_blob(shape, seed=seed + 100)
    tolerance = 1.5
    monai_hd, monai_asd, monai_nsd = _monai(pred, truth, spacing, tolerance)
    d = surface_distances(pred, truth, spacing)
    assert d.hausdorff(95) == pytest.approx(monai_hd, abs=1e-4)
    assert d.average() == pytest.approx(monai_asd, abs=1e-4)
    assert d.surface_dice(tolerance) == pytest.approx(monai_nsd, abs=1e-6)
