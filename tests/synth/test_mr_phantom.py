"""The synthetic MR phantom: both channels are needed to tell oedema from core; geometry in world mm."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.synth.mr_head import world_points
from pipeline.synth.mr_phantom import make_mr_case, other_grid

logger = logging.getLogger(__name__)
SMALL = {"shape": (40, 40, 12), "spacing": (2.0, 2.0, 3.0)}
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def _case(seed: int, **kwargs):
    return make_mr_case(np.random.default_rng(seed), **kwargs)


@pytest.fixture(scope="module")
def regions():
    """Pooled voxel values per region over six default-size cases with three lesions each.

    ``oedema``: oedema voxels whose in-plane neighbours are lesion and that lie more than a voxel from
    the core (away from both soft edges); ``ring``: tissue 2-4 voxels around a lesion, in-plane."""
    pooled = {name: {"FLAIR": [], "T1c": []} for name in ("oedema", "core", "ring")}
    for seed in range(6):
        case = _case(seed, n_lesions=3, orientation=("RAS", "LPS", "oblique")[seed % 3])
        lesion = case.label > 0
        core = case.label == 2
        masks = {
            "oedema": ndimage.binary_erosion(lesion, IN_PLANE) & ~ndimage.binary_dilation(core) & ~core,
            "core": core,
            "ring": ndimage.binary_dilation(lesion, IN_PLANE, iterations=4)
            & ~ndimage.binary_dilation(lesion, IN_PLANE, iterations=1),
        }
        for name, mask in masks.items():
            pooled[name]["FLAIR"].append(case.flair[mask].astype(np.float64))
            pooled[name]["T1c"].append(case.t1c[mask].astype(np.float64))
    means = {name: {channel: float(np.concatenate(values).mean()) for channel, values in by.items()}
             for name, by in pooled.items()}
    counts = {name: sum(len(v) for v in by["FLAIR"]) for name, by in pooled.items()}
    logger.info("region means %s, voxels %s", means, counts)
    assert counts["oedema"] > 200 and counts["core"] > 100
    return means


def test_flair_shows_the_lesion_but_not_the_core(regions):
    assert regions["oedema"]["FLAIR"] > 1.3 * regions["ring"]["FLAIR"]
    assert regions["core"]["FLAIR"] == pytest.approx(regions["oedema"]["FLAIR"], rel=0.05)


def test_t1c_shows_the_core_but_not_the_oedema(regions):
    assert regions["core"]["T1c"] > 1.3 * regions["oedema"]["T1c"]
    assert regions["oedema"]["T1c"] == pytest.approx(regions["ring"]["T1c"], rel=0.08)


def test_tissue_ranges_and_background():
    case = _case(2, n_lesions=0)
    for image in (case.flair, case.t1c):
        assert image.dtype == np.int16 and image.min() >= 0
        assert np.median(image[:4, :4, :]) < 40  # air: Rician noise only
        deep_brain = case.head.shells["brain"].rho(world_points(case.flair.shape, case.affine)) < 0.5
        assert 300 <= np.median(image[deep_brain]) <= 650
    assert case.label.sum() == 0 and case.lesions == []


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_same_seed_same_case_other_seed_differs(orientation):
    a, b, c = (_case(seed, orientation=orientation, **SMALL) for seed in (5, 5, 6))
    for name in ("flair", "t1c", "label", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesions == b.lesions
    assert not np.array_equal(a.flair, c.flair)
    assert a.same_grid and a.flair.shape == a.t1c.shape == a.label.shape == SMALL["shape"]
    assert set(np.unique(a.label)) <= {0, 1, 2}


def test_other_t1c_grid_keeps_the_anatomy_and_the_flair():
    same = _case(7, n_lesions=2, orientation="oblique")
    other = _case(7, n_lesions=2, orientation="oblique", t1c_grid="other")
    np.testing.assert_array_equal(same.flair, other.flair)
    np.testing.assert_array_equal(same.label, other.label)
    assert same.lesions == other.lesions
    assert not other.same_grid
    shape, affine = other_grid(same.flair.shape, same.affine)
    assert other.t1c.shape == shape and np.array_equal(other.t1c_affine, affine)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.0, 1.0, 2.0])
    # the T1c grid covers the FLAIR grid: every FLAIR corner lies inside it
    corners = np.array(list(np.ndindex(2, 2, 2))) * (np.array(same.flair.shape) - 1)
    world = same.affine @ np.c_[corners, np.ones(8)].T
    index = (np.linalg.inv(affine) @ world)[:3]
    assert np.all(index > -0.5) and np.all(index.T < np.array(shape) - 0.5)


def test_lesion_sizes_and_count():
    diameters = []
    for seed in range(12):
        case = _case(seed, n_lesions=3)
        assert 1 <= len(case.lesions) <= 3
        for lesion in case.lesions:
            diameters.append(max(lesion["oedema_diameters_mm"]))
            assert max(lesion["core_diameters_mm"]) < max(lesion["oedema_diameters_mm"])
    assert 5 <= min(diameters) < 10 and 15 < max(diameters) <= 25


@pytest.mark.parametrize(
    "kwargs, message",
    [({"orientation": "PIR"}, "orientation"), ({"shape": (4, 40, 40)}, "shape"),
     ({"n_lesions": -1}, "n_lesions"), ({"t1c_grid": "mine"}, "t1c_grid")],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _case(0, **kwargs)
