"""Preprocessing (spacing, intensity, foreground crop, label check) and training samples (3D patches,
2D axial slices) with their lesion oversampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from pipeline.config import load_config
from pipeline.errors import InputError, describe_error
from pipeline.training.data import train_loader, training_cases
from pipeline.transforms.load import CheckLabelsd, LoadScand
from pipeline.transforms.preprocess import preprocess_transforms
from pipeline.transforms.sampling import RandAxialSliced, sampling_transforms
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


NO_AUGMENT = [f"augment.{name}_prob=0" for name in
              ("flip", "rotate", "scale", "elastic", "intensity_scale", "intensity_shift", "noise")]


def write_case(tmp_path, shape=(41, 37, 12), spacing=(0.8, 0.8, 2.5), orientation="RAS", seed=0):
    image, label = ct_case(shape, seed=seed)
    affine = make_affine(orientation, spacing=spacing)
    return (
        {"image": str(save_nifti(image, affine, tmp_path / "img.nii.gz")),
         "label": str(save_nifti(label, affine, tmp_path / "lbl.nii.gz"))},
        image,
        label,
        affine,
    )


def preprocess(item, *overrides, label=True):
    cfg = load_config(None, list(overrides))
    transform = preprocess_transforms(cfg.preprocess, label_key="label" if label else None,
                                      num_classes=cfg.num_classes if label else None)
    return transform(dict(item) if label else {"image": item["image"]})


# --- preprocessing ---------------------------------------------------------------------------------


def test_resampling_to_coarser_spacing(tmp_path):
    item, _, label, affine = write_case(tmp_path)  # odd in-plane sizes: (n - 1) * 0.8 / 1.6 is whole
    out = preprocess(item, "preprocess.spacing=[1.6, 1.6, 2.5]", "preprocess.crop_foreground=false")

    expected = (int((41 - 1) * 0.8 / 1.6) + 1, int((37 - 1) * 0.8 / 1.6) + 1, 12)
    assert expected == (21, 19, 12)
    assert tuple(out["image"].shape) == (1, *expected)
    assert tuple(out["label"].shape) == (1, *expected)
    new_affine = np.asarray(out["image"].meta["affine"])
    np.testing.assert_allclose(np.sqrt((new_affine[:3, :3] ** 2).sum(0)), [1.6, 1.6, 2.5], atol=1e-6)
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3], atol=1e-6)  # voxel 0 stays at the origin
    np.testing.assert_allclose(np.asarray(out["label"].meta["affine"]), new_affine)
    # the label is resampled with nearest neighbour: still 0/1, and every second voxel in-plane survives
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(out["label"][0].numpy(), label[::2, ::2, :])


def test_null_spacing_keeps_the_grid(tmp_path):
    item, image, _, affine = write_case(tmp_path, orientation="RAS")
    out = preprocess(item, "preprocess.spacing=null", "preprocess.crop_foreground=false")
    assert tuple(out["image"].shape) == (1, *image.shape)
    np.testing.assert_allclose(np.asarray(out["image"].meta["affine"]), affine, atol=1e-6)


def test_orientation_to_ras(tmp_path):
    item, image, _, _ = write_case(tmp_path, orientation="LPS")
    out = preprocess(item, "preprocess.spacing=null", "preprocess.crop_foreground=false",
                     "preprocess.intensity.window=[-1000, 1000]")
    new_affine = np.asarray(out["image"].meta["affine"])
    assert np.all(np.diag(new_affine)[:3] > 0)
    expected = (image[::-1, ::-1, :] + 1000) / 2000
    np.testing.assert_allclose(out["image"][0].numpy(), expected, atol=1e-6)


def test_ct_window_scales_to_unit_range(tmp_path):
    shape = (9, 9, 5)
    image = np.linspace(-400, 500, np.prod(shape), dtype=np.float32).reshape(shape)
    path = save_nifti(image, make_affine("RAS"), tmp_path / "ramp.nii.gz")

    out = preprocess({"image": str(path)}, "preprocess.spacing=null", "preprocess.crop_foreground=false",
                     "preprocess.intensity.window=[-150, 250]", label=False)

    values = out["image"][0].numpy()
    assert values.min() == 0.0 and values.max() == 1.0
    np.testing.assert_allclose(values, np.clip((image + 150) / 400, 0, 1), atol=1e-6)


def test_zscore_mode(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(300, 40, size=(16, 16, 8)).astype(np.float32)
    path = save_nifti(image, make_affine("RAS"), tmp_path / "mr.nii.gz")
    out = preprocess({"image": str(path)}, "preprocess.spacing=null", "preprocess.crop_foreground=false",
                     "preprocess.intensity.mode=zscore", label=False)
    values = out["image"][0].numpy().astype(np.float64)
    assert abs(values.mean()) < 1e-4
    assert values.std() == pytest.approx(1.0, abs=1e-3)


def test_foreground_crop_removes_air_border(tmp_path):
    item, image, label, affine = write_case(tmp_path)  # body at [3:-3] in x, y, z; air outside
    out = preprocess(item, "preprocess.spacing=null", "preprocess.crop_margin=1")

    # body [3, n-3) plus a margin of 1 voxel on each side
    expected = (41 - 4, 37 - 4, 12 - 4)
    assert tuple(out["image"].shape) == (1, *expected)
    assert tuple(out["label"].shape) == (1, *expected)
    crop = (slice(2, 39), slice(2, 35), slice(2, 10))
    np.testing.assert_array_equal(out["label"][0].numpy(), label[crop])
    np.testing.assert_allclose(out["image"][0].numpy(), np.clip((image[crop] + 150) / 400, 0, 1), atol=1e-6)
    assert int(out["label"].sum()) == int(label.sum())  # the lesions are inside the body
    # the cropped grid starts two voxels further along every axis
    new_origin = np.asarray(out["image"].meta["affine"])[:3, 3]
    np.testing.assert_allclose(new_origin, affine[:3, :3] @ [2, 2, 2] + affine[:3, 3])


def write_bad_label(tmp_path):
    image, label = ct_case((16, 16, 8))
    label[label > 0] = 3
    affine = make_affine("RAS")
    return {"image": str(save_nifti(image, affine, tmp_path / "img.nii.gz")),
            "label": str(save_nifti(label, affine, tmp_path / "bad_label.nii.gz"))}


def test_check_labels_names_the_file(tmp_path):
    item = write_bad_label(tmp_path)
    loaded = LoadScand(["image", "label"])(item)
    with pytest.raises(InputError) as info:
        CheckLabelsd(["label"], num_classes=2)(loaded)
    message = str(info.value)
    assert str(tmp_path / "bad_label.nii.gz") in message
    assert "[3]" in message and "0..1" in message and "data.labels" in message


def test_check_labels_error_survives_the_compose(tmp_path):
    """MONAI's Compose wraps transform errors in RuntimeError; the InputError stays in the chain."""
    with pytest.raises(Exception) as info:
        preprocess(write_bad_label(tmp_path), "preprocess.spacing=null")
    message = describe_error(info.value)
    assert str(tmp_path / "bad_label.nii.gz") in message and "[3]" in message


