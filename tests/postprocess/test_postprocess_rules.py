"""Post-processing rules (pipeline.postprocess.rules) on constructed label maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.postprocess.rules import (
    apply_postprocessing,
    body_mask,
    keep_largest_component,
    remove_outside,
)
from tests.conftest import make_affine

LABELS = "data.labels={background: 0, oedema: 1, core: 2}"


def _config(*overrides):
    return load_config(None, [LABELS, *overrides])


def _two_class_map() -> np.ndarray:
    """Class 1: a 4x4x4 cube (64 voxels) and a 2x2x2 one (8); class 2: a 3x3x3 cube (27) and one voxel."""
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[10:12, 10:12, 6:8] = 1
    labels[14:17, 2:5, 2:5] = 2
    labels[18, 18, 8] = 2
    return labels


def test_defaults_change_nothing():
    labels = _two_class_map()
    out = apply_postprocessing(labels, np.eye(4), None, _config())
    assert out is labels


def test_keep_largest_keeps_only_the_largest_component_of_that_class():
    labels = _two_class_map()
    out = keep_largest_component(labels, 1)
    assert int((out == 1).sum()) == 64 and out[10, 10, 6] == 0
    assert np.array_equal(out == 2, labels == 2)  # the other class untouched
    via_config = apply_postprocessing(labels, np.eye(4), None, _config("postprocess.keep_largest=[core]"))
    assert int((via_config == 2).sum()) == 27 and via_config[18, 18, 8] == 0
    assert int((via_config == 1).sum()) == 72


def test_min_component_in_mm3_uses_the_world_voxel_volume():
    """An oblique LPS grid of 0.8 x 0.9 x 2.5 mm voxels (1.8 mm³): the 8-voxel cube is 14.4 mm³, the lone
    voxel 1.8 mm³; a 15 mm³ minimum removes both, a 10 mm³ minimum only the lone voxel."""
    labels = _two_class_map()
    affine = make_affine("oblique", spacing=(0.8, 0.9, 2.5))
    out = apply_postprocessing(labels, affine, None, _config("inference.min_component_mm3=15"))
    assert int((out == 1).sum()) == 64 and int((out == 2).sum()) == 27
    out = apply_postprocessing(labels, affine, None, _config("inference.min_component_mm3=10"))
    assert int((out == 1).sum()) == 72 and int((out == 2).sum()) == 27


def _ct_with_body():
    """HU image: air (-1000) with a 12x12x8 soft-tissue body (40 HU) and a small bright table (200 HU)
    apart from it; class 1 inside the body and on the table, class 2 half in, half out."""
    image = np.full((20, 20, 10), -1000.0, np.float32)
    image[2:14, 2:14, 1:9] = 40.0
    image[17:19, 2:18, 1:9] = 200.0  # a table: above the floor but not the largest component
    labels = np.zeros(image.shape, np.uint8)
    labels[4:7, 4:7, 3:6] = 1  # inside the body
    labels[17:19, 8:10, 4:6] = 1  # on the table
    labels[12:16, 8:10, 4:6] = 2  # 2 of its 4 rows inside (12, 13): exactly half inside, kept
    labels[13:17, 12:14, 2:4] = 2  # rows 13..16: one of 4 inside, removed
    return image, labels


def test_body_mask_is_the_largest_component_above_the_window_floor():
    image, _ = _ct_with_body()
    body = body_mask(image, _config("preprocess.intensity.window=[-150, 250]"))
    assert int(body.sum()) == 12 * 12 * 8 and body[5, 5, 5] and not body[17, 5, 5]


def test_restrict_to_body_removes_components_lying_outside():
    image, labels = _ct_with_body()
    config = _config("postprocess.restrict_to_body=[oedema, core]")
    out = apply_postprocessing(labels, np.eye(4), image, config)
    assert int((out == 1).sum()) == 27 and out[17, 8, 4] == 0
    assert int((out == 2).sum()) == 16 and out[12, 8, 4] == 2 and out[13, 12, 2] == 0
    body = body_mask(image, config)
    assert np.array_equal(remove_outside(labels, 2, body) == 1, labels == 1)


def test_restrict_to_body_with_zscore_uses_the_image_minimum():
    image, labels = _ct_with_body()
    config = _config("preprocess.intensity.mode=zscore", "postprocess.restrict_to_body=[oedema]")
    out = apply_postprocessing(labels, np.eye(4), image, config)
    assert int((out == 1).sum()) == 27


def test_an_unknown_class_name_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"'lesion'.*\['oedema', 'core'\]"):
        apply_postprocessing(_two_class_map(), np.eye(4), None, _config("postprocess.keep_largest=[lesion]"))


def test_segmenter_finish_applies_the_rules(tmp_path):
    """A stand-in network that returns its input as the label: with keep_largest the second, smaller
    component of the scan is gone from the segmentation, on the source grid."""
    import torch

    from pipeline.infer import Segmenter
    from tests.conftest import blob_label, save_nifti

    class LabelEcho(torch.nn.Module):  # the input (window [0, 1] keeps 0/1) is the label
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

        def forward(self, x):
            return torch.cat([(0.5 - x) * 20, (x - 0.5) * 20], dim=1)

    label = blob_label()
    affine = make_affine("oblique")
    save_nifti(label.astype(np.float32), affine, tmp_path / "case.nii.gz")
    overrides = ["preprocess.spacing=null", "preprocess.intensity.window=[0, 1]", "preprocess.crop_foreground=false",
                 "inference.roi_size=[16, 16, 8]", "inference.min_component_mm3=0"]
    with torch.no_grad():
        plain = Segmenter(LabelEcho(), load_config(None, overrides), "cpu").segment(str(tmp_path / "case.nii.gz"))
        kept = Segmenter(LabelEcho(), load_config(None, [*overrides, "postprocess.keep_largest=[lesion]"]),
                         "cpu").segment(str(tmp_path / "case.nii.gz"))
    np.testing.assert_array_equal(plain.labels, label)
    np.testing.assert_array_equal(kept.labels, keep_largest_component(label, 1))
    assert 0 < int(kept.labels.sum()) < int(label.sum())
