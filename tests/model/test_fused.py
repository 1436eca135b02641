"""The CPU-fused copy of our U-Net computes the same function, never takes PyTorch's slow batch-1 conv
path when given batches of two, and leaves the original network untouched."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import UNet
from pipeline.model.fused import (
    CHANNELS_LAST,
    fuse_for_inference,
    instance_norm_act,
    sum_of_squares,
)


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("padding, size", [("same", (32, 32, 16)), ("valid", (44, 44, 44))])
def test_fused_unet_equals_original(norm, padding, size):
    torch.manual_seed(0)
    net = UNet(3, 1, 3, features=4, depth=3, norm=norm, padding=padding, upsample="transpose").eval()
    if norm == "batch":
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fuse_for_inference(net, torch.device("cpu"))
    assert fused is not net
    x = torch.randn(2, 1, *size) * 2 + 0.5
    with torch.inference_mode():
        expected, got = net(x), fused(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_instance_norm_act_channels_last_matches_torch():
    x = torch.randn(2, 8, 12, 10, 6) * 3 + 5  # a large mean: the cancellation guard is exercised
    w, b = torch.randn(8), torch.randn(8)
    expected = torch.nn.functional.leaky_relu(torch.nn.functional.instance_norm(x, weight=w, bias=b), 0.01)
    got = instance_norm_act(x.contiguous(memory_format=CHANNELS_LAST), w, b, 1e-5, 0.01)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sums_of_squares_in_chunks_are_exact_to_float32_rounding():
    """One matrix product over a whole 64x64x32 window (8 channels) rounded the sums of squares at ~3e-5
    relative: the fused reference then moved the demo model's probabilities by 3e-3 from float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, 64, 32) * 1.5 + torch.randn(1, 8, 1, 1, 1)
    flat = x.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 4, 1).reshape(2, -1, 8)
    exact = (x.double() ** 2).sum((2, 3, 4))
    got = sum_of_squares(flat, 64)
    assert got.shape == (2, 8) and got.dtype == torch.float32
    assert float(((got.double() - exact).abs() / exact).max()) < 2e-6
    torch.testing.assert_close(sum_of_squares(flat[:, :96], 1), (flat[:, :96].double() ** 2).sum(1).float(),
                               rtol=2e-6, atol=0)  # one slab
    w, b = torch.rand(8) + 0.5, torch.rand(8) - 0.5
    expected = torch.nn.functional.leaky_relu(
        torch.nn.functional.instance_norm(x.double(), weight=w.double(), bias=b.double()), 0.01)
    normed = instance_norm_act(x.contiguous(memory_format=CHANNELS_LAST), w, b, 1e-5, 0.01)
    assert float((normed.double() - expected).abs().max() / expected.abs().max()) < 2e-6


def test_other_networks_and_devices_are_left_alone():
    net2d = UNet(2, 1, 2, features=4, depth=3)
    assert fuse_for_inference(net2d, torch.device("cpu")) is net2d
    plain = torch.nn.Conv3d(1, 2, 1)
    assert fuse_for_inference(plain, torch.device("cpu")) is plain


def test_batches_of_two_never_take_the_slow_conv_path():
    """PyTorch sends batch-1 3D convolutions with few channels to ``slow_conv3d_forward`` (single-threaded)."""
    net = UNet(3, 1, 2, features=8, depth=4).eval()
    fused = fuse_for_inference(net, torch.device("cpu"))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fused(torch.randn(2, 1, 32, 32, 16))
    names = {e.key for e in prof.key_averages()}
    assert not any("slow_conv3d" in n for n in names), sorted(n for n in names if "conv" in n)
    assert "aten::mkldnn_convolution" in names
