"""Calibration windows from the training data: the documented rule (first cases, lesion-centred half,
seeded), a digest that changes with the data, and the crop at the image's border."""

from __future__ import annotations

import numpy as np

from pipeline.config import load_config
from pipeline.infer.calibration import CASES, RULE_TRAINING, WINDOWS_PER_CASE, calibration_for, crop_window
from tests.helpers import tiny_config_overrides, write_msd_dataset


def config_for(root):
    return load_config(None, tiny_config_overrides(f"data.root={root}", "inference.roi_size=[8, 8, 4]"))


def test_training_windows_follow_the_rule(tmp_path):
    root = write_msd_dataset(tmp_path / "data", n_cases=5, shape=(24, 24, 12))
    config = config_for(root)
    first, second = calibration_for(config), calibration_for(config)
    assert first.rule == RULE_TRAINING and first.digest == second.digest
    windows = first.windows()
    assert windows.shape == (CASES * WINDOWS_PER_CASE, 1, 8, 8, 4) and windows.dtype == np.float32
    np.testing.assert_array_equal(windows, second.windows())  # seeded
    # the lesion-centred half: the window's centre voxel is a lesion voxel (150 HU, the brightest: 1.0
    # after the demo's intensity window); the lesions are blobs, so the centre lies inside one
    centre = windows[:, 0, 4, 4, 2].reshape(CASES, WINDOWS_PER_CASE)
    assert np.all(centre[:, : WINDOWS_PER_CASE // 2] == windows.max())
    assert "4 training case(s)" in first.description  # the first 4 of the 5, in dataset order

    image = root / "imagesTr" / "case_000_0000.nii.gz"
    image.write_bytes(image.read_bytes() + b"\0")  # another file: another digest (the int8 cache key)
    assert calibration_for(config).digest != first.digest


def test_crop_window_shifts_inside_and_pads_small_images():
    image = np.arange(2 * 6 * 5 * 3, dtype=np.float32).reshape(2, 6, 5, 3)
    window = crop_window(image, (0, 4, 2), (4, 4, 4))
    assert window.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(window[:, :, :, :3], image[:, 0:4, 1:5, :])  # shifted to start at 0 / 1
    assert np.all(window[0, :, :, 3] == image[0].min()) and np.all(window[1, :, :, 3] == image[1].min())
