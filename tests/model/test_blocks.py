"""U-Net building blocks: the centre crop that fits a skip (or a label) to a valid-padding output."""

from __future__ import annotations

import torch

from pipeline.model.blocks import center_crop


def test_center_crop():
    label = torch.arange(10 * 12 * 9).reshape(1, 1, 10, 12, 9)
    cropped = center_crop(label, torch.Size([6, 12, 5]))
    assert tuple(cropped.shape) == (1, 1, 6, 12, 5)
    torch.testing.assert_close(cropped, label[:, :, 2:8, :, 2:7])


def test_center_crop_odd_difference_and_2d():
    label = torch.arange(2 * 11 * 8).reshape(2, 1, 11, 8)
    cropped = center_crop(label, (6, 3))
    torch.testing.assert_close(cropped, label[:, :, 2:8, 2:5])  # (11 - 6) // 2 = 2, (8 - 3) // 2 = 2


def test_center_crop_same_size_is_identity():
    label = torch.zeros(1, 1, 4, 4, 4)
    assert center_crop(label, label.shape[2:]) is label
