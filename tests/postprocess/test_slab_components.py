"""Slab-wise component labelling (pipeline.postprocess.slab_components) against scipy's full-volume
labelling: the same components, numbers, sizes and boxes; and the rules and lesion statistics built on
it against their full-label-map versions (kept here as the reference), voxel for voxel and figure for figure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.batch.report.lesions import lesion_stats, max_distance
from pipeline.postprocess import slab_components
from pipeline.postprocess.components import label_components, present_values, remove_small_components
from pipeline.postprocess.rules import keep_largest_component, largest_component
from pipeline.postprocess.slab_components import FULL_CONNECTIVITY, SlabComponents, slab_step
from tests.conftest import make_affine

STEPS = [1, 2, 3, 7, 1000]  # one plane per slab ... one slab larger than the volume


def full_map(components: SlabComponents) -> np.ndarray:
    out = np.zeros(components.array.shape, dtype=np.intp)
    for k0, k1, slab in components.slabs():
        out[k0:k1] = slab
    return out


def assert_same_as_scipy(array: np.ndarray, value, step: int) -> None:
    mask = array != 0 if value is None else array == value
    reference, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    components = SlabComponents(array, value, step=step)
    assert components.count == count
    np.testing.assert_array_equal(full_map(components), reference)
    np.testing.assert_array_equal(components.sizes, np.bincount(reference.ravel(), minlength=count + 1)[1:])
    assert components.boxes == ndimage.find_objects(reference)


def random_labels(seed: int, shape=None, classes: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = shape or tuple(int(n) for n in rng.integers(3, 16, 3))
    dense = rng.random(shape) < rng.uniform(0.05, 0.5)
    return (dense * rng.integers(1, classes + 1, shape)).astype(np.uint8)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("step", STEPS)
def test_random_masks_label_as_scipy_does(seed, step):
    labels = random_labels(seed)
    for value in (None, 1, 2):
        assert_same_as_scipy(labels, value, step)


@pytest.mark.parametrize("step", STEPS)
def test_blobs_crossing_faces_diagonally_and_fortran_order(step):
    """Smoothed random blobs (large components spanning many slabs, touching faces at corners), and the
    same in Fortran order (scipy still numbers in C order)."""
    rng = np.random.default_rng(5)
    blobs = (ndimage.gaussian_filter(rng.random((24, 20, 18)), 1.5) > 0.52).astype(np.uint8)
    assert_same_as_scipy(blobs, None, step)
    assert_same_as_scipy(np.asfortranarray(blobs), 1, step)
    assert SlabComponents(blobs, step=step).count == ndimage.label(blobs, FULL_CONNECTIVITY)[1] > 3


def test_diagonal_neighbours_across_a_face_join_and_two_apart_do_not():
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # corner to corner across the face between planes 1 and 2
    mask[1, 4, 1] = mask[2, 4, 3] = 1  # two apart in the plane: not neighbours
    components = SlabComponents(mask, step=2)
    assert components.count == 3 and list(components.sizes) == [2, 1, 1]
    assert_same_as_scipy(mask, None, 2)


def test_a_u_shape_joins_two_slab_components_only_in_a_later_slab():
    """Two arms start in the first slab as two components; only the base, three slabs later, joins them.
    Another component starts between the arms' first voxels: it must still be number 2."""
    mask = np.zeros((10, 5, 9), np.uint8)
    mask[0:8, 2, 1] = 1  # left arm
    mask[0:8, 2, 7] = 1  # right arm
    mask[7, 2, 1:8] = 1  # the base, in the fourth slab of two planes
    mask[0, 2, 4] = 1  # a lone voxel between the arms' first voxels (in C order)
    mask[9, 0, 0] = 1  # a last one
    components = SlabComponents(mask, step=2)
    assert components.count == 3
    assert list(components.sizes) == [8 + 8 + 5, 1, 1]
    assert components.boxes[0] == (slice(0, 8), slice(2, 3), slice(1, 8))
    for step in STEPS:
        assert_same_as_scipy(mask, None, step)