@pytest.mark.parametrize(
    "values, bad", [([0, 1, 2], "[2.0]"), ([0, 0.5, 1], "[0.5]"), ([-1, 0, 1], "[-1.0]")]
)
def test_check_labels_on_arrays(values, bad):
    label = torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1)
    with pytest.raises(InputError, match=rf"holds values \{bad}"):
        CheckLabelsd(["label"], num_classes=2)({"label": label})


def test_check_labels_passes_good_labels():
    label = torch.tensor([0, 1, 2], dtype=torch.float32).reshape(1, 3, 1, 1)
    out = CheckLabelsd(["label"], num_classes=3)({"label": label})
    assert out["label"] is label


# --- training samples ------------------------------------------------------------------------------


@pytest.fixture
def msd(tmp_path):
    return write_msd_dataset(tmp_path / "ds", n_cases=3, shape=(24, 24, 12))


def loader_config(root, *overrides):
    return load_config(None, [f"data.root={root}", "preprocess.spacing=null", "sampling.samples_per_volume=3",
                              "sampling.batch_size=2", *overrides])


def test_training_cases_from_manifest(msd):
    items = training_cases(msd)
    assert [i["case_id"] for i in items] == ["case_000", "case_001", "case_002"]
    assert items[1]["image"] == str(msd / "imagesTr" / "case_001_0000.nii.gz")
    assert items[1]["label"] == str(msd / "labelsTr" / "case_001.nii.gz")


