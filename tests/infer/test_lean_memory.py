"""The segment path's memory: the lean preprocessing gives the same values as the reference one, the
masks are unchanged, no float64 volume is made, and the volumes the engine holds stay under a bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.batch.report.lesions import lesion_stats
from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.infer.segmenter import Prepared
from pipeline.postprocess.components import remove_small_components
from pipeline.transforms.preprocess import oriented_as_read, preprocess_transforms
from tests.conftest import blob_label, make_affine, save_nifti
from tests.helpers import Pointwise, hu_volume, torch_threads


def permuted_affine() -> np.ndarray:
    """A sagittal-stored scan: file axis i runs along world y, j along z, k along x."""
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 0], affine[2, 1], affine[3, 3] = 2.5, 0.8, -0.9, 1.0
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


ORIENTATIONS = ["RAS", "LPS", "oblique", "feet_first", "permuted"]


def affine_for(orientation: str) -> np.ndarray:
    return permuted_affine() if orientation == "permuted" else make_affine(orientation)


def config(*extra):
    return load_config(None, [
        "preprocess.spacing=[1.6, 1.8, 3.0]", "preprocess.crop_foreground=true", "preprocess.crop_margin=2",
        "inference.roi_size=[16, 16, 8]", "inference.overlap=0.25", *extra,
    ])


def scan(tmp_path, orientation, shape=(40, 36, 14), dtype=np.int16):
    """A CT-like volume (air around a body holding bright blobs) in ``dtype``, saved as NIfTI."""
    volume = hu_volume(shape, seed=3).astype(np.float32) * 0.05 - 60.0
    volume[:3] = -1000.0
    volume[blob_label(shape) > 0] = 180.0
    path = save_nifti(volume.astype(dtype), affine_for(orientation), tmp_path / f"scan_{orientation}.nii.gz")
    return path, volume.astype(dtype)


def reference_prepare(segmenter: Segmenter, path) -> Prepared:
    """The preprocessing before the lean one: float32 first, then reorientation, low-pass by copy."""
    transforms = preprocess_transforms(segmenter.config.preprocess, channels=segmenter.config.data.channels)
    loaded = transforms({"image": str(path)}, end=1)
    array = loaded["image"].as_tensor()[0].numpy()
    source = array.copy() if array.dtype == np.float32 else array
    image = transforms(loaded, start=1)["image"]
    return Prepared(image=image, source_image=source, source=str(path))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_lean_preprocessing_gives_the_same_values_and_source(tmp_path, orientation, dtype):
    path, volume = scan(tmp_path, orientation, dtype=dtype)
    segmenter = Segmenter(Pointwise([-8.0, 8.0], [4.0, -4.0]), config(), "cpu")
    lean = segmenter.load(str(path))
    reference = reference_prepare(segmenter, path)

    assert lean.source_image.dtype == volume.dtype
    np.testing.assert_array_equal(lean.source_image, volume)  # the grid it was read in, voxel for voxel
    assert lean.image.dtype == torch.float32
    assert torch.equal(lean.image.as_tensor(), reference.image.as_tensor())  # bit for bit
    np.testing.assert_array_equal(np.asarray(lean.image.affine), np.asarray(reference.image.affine))
    assert ([op["class"] for op in lean.image.applied_operations]
            == [op["class"] for op in reference.image.applied_operations])
    if orientation != "RAS":  # a view of the reoriented volume (float32 too: the resampling only reads it)
        assert lean.source_image.base is not None


@pytest.mark.parametrize("orientation", ["LPS", "permuted"])
def test_masks_unchanged_against_the_reference_path(tmp_path, orientation):
    path, _ = scan(tmp_path, orientation)
    # min_component_mm3 removes some islands (in place now), so that step is compared too
    segmenter = Segmenter(Pointwise([-9.0, 9.0], [5.5, -5.5]), config("inference.min_component_mm3=30"), "cpu")
    with torch_threads(1):
        lean = segmenter.finish(segmenter.predict(segmenter.load(str(path))), segmenter.load(str(path)))
        reference_prepared = reference_prepare(segmenter, path)
        reference = segmenter.finish(segmenter.predict(reference_prepared), reference_prepared)
    assert lean.labels.dtype == np.uint8 and lean.labels.shape == (40, 36, 14)
    assert 0 < int(lean.labels.sum()) < lean.labels.size  # something, not everything
    np.testing.assert_array_equal(lean.labels, reference.labels)
    np.testing.assert_array_equal(lean.foreground, reference.foreground)
    assert lean.foreground.dtype == np.float16


def test_oriented_as_read_refuses_a_wrong_shape():
    from monai.data import MetaTensor

    meta = {"original_affine": make_affine("LPS"), "affine": torch.as_tensor(make_affine("RAS")),
            "spatial_shape": np.array([5, 6, 7])}
    tensor = MetaTensor(torch.zeros(1, 5, 6, 8), meta=meta)
    with pytest.raises(ValueError, match="source's is"):
        oriented_as_read(tensor)


def test_small_components_in_place_equal_the_copy():
    labels = np.zeros((30, 30, 12), np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # 8 voxels: removed
    labels[10:20, 10:20, 3:8] = 1  # 500: kept
    labels[25:27, 5:7, 1:2] = 2  # 4: removed
    labels[22:29, 20:28, 4:10] = 2  # kept
    copy = remove_small_components(labels, 10)
    inplace_input = labels.copy()
    inplace = remove_small_components(inplace_input, 10, in_place=True)
    assert inplace is inplace_input
    np.testing.assert_array_equal(inplace, copy)
    assert int((copy == 1).sum()) == 500 and int((copy == 2).sum()) == 7 * 8 * 6


def test_lesion_stats_in_the_box_equal_the_whole_volume():
    """Two lesions of two labels: the figures are those found on the full grid (positions included)."""
    labels = np.zeros((50, 40, 20), np.uint8)
    labels[30:34, 10:13, 5:9] = 1
    labels[40:42, 30:33, 15:18] = 2
    labels[31, 11, 12] = 1
    image = np.arange(labels.size, dtype=np.int16).reshape(labels.shape)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    lesions = lesion_stats(labels, affine, image=image)
    assert [(lesion.label, lesion.lesion_id, lesion.voxels) for lesion in lesions] == [(1, 1, 48), (1, 2, 1),
                                                                                        (2, 1, 18)]
    np.testing.assert_allclose(lesions[0].centroid_mm, [31.5 * 0.5, 11 * 0.5, 6.5 * 2.0])
    np.testing.assert_allclose(lesions[1].centroid_mm, [31 * 0.5, 11 * 0.5, 24.0])
    assert lesions[1].mean_intensity == float(image[31, 11, 12])
    assert lesions[2].mean_intensity == pytest.approx(float(image[40:42, 30:33, 15:18].astype(float).mean()))


def test_numpy_peaks_on_the_hot_path(tmp_path, monkeypatch):
    """numpy reports its buffers to tracemalloc (torch does not), stage by stage: reading and preprocessing
    hold no numpy volume (the reference path's two float32 low-pass copies were 8 bytes per source voxel;
    the low-passed planes are made a few at a time: output slabs of 2,048 voxels here, so that this small
    scan is resampled in many), and going back to the source grid (uint8 labels, float16 P(lesion), slab
    scratch) plus the lesion statistics stay under 7 bytes per source voxel: a float64 volume alone would be 8."""
    import tracemalloc

    import pipeline.transforms.lean_resample as lean_resample

    monkeypatch.setattr(lean_resample, "SLAB_VOXELS", 1 << 11)

    shape = (96, 96, 40)
    voxels = int(np.prod(shape))
    path, _ = scan(tmp_path, "LPS", shape=shape)
    segmenter = Segmenter(Pointwise([-8.0, 8.0], [4.0, -4.0]), config("inference.min_component_mm3=20"), "cpu")
    peaks = {}
    with torch_threads(1):
        warm = segmenter.load(str(path))  # imports, caches and the first call's one-offs
        segmenter.finish(segmenter.predict(warm), warm)
        del warm
        tracemalloc.start()
        try:
            stages = (("load", lambda: segmenter.load(str(path))), ("predict", lambda: segmenter.predict(prepared)),
                      ("finish", lambda: segmenter.finish(prediction, prepared)),
                      ("lesions", lambda: lesion_stats(out.labels, out.affine, image=out.image,
                                                       probability=out.foreground)))
            for name, run in stages:
                tracemalloc.reset_peak()
                value = run()
                peaks[name] = tracemalloc.get_traced_memory()[1] / voxels
                if name == "load":
                    prepared = value
                elif name == "predict":
                    prediction = value
                elif name == "finish":
                    out = value
        finally:
            tracemalloc.stop()
    reference = reference_prepare(segmenter, path)
    assert out.labels.shape == shape and out.labels.dtype == np.uint8 and int(out.labels.sum()) > 0
    np.testing.assert_array_equal(out.labels, segmenter.finish(segmenter.predict(reference), reference).labels)
    assert peaks["load"] < 1.0, peaks
    assert peaks["predict"] < 1.0, peaks
    assert peaks["finish"] < 7.0 and peaks["lesions"] < 7.0, peaks
