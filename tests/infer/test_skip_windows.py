"""inference.skip_empty: body — the windows skipped are exactly those the rule says, and the voxels of
the (dilated) body get exactly the full pass's probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.infer import Segmenter
from pipeline.infer.skip import block_any, body_region, dilate_box, margin_voxels
from pipeline.infer.stream import stream_windows
from pipeline.infer.windows import WindowGrid
from tests.helpers import Pointwise, torch_threads

SHAPE = (64, 64, 24)
ROI = (16, 16, 8)
BODY = (slice(20, 36), slice(24, 40), slice(4, 12))  # the known body box (preprocessed CT: 0 is air)
SPACING = (2.0, 2.0, 2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def ct_config(*extra):
    return load_config(None, ["preprocess.spacing=[2.0, 2.0, 2.0]", "preprocess.crop_foreground=false",
                              "inference.roi_size=[16, 16, 8]", "inference.overlap=0.5",
                              "inference.min_component_mm3=0", *extra])


def body_volume() -> torch.Tensor:
    x = torch.zeros(1, *SHAPE)
    x[(0,) + BODY] = 0.5
    return x


def test_block_any_and_box_dilation():
    mask = np.zeros((9, 8, 4), bool)
    mask[4, 0, 3] = True
    coarse = block_any(mask, (4, 4, 4))
    assert coarse.shape == (3, 2, 1) and np.argwhere(coarse).tolist() == [[1, 0, 0]]
    assert dilate_box(coarse, (1, 0, 0))[:, 0, 0].tolist() == [True, True, True]
    assert margin_voxels(8.0, (2.0, 2.0, 2.5), (4, 4, 4)) == (1, 1, 1)
    assert margin_voxels(8.1, (2.0, 2.0, 2.0), (4, 4, 4)) == (2, 2, 2)
    assert margin_voxels(0.0, (2.0, 2.0, 2.0), (4, 4, 4)) == (0, 0, 0)


def test_the_skipped_windows_are_exactly_those_the_rule_says():
    cfg = ct_config("inference.skip_empty=body", "inference.skip_margin_mm=8")
    region = body_region(body_volume(), cfg.preprocess, SPACING, margin_mm=8.0)
    # the body's 4-voxel blocks are x 5..8, y 6..9, z 1..2; dilated by ceil(8 / (2 * 4)) = 1 block:
    # voxels x 16..39, y 20..43, z 0..15
    expected_region = np.zeros(SHAPE, bool)
    expected_region[16:40, 20:44, 0:16] = True
    np.testing.assert_array_equal(region.fine(), expected_region)

    grid = WindowGrid(SHAPE, ROI, 0.5)
    expected = {start for start in grid.starts()
                if all(s < hi and s + r > lo for s, r, lo, hi in zip(start, ROI, (16, 20, 0), (40, 44, 16)))}
    assert 0 < len(expected) < len(grid)

    # channel 1 holds each voxel's flat index, so a tile tells where its window starts
    index = torch.arange(np.prod(SHAPE), dtype=torch.float64).view(1, *SHAPE)
    image = torch.cat([body_volume().double(), index]).float()
    ran = []

    def forward(tiles):
        for flat in tiles[:, 1, 0, 0, 0].double().round().long().tolist():
            ran.append(tuple(int(v) for v in np.unravel_index(flat, SHAPE)))
        return torch.zeros(tiles.shape[0], 2, *tiles.shape[2:])

    stats = stream_windows(image, forward, ROI, 0.5, "gaussian", 3, lambda *a: None, keep=region.touches, channels=2)
    assert sorted(ran) == sorted(expected)
    assert (stats.windows, stats.skipped) == (len(expected), len(grid) - len(expected))


def test_skipping_keeps_the_full_pass_inside_the_body_and_background_elsewhere():
    net = Pointwise([4.0, -4.0], [0.0, 1.0])  # P(lesion) = sigmoid(1 - 8x): high in air, low in the body
    x = body_volume()
    full = Segmenter(net, ct_config(), "cpu", backend="torch")
    skip = Segmenter(net, ct_config("inference.skip_empty=body", "inference.skip_margin_mm=8"), "cpu",
                     backend="torch")
    ref = full._predict(x, None, keep_all=False)
    got = skip._predict(x, None, keep_all=False)
    assert got.skipped > 0 and got.windows + got.skipped == ref.windows and ref.skipped == 0
    covered = np.zeros(SHAPE, bool)  # the voxels of every window that ran
    region = body_region(x, skip.config.preprocess, SPACING, 8.0)
    for start in WindowGrid(SHAPE, ROI, 0.5).starts():
        box = tuple(slice(s, s + r) for s, r in zip(start, ROI))
        if region.touches(box):
            covered[box] = True
    inside = torch.from_numpy(region.fine())
    torch.testing.assert_close(got.probs[0][inside], ref.probs[0][inside], atol=0, rtol=0)
    assert float(ref.probs[0][~torch.from_numpy(covered)].min()) > 0.5  # the full pass labels the air
    assert float(got.probs[0][~torch.from_numpy(covered)].max()) < 1e-6  # skipped: background


def test_an_empty_scan_skips_every_window_and_is_background():
    net = Pointwise([0.0, 0.0], [0.0, 5.0])
    skip = Segmenter(net, ct_config("inference.skip_empty=body"), "cpu", backend="torch")
    got = skip._predict(torch.zeros(1, 32, 32, 16), None, keep_all=False)
    assert got.windows == 0 and got.skipped == 27 and float(got.probs.max()) < 1e-6
    assert got.probs.shape == (1, 32, 32, 16)


def test_many_classes_and_every_position_of_the_body():
    net = Pointwise([1.0, -2.0, 3.0], [0.0, 0.5, -0.5])
    x = body_volume()
    labels = {"background": 0, "a": 1, "b": 2}
    for margin in (0, 8, 30):
        cfg = ct_config("inference.skip_empty=body", f"inference.skip_margin_mm={margin}")
        cfg.data.labels = labels
        ref_cfg = ct_config()
        ref_cfg.data.labels = labels
        got = Segmenter(net, cfg, "cpu", backend="torch")._predict(x, None, keep_all=False)
        ref = Segmenter(net, ref_cfg, "cpu", backend="torch")._predict(x, None, keep_all=False)
        inside = torch.from_numpy(body_region(x, cfg.preprocess, SPACING, margin).fine())
        torch.testing.assert_close(got.labels[0][inside], ref.labels[0][inside], atol=0, rtol=0)
        assert got.labels.shape == ref.labels.shape


def test_skip_empty_is_checked():
    with pytest.raises(ConfigError, match="inference.skip_empty"):
        ct_config("inference.skip_empty=lungs")
    assert ct_config().inference.skip_empty == "none"


def test_grid_spacing_from_the_affine_else_the_config():
    from monai.data import MetaTensor

    from pipeline.infer.skip import grid_spacing

    affine = torch.diag(torch.tensor([-1.6, 1.6, 2.5, 1.0], dtype=torch.float64))
    assert grid_spacing(MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine), None) == pytest.approx((1.6, 1.6, 2.5))
    assert grid_spacing(torch.zeros(1, 4, 4, 4), [2.0, 2.0, 3.0]) == (2.0, 2.0, 3.0)
    assert grid_spacing(torch.zeros(1, 4, 4, 4), None) == (1.0, 1.0, 1.0)