def test_3d_training_batch_shapes(msd):
    cfg = loader_config(msd, "sampling.patch_size=[16, 16, 8]")
    batches = list(train_loader(training_cases(msd), cfg))
    assert len(batches) == 1  # 3 cases, batch 2, last partial batch dropped
    batch = batches[0]
    assert tuple(batch["image"].shape) == (2 * 3, 1, 16, 16, 8)
    assert tuple(batch["label"].shape) == (2 * 3, 1, 16, 16, 8)
    assert batch["image"].dtype == torch.float32
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}


def test_3d_patch_larger_than_volume_is_padded(msd):
    cfg = loader_config(msd, "sampling.patch_size=[32, 16, 16]", *NO_AUGMENT)
    batch = next(iter(train_loader(training_cases(msd), cfg)))
    assert tuple(batch["image"].shape) == (6, 1, 32, 16, 16)


def test_training_batches_are_seeded(msd):
    cfg = loader_config(msd, "sampling.patch_size=[16, 16, 8]")
    first = next(iter(train_loader(training_cases(msd), cfg)))
    second = next(iter(train_loader(training_cases(msd), cfg)))
    torch.testing.assert_close(first["image"], second["image"])


@pytest.mark.parametrize("augment", [[], NO_AUGMENT], ids=["augment", "no_augment"])
def test_2d_training_batch_shapes(msd, augment):
    two_d = ["model.spatial_dims=2", "sampling.patch_size=[32, 32]", "inference.roi_size=[32, 32]"]
    cfg = loader_config(msd, *two_d, *augment)
    batch = next(iter(train_loader(training_cases(msd), cfg)))
    assert tuple(batch["image"].shape) == (2 * 3, 1, 32, 32)
    assert tuple(batch["label"].shape) == (2 * 3, 1, 32, 32)


def small_lesion_volume():
    """A 48×48×16 volume with one 3×3×2 lesion: a random 8×8×4 patch rarely holds it."""
    image = torch.rand(1, 48, 48, 16, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(1, 48, 48, 16)
    label[0, 30:33, 10:13, 6:8] = 1
    return {"image": image, "label": label}


def lesion_fraction(pos_ratio: float, draws: int = 20) -> float:
    cfg = load_config(None, ["sampling.patch_size=[8, 8, 4]", f"sampling.pos_ratio={pos_ratio}",
                             "sampling.samples_per_volume=1"]).sampling
    sampler = Compose(sampling_transforms(cfg, spatial_dims=3)).set_random_state(seed=0)
    data = small_lesion_volume()
    hits = 0
    for _ in range(draws):
        (patch,) = sampler(data)
        assert tuple(patch["image"].shape) == (1, 8, 8, 4)
        hits += int(patch["label"].sum() > 0)
    return hits / draws


def test_positive_patches_are_oversampled():
    assert lesion_fraction(10.0) > 0.7
    assert lesion_fraction(0.0) < 0.3


def test_3d_samples_per_volume():
    cfg = load_config(None, ["sampling.patch_size=[8, 8, 4]", "sampling.samples_per_volume=5"]).sampling
    sampler = Compose(sampling_transforms(cfg, spatial_dims=3)).set_random_state(seed=1)
    patches = sampler(small_lesion_volume())
    assert len(patches) == 5 and all(tuple(p["label"].shape) == (1, 8, 8, 4) for p in patches)


def axial_slicer(lesion_ratio: float, num_samples: int) -> RandAxialSliced:
    slicer = RandAxialSliced(["image", "label"], "label", lesion_ratio=lesion_ratio, num_samples=num_samples)
    return slicer.set_random_state(seed=0)


def test_axial_slices_all_hold_lesion_when_ratio_is_one():
    data = small_lesion_volume()
    slicer = axial_slicer(lesion_ratio=1.0, num_samples=20)
    samples = slicer(data)
    assert len(samples) == 20
    assert set(slicer._indices) == {6, 7}  # both lesion slices are drawn, nothing else
    for sample, index in zip(samples, slicer._indices):
        assert tuple(sample["image"].shape) == (1, 48, 48)
        assert sample["label"].sum() == 9
        torch.testing.assert_close(sample["image"], data["image"][..., index])


def test_axial_slices_without_oversampling_cover_the_volume():
    slicer = axial_slicer(lesion_ratio=0.0, num_samples=200)
    slicer(small_lesion_volume())
    assert set(slicer._indices) == set(range(16))


def test_axial_slices_of_an_empty_label_are_random():
    data = small_lesion_volume()
    data["label"].zero_()
    slicer = axial_slicer(lesion_ratio=1.0, num_samples=50)
    samples = slicer(data)
    assert len(samples) == 50 and len(set(slicer._indices)) > 5