def test_a_component_through_every_slab_and_an_empty_mask():
    mask = np.zeros((12, 4, 4), bool)
    mask[:, 1, 1] = True
    mask[5, 3, 3] = True
    components = SlabComponents(mask, step=1)
    assert components.count == 2 and list(components.sizes) == [12, 1]
    empty = SlabComponents(np.zeros((5, 4, 3), np.uint8))
    assert empty.count == 0 and empty.boxes == [] and not full_map(empty).any()


def test_slab_step_and_only_the_slabs_asked_for():
    assert slab_step((512, 512, 800), slab_voxels=512 * 800 * 4) == 4
    assert slab_step((512, 4096, 4096), slab_voxels=10) == 1
    mask = np.zeros((9, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[8, 2, 2] = 1
    components = SlabComponents(mask, step=3)
    assert [k0 for k0, _, _ in components.slabs(only=[2])] == [6]
    assert [k0 for k0, _, _ in components.slabs()] == [0, 3, 6]


def test_present_values_are_those_of_np_unique():
    labels = random_labels(3, shape=(20, 6, 5), classes=4)
    labels[labels == 3] = 0
    assert present_values(labels) == [int(v) for v in np.unique(labels) if v != 0] == [1, 2, 4]
    assert present_values(np.zeros((4, 4, 4), np.uint8)) == []


# --- the rules and lesion statistics against their full-label-map versions ----------------------------


def reference_remove_small(labels: np.ndarray, min_voxels: float) -> np.ndarray:
    out = labels.copy()
    for value in [int(v) for v in np.unique(labels) if v != 0]:
        components, _ = label_components(labels == value)
        sizes = np.bincount(components.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        out[np.isin(components, small[small != 0])] = 0
    return out


def reference_keep_largest(labels: np.ndarray, value: int) -> np.ndarray:
    components, count = label_components(labels == value)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out = labels.copy()
    out[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    return out


def reference_lesions(labels, affine, image, probability) -> list[tuple]:
    """Each component measured on its own box, from a full label map (the statistics before slabs)."""
    rows = []
    for value in [int(v) for v in np.unique(labels) if v > 0]:
        components, _ = label_components(labels == value)
        found = []
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            inside = components[box] == index
            offset = np.array([s.start for s in box])
            ijk = np.argwhere(inside)
            boundary = inside & ~ndimage.binary_erosion(inside, border_value=0)
            points = (np.argwhere(boundary) + offset) @ affine[:3, :3].T
            centroid = affine[:3, :3] @ (ijk.mean(axis=0) + offset) + affine[:3, 3]
            found.append((len(ijk), tuple(float(c) for c in centroid), max_distance(points),
                          float(np.asarray(image[box], dtype=np.float64)[inside].mean()),
                          float(np.asarray(probability[box])[inside].max())))
        found.sort(key=lambda m: -m[0])
        rows += [(value, lesion_id, *m) for lesion_id, m in enumerate(found, start=1)]
    return rows


def as_rows(lesions) -> list[tuple]:
    return [(x.label, x.lesion_id, x.voxels, (x.centroid_x_mm, x.centroid_y_mm, x.centroid_z_mm),
             x.max_diameter_mm, x.mean_intensity, x.max_probability) for x in lesions]


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of 40 voxels: the rules' volumes below span many slabs."""
    monkeypatch.setattr(slab_components, "SLAB_VOXELS", 40)


def blob_labels(seed: int, shape=(30, 14, 12)) -> np.ndarray:
    """Two classes of smooth blobs of many sizes (ties among the small ones), some lone voxels."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 1.2)
    labels = (field > np.quantile(field, 0.8)).astype(np.uint8)
    labels[(field > np.quantile(field, 0.8)) & (rng.random(shape) < 0.3)] = 2
    labels[rng.random(shape) < 0.01] = 1
    return labels


@pytest.mark.parametrize("seed", range(4))
def test_small_components_and_keep_largest_equal_the_full_map(small_slabs, seed):
    labels = blob_labels(seed)
    for min_voxels in (2, 5, 30):
        expected = reference_remove_small(labels, min_voxels)
        np.testing.assert_array_equal(remove_small_components(labels, min_voxels), expected)
        in_place = labels.copy()
        assert remove_small_components(in_place, min_voxels, in_place=True) is in_place
        np.testing.assert_array_equal(in_place, expected)
    for value in (1, 2):
        np.testing.assert_array_equal(keep_largest_component(labels, value), reference_keep_largest(labels, value))


def test_keep_largest_ties_keep_the_first_in_scan_order(small_slabs):
    """Two 8-voxel cubes, each spanning several slabs: the one whose first voxel comes first in C order
    is kept (scipy's lower number); a third, larger component appearing last wins."""
    labels = np.zeros((12, 10, 10), np.uint8)
    labels[6:8, 0:2, 0:2] = 1  # first voxel (6, 0, 0)
    labels[2:4, 8:10, 8:10] = 1  # first voxel (2, 8, 8): first in C order
    out = keep_largest_component(labels, 1)
    assert out[2, 8, 8] == 1 and out[6, 0, 0] == 0 and int(out.sum()) == 8
    np.testing.assert_array_equal(out, reference_keep_largest(labels, 1))
    kept = largest_component(labels > 0)
    assert kept[2, 8, 8] and not kept[6, 0, 0]
    labels[10:12, 4:7, 4:7] = 1  # 18 voxels
    assert int(keep_largest_component(labels, 1).sum()) == 18


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("image_dtype", [np.int16, np.float32])
def test_lesion_stats_equal_the_full_map_exactly(small_slabs, seed, image_dtype):
    """Counts, numbering (largest first, ties in scan order), volumes, centroids, diameters, intensities
    (exact integer sums, or a float scan's values in the same order) and probabilities: bit for bit."""
    labels = blob_labels(seed)
    labels[0, 0, 0] = 1  # a lesion at the grid's corner
    rng = np.random.default_rng(seed)
    if image_dtype == np.int16:
        image = rng.integers(-1000, 1500, labels.shape).astype(np.int16)
    else:
        image = (rng.standard_normal(labels.shape) * 1e3).astype(np.float32)
    probability = rng.random(labels.shape).astype(np.float16)
    affine = make_affine("oblique", spacing=(0.8, 0.9, 2.5))
    lesions = lesion_stats(labels, affine, image=image, probability=probability)
    assert len(lesions) > 10
    assert as_rows(lesions) == reference_lesions(labels, affine, image, probability)


def test_the_rules_hold_no_full_size_label_map(monkeypatch):
    """numpy reports its buffers to tracemalloc: removing small components in place and the lesion
    statistics of lesions spread over the whole volume stay well under the 2 bytes per voxel of the
    uint16 label map of their box (slabs of four planes here, 1/100 of the volume, each with some 20
    bytes per slab voxel of scratch: 0.33 and 0.29 bytes per voxel measured)."""
    import tracemalloc

    monkeypatch.setattr(slab_components, "SLAB_VOXELS", 1 << 14)
    rng = np.random.default_rng(0)
    shape = (400, 64, 64)
    labels = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(60):  # balls of radius 1.5 to 6 voxels, anywhere
        centre, radius = rng.uniform(0, shape), rng.uniform(1.5, 6)
        labels[sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2] = rng.integers(1, 3)
    labels[rng.random(shape) < 1e-4] = 1  # lone voxels: removed
    image = rng.integers(-100, 100, shape).astype(np.int16)
    voxels = labels.size
    expected = reference_remove_small(labels, 10)
    tracemalloc.start()
    try:
        remove_small_components(labels, 10, in_place=True)
        small_peak = tracemalloc.get_traced_memory()[1] / voxels
        tracemalloc.reset_peak()
        lesions = lesion_stats(labels, np.eye(4), image=image)
        lesion_peak = tracemalloc.get_traced_memory()[1] / voxels
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(labels, expected)
    assert len(lesions) > 20 and sum(x.voxels for x in lesions) == int((expected > 0).sum()) > 0
    assert small_peak < 0.5 and lesion_peak < 0.5, (small_peak, lesion_peak)
