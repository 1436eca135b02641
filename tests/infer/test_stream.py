"""Streaming sliding windows: the same windows and weights as MONAI's ``sliding_window_inference``, the
same blended logits, each slice handed over once and in order, with a band buffer instead of a volume."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from pipeline.infer.stream import stream_windows
from pipeline.infer.windows import WindowGrid, axis_starts


def conv_net(out_channels=3, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv3d(4, out_channels, 3, padding=1)).eval()


def collect(image, net, roi, overlap, blend, batch):
    out, slabs = None, []

    def on_slab(z0, z1, logits):
        nonlocal out
        if out is None:
            out = torch.full((logits.shape[0],) + tuple(image.shape[1:]), float("nan"))
        assert torch.isnan(out[..., z0:z1]).all(), "a slice was handed over twice"
        out[..., z0:z1] = logits
        slabs.append((z0, z1))

    with torch.no_grad():
        stats = stream_windows(image, net, roi, overlap, blend, batch, on_slab)
    return out, slabs, stats


@pytest.mark.parametrize("shape, roi, overlap, batch, blend", [
    ((40, 37, 29), (16, 16, 8), 0.25, 2, "gaussian"),
    ((33, 33, 40), (16, 8, 4), 0.5, 7, "gaussian"),
    ((10, 37, 5), (16, 16, 8), 0.5, 3, "constant"),   # smaller than the window: zero padding
    ((16, 16, 8), (16, 16, 8), 0.5, 2, "gaussian"),   # exactly one window
    ((24, 20, 30), (8, 8, 8), 0.0, 4, "constant"),    # no overlap
])
def test_streamed_logits_equal_monai(shape, roi, overlap, batch, blend):
    image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    net = conv_net()
    with torch.no_grad():
        expected = sliding_window_inference(image[None], roi, batch, net, overlap=overlap, mode=blend)[0]
    got, slabs, stats = collect(image, net, roi, overlap, blend, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert slabs[0][0] == 0 and slabs[-1][1] == shape[-1]
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:])), "slabs in order, without gaps"
    assert stats.windows == len(WindowGrid(shape, roi, overlap))
    assert stats.forwards == -(-stats.windows // batch)


def test_band_memory_does_not_grow_with_depth():
    """A long volume is handed over in many slabs, each at most one window step + depth deep."""
    image = torch.randn(1, 16, 16, 200)
    _, slabs, _ = collect(image, conv_net(), (16, 16, 8), 0.5, "gaussian", 2)
    assert len(slabs) > 20
    assert max(z1 - z0 for z0, z1 in slabs) <= 8


def test_window_starts_are_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, roi, overlap in [((410, 300, 160), (128, 128, 32), 0.5), ((50, 17, 9), (16, 16, 8), 0.25),
                               ((100, 90, 33), (32, 32, 16), 0.0)]:
        grid = WindowGrid(size, roi, overlap)
        padded = grid.padded_shape
        monai = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, [overlap] * 3))
        assert sorted(tuple(s.start for s in w) for w in monai) == sorted(grid.starts())
    assert axis_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert axis_starts(3, 4, 0.5) == [0]
