"""The synthetic CT phantom: determinism, lesion sizes and contrast, noise, geometry in world mm."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.synth import SynthCase, make_case

logger = logging.getLogger(__name__)
SMALL = {"shape": (48, 48, 16), "spacing": (2.0, 2.0, 3.0)}


def _case(seed: int, **kwargs) -> SynthCase:
    return make_case(np.random.default_rng(seed), **kwargs)


def _single_lesions(orientation: str, count: int, shape: str | None = None):
    """The first ``count`` single-lesion cases (seeds 0, 1, ...) whose lesion is >= 12 mm and not clipped."""
    found = []
    for seed in range(60):
        case = _case(seed, orientation=orientation, n_lesions=1)
        lesion = case.lesions[0]
        big = min(lesion["diameters_mm"]) >= 12
        if big and not lesion["touches_border"] and shape in (None, lesion["shape"]):
            found.append(case)
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} unclipped {shape or 'lesions'} >= 12 mm in 60 seeds")


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_same_seed_same_case_and_different_seed_differs(orientation):
    a, b, c = (_case(seed, orientation=orientation, **SMALL) for seed in (5, 5, 6))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8 and a.affine.dtype == np.float64
    assert a.image.shape == a.label.shape == SMALL["shape"]


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_affine_spacing_orientation_and_centre(orientation):
    case = _case(3, orientation=orientation)
    linear = case.affine[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(linear, axis=0), [0.8, 0.8, 2.5])
    directions = linear / np.linalg.norm(linear, axis=0)
    if orientation == "RAS":
        np.testing.assert_allclose(directions, np.eye(3))
    elif orientation == "LPS":
        np.testing.assert_allclose(directions, np.diag([-1.0, -1.0, 1.0]))
    else:
        angle = np.degrees(np.arccos((np.trace(directions) - 1) / 2))  # total rotation angle
        assert 5 <= angle <= 29  # 5-20 degrees about one or two axes
        np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-12)
    centre = case.affine @ [*((np.array(case.image.shape) - 1) / 2), 1]
    assert np.all(np.abs(centre[:3]) <= 30)


def test_air_body_and_organ_values():
    case = _case(2, n_lesions=0)
    assert np.median(case.image[:5, :5, :]) == pytest.approx(-1000, abs=5)  # corner: air
    organ_median = np.median(case.image[case.organ])
    assert 50 <= organ_median <= 70
    assert 0.03 < case.organ.mean() < 0.2


def test_lesion_fraction_at_default_shape():
    fractions = []
    for seed in range(8):
        case = _case(seed, orientation=["RAS", "LPS", "oblique"][seed % 3])
        fraction = 100 * case.lesion_fraction
        logger.info("seed %d: %d lesions, %.3f %% lesion voxels", seed, len(case.lesions), fraction)
        if case.lesions:
            fractions.append(case.lesion_fraction)
            assert 0 < case.lesion_fraction <= 0.01
    assert len(fractions) >= 5
    assert 0.0005 <= np.mean(fractions) <= 0.01


def test_no_lesion_case_has_empty_label():
    case = _case(4, n_lesions=0, orientation="oblique")
    assert case.lesions == []
    assert case.label.sum() == 0
    assert case.lesion_fraction == 0.0
    assert case.organ.sum() > 0


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_label_lies_within_organ_and_lesion_metadata(orientation):
    case = _case(11, n_lesions=6, orientation=orientation)
    assert len(case.lesions) == 6
    assert case.label.sum() > 0
    assert not np.any(case.label.astype(bool) & ~case.organ)
    for lesion in case.lesions:
        assert 3 <= max(lesion["diameters_mm"]) <= 30
        assert 15 <= abs(lesion["contrast_hu"]) <= 60
        inverse = np.linalg.inv(case.affine)
        index = np.rint(inverse @ [*lesion["centre_mm"], 1])[:3].astype(int)
        assert case.organ[tuple(index)]  # each lesion is centred in the organ


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_std_in_homogeneous_organ(seed):
    case = _case(seed, n_lesions=0)
    region = ndimage.binary_erosion(case.organ, iterations=2)
    pairs = region[:-1] & region[1:]
    image = case.image.astype(np.float64)
    # neighbour differences cancel the smooth texture and keep sqrt(2) x the white noise
    measured = float(np.std((image[1:] - image[:-1])[pairs]) / np.sqrt(2))
    logger.info("seed %d: noise %.2f HU, measured %.2f HU", seed, case.noise_hu, measured)
    assert 10 <= case.noise_hu <= 25
    assert measured == pytest.approx(case.noise_hu, rel=0.05)


def test_large_lesion_contrast_to_surrounding_organ():
    for case in _single_lesions("RAS", count=3):
        lesion = case.lesions[0]
        label = case.label.astype(bool)
        core = ndimage.binary_erosion(label, iterations=1)
        # an in-plane ring on the same slices, so the smooth organ texture is sampled alike
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
        ring = ndimage.binary_dilation(core, in_plane, iterations=6) & ~ndimage.binary_dilation(
            label, in_plane, iterations=2
        )
        ring &= case.organ
        measured = case.image[core].mean() - case.image[ring].mean()
        logger.info("lesion contrast %.1f HU, measured %.1f HU", lesion["contrast_hu"], measured)
        assert 15 - 4 <= abs(measured) <= 60 + 4
        assert measured == pytest.approx(lesion["contrast_hu"], abs=4)


@pytest.mark.parametrize("orientation", ["RAS", "oblique"])
def test_single_sphere_is_round_in_world_mm(orientation):
    (case,) = _single_lesions(orientation, count=1, shape="sphere")
    lesion = case.lesions[0]
    diameter = lesion["diameters_mm"][0]
    world = (case.affine @ np.c_[np.argwhere(case.label), np.ones(case.label.sum())].T)[:3]
    extent = world.max(axis=1) - world.min(axis=1)
    # voxel pitch seen along each world axis
    pitch = np.abs(case.affine[:3, :3]).max(axis=1)
    logger.info("sphere %.1f mm: extents %s mm", diameter, np.round(extent, 1))
    assert np.all(extent <= diameter + 1e-6)
    assert np.all(extent >= diameter - 2 * pitch)
    np.testing.assert_allclose(world.mean(axis=1), lesion["centre_mm"], atol=0.6)
    volume_mm3 = case.label.sum() * abs(np.linalg.det(case.affine[:3, :3]))
    assert volume_mm3 == pytest.approx(np.pi / 6 * diameter**3, rel=0.1)


def test_default_case_is_fast():
    seconds = []
    for seed in range(3):
        started = time.perf_counter()
        _case(seed, orientation="oblique", n_lesions=6)
        seconds.append(time.perf_counter() - started)
    logger.info("make_case at 160x160x48: %.3f s", min(seconds))
    assert min(seconds) < 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orientation": "PIR"}, "orientation"),
        ({"shape": (2, 40, 40)}, "shape"),
        ({"n_lesions": -1}, "n_lesions"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _case(0, **kwargs)
