"""inference.cascade: the coarse pass's candidates (plus the margin) all lie in windows the fine pass runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.infer import Segmenter
from pipeline.infer.cascade import candidate_region, coarse_shape
from pipeline.infer.stream import stream_windows
from pipeline.infer.windows import WindowGrid
from tests.helpers import Pointwise, torch_threads

SHAPE = (64, 64, 32)
ROI = (16, 16, 8)
SPACING = (1.0, 1.0, 2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def config(*extra):
    return load_config(None, ["preprocess.spacing=[1.0, 1.0, 2.0]", "preprocess.crop_foreground=false",
                              "inference.roi_size=[16, 16, 8]", "inference.overlap=0.5",
                              "inference.min_component_mm3=0", "inference.cascade.enabled=true",
                              "inference.cascade.margin_mm=6", *extra])


def scan() -> torch.Tensor:
    """Body (0.5) filling most of the volume, two bright blobs (1.0): the 'lesions' the network sees."""
    x = torch.zeros(1, *SHAPE)
    x[0, 4:60, 4:60, 2:30] = 0.5
    x[0, 10:16, 12:18, 5:8] = 1.0
    x[0, 44:52, 40:47, 20:24] = 1.0
    return x


NET = Pointwise([0.0, 20.0], [0.0, -15.0])  # P(lesion) = sigmoid(20 x - 15): 0.99 at 1.0, 0.007 at 0.5


def test_coarse_shape_halves_the_grid():
    assert coarse_shape(SHAPE, SPACING, (2.0, 2.0, 4.0)) == (32, 32, 16)
    assert coarse_shape((5, 5, 5), (1, 1, 1), (10, 10, 10)) == (1, 1, 1)


def test_the_fine_pass_covers_every_coarse_candidate_plus_its_margin():
    cfg = config().inference
    region, coarse, candidates = candidate_region(scan(), NET, cfg.cascade, SPACING, ROI, 0.5, "gaussian", 2,
                                                  torch.device("cpu"))
    assert coarse.windows == len(WindowGrid((32, 32, 16), ROI, 0.5)) and coarse.forwards > 0
    labelled, count = ndimage.label(candidates.numpy())
    assert count == 2  # both blobs survive the coarse pass

    index = torch.arange(np.prod(SHAPE), dtype=torch.float64).view(1, *SHAPE).float()
    covered = np.zeros(SHAPE, bool)

    def forward(tiles):
        for flat in tiles[:, 1, 0, 0, 0].double().round().long().tolist():
            start = np.unravel_index(flat, SHAPE)
            covered[tuple(slice(int(s), int(s) + r) for s, r in zip(start, ROI))] = True
        return torch.zeros(tiles.shape[0], 2, *tiles.shape[2:])

    stats = stream_windows(torch.cat([scan(), index]), forward, ROI, 0.5, "gaussian", 2, lambda *a: None,
                           keep=region.touches, channels=2)
    # every candidate and every voxel within 6 mm of one (per axis: 6 voxels in x, y; 3 slices in z)
    margin = [math.ceil(6.0 / s) for s in SPACING]
    needed = ndimage.maximum_filter(candidates.numpy().astype(np.uint8), size=[2 * m + 1 for m in margin]) > 0
    assert needed.sum() > candidates.sum() > 0
    assert not (needed & ~covered).any()
    assert stats.skipped > 0 and stats.windows + stats.skipped == len(WindowGrid(SHAPE, ROI, 0.5))


def test_cascade_segmenter_matches_the_full_pass_on_the_candidates():
    x = scan()
    ref = Segmenter(NET, config("inference.cascade.enabled=false"), "cpu", backend="torch")._predict(x, None, False)
    seg = Segmenter(NET, config(), "cpu", backend="torch")
    got = seg._predict(x, None, False)
    region, _, candidates = candidate_region(x, NET, seg.config.inference.cascade, SPACING, ROI, 0.5, "gaussian",
                                             2, torch.device("cpu"))
    inside = torch.from_numpy(region.fine())
    torch.testing.assert_close(got.probs[0][inside], ref.probs[0][inside], atol=0, rtol=0)
    assert got.coarse_windows == len(WindowGrid((32, 32, 16), ROI, 0.5))
    assert got.skipped > 0 and got.windows == got.coarse_windows + len(WindowGrid(SHAPE, ROI, 0.5)) - got.skipped
    # the lesion masks agree: everything the full pass labels lies in the region
    assert bool(((ref.probs[0] > 0.5) & ~inside).sum() == 0)
    assert torch.equal(got.probs[0] > 0.5, ref.probs[0] > 0.5)


def test_cascade_config_is_checked():
    with pytest.raises(ConfigError, match="inference.cascade.threshold"):
        config("inference.cascade.threshold=1.5")
    with pytest.raises(ConfigError, match="inference.cascade.spacing"):
        config("inference.cascade.spacing=[1, 2]")
    assert load_config(None, []).inference.cascade.enabled is False
