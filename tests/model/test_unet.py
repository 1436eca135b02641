"""Shapes, sizes, errors and a tiny overfit check of our U-Net (2D and 3D, "same" and "valid")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.model import ARCHITECTURES, UNet, build_model

torch.set_num_threads(2)

# Spatial sizes per (spatial_dims, padding) for depth 3. Non-square, so a swapped axis shows up.
INPUT = {
    (2, "same"): (16, 24),
    (2, "valid"): (44, 60),
    (3, "same"): (8, 8, 16),
    (3, "valid"): (44, 44, 48),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = pred.bool(), target.bool()
    return (2 * (pred & target).sum() / (pred.sum() + target.sum())).item()


@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shapes(spatial_dims, norm, upsample, padding, deep_supervision):
    torch.manual_seed(0)
    size = INPUT[spatial_dims, padding]
    features = 2 if size == INPUT[3, "valid"] else 4  # 44×44×48 voxels: keep it cheap
    model = UNet(
        spatial_dims, 2, 3, features, depth=3, norm=norm, upsample=upsample, padding=padding,
        deep_supervision=deep_supervision,
    )
    x = torch.randn(2, 2, *size)
    expected = size if padding == "same" else model.output_size(size)
    assert model.margin(size) == tuple((i - o) // 2 for i, o in zip(size, expected))

    model.train()
    out = model(x)
    if deep_supervision:
        assert isinstance(out, list) and len(out) == model.depth - 1
        for k, logits in enumerate(out):
            assert logits.shape[:2] == (2, 3)
            assert tuple(logits.shape[2:]) == model.output_size(size, level=k)
            if padding == "same":
                assert tuple(logits.shape[2:]) == tuple(s // 2**k for s in size)
        out = out[0]
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == (2, 3, *expected)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == (2, 3, *expected)


def test_valid_sizes_by_hand():
    # depth 3, one DoubleConv removes 4, a pooling halves, an upsampling doubles:
    #   44: 44 -4→ 40 /2→ 20 -4→ 16 /2→ 8 -4→ 4 (bottom) ×2→ 8 -4→ 4 ×2→ 8 -4→ 4
    #   60: 60 -4→ 56 /2→ 28 -4→ 24 /2→ 12 -4→ 8 (bottom) ×2→ 16 -4→ 12 ×2→ 24 -4→ 20
    model = UNet(2, depth=3, padding="valid", features=4)
    assert model.output_size((44, 60)) == (4, 20)
    assert model.output_size((44, 60), level=1) == (4, 12)
    assert model.margin((44, 60)) == (20, 20)
    assert model.valid_input_size((41, 45)) == (44, 48)
    assert model.valid_input_size(1) == (44, 44)  # the smallest valid size of this network
    assert model.output_size(model.valid_input_size((50, 61))) == model.output_size((52, 64))


def test_original_paper_sizes():
    # Ronneberger et al. 2015, Fig. 1: 2D, 5 levels, unpadded convolutions, 572×572 in, 388×388 out.
    paper = UNet(2, 1, 2, features=64, depth=5, norm="none", padding="valid")
    assert paper.output_size((572, 572)) == (388, 388)
    assert paper.margin((572, 572)) == (92, 92)
    assert paper.valid_input_size(570) == (572, 572)

    # The same architecture, narrow, at the smallest sizes it accepts: 188 → 4 and 204 → 20.
    small = UNet(2, 1, 2, features=2, depth=5, norm="none", padding="valid").eval()
    with torch.no_grad():
        out = small(torch.randn(1, 1, 188, 204))
    assert tuple(out.shape) == (1, 2, 4, 20) == (1, 2, *small.output_size((188, 204)))


@pytest.mark.parametrize(
    "padding, size, expected",
    [
        ("same", (16, 17, 30), ["(16, 17, 30)", "multiple of 2**(depth-1) = 8", "16 or 24", "24 or 32"]),
        ("valid", (45, 60, 60), ["(45, 60, 60)", "axis 0", "odd size 41", "44 or 48", "valid_input_size"]),
        ("valid", (20, 44, 44), ["axis 0", "shrinks", "nearest valid sizes: 44"]),
    ],
)
def test_bad_input_size_says_why_and_how_to_fix(padding, size, expected):
    model = UNet(3, features=2, depth=4 if padding == "same" else 3, padding=padding)
    for call in (lambda: model.output_size(size), lambda: model(torch.zeros(1, 1, *size))):
        with pytest.raises(ConfigError) as info:
            call()
        for text in expected:
            assert text in str(info.value)


def test_bad_input_shape():
    model = UNet(2, in_channels=2, features=2, depth=2)
    with pytest.raises(ConfigError, match=r"\(batch, 2, H, W\)"):
        model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="2D spatial size"):
        model.output_size((8, 8, 8))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"spatial_dims": 4}, "model.spatial_dims: expected 2 or 3, found 4"),
        ({"depth": 1}, "model.depth: expected an integer >= 2, found 1"),
        ({"features": 0}, "model.features"),
        ({"norm": "group"}, "model.norm: expected one of 'instance', 'batch', 'none', found 'group'"),
        ({"upsample": "nearest"}, "model.upsample"),
        ({"padding": "reflect"}, "model.padding"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_bad_architecture_parameters(kwargs, text):
    with pytest.raises(ConfigError, match="^" + text.replace("(", r"\(").replace(")", r"\)")):
        UNet(**kwargs)


def test_parameter_count_scales_with_features():
    # Almost every weight joins two feature-sized layers, so doubling features about quadruples the
    # count; only the first convolution (fixed in_channels) and the head (fixed out_channels) double.
    for spatial_dims in (2, 3):
        small = n_params(UNet(spatial_dims, features=4, depth=3))
        large = n_params(UNet(spatial_dims, features=8, depth=3))
        assert 3.5 * small < large < 4 * small
    plain = n_params(UNet(2, out_channels=3, features=4, depth=4))
    supervised = n_params(UNet(2, out_channels=3, features=4, depth=4, deep_supervision=True))
    assert supervised - plain == (8 * 3 + 3) + (16 * 3 + 3)  # the 1×1 heads at levels 2 and 3


def test_build_model_from_config():
    cfg = SimpleNamespace(
        name="unet", spatial_dims=2, features=4, depth=3, norm="batch", upsample="interp", padding="valid",
        deep_supervision=True, dropout=0.1,
    )
    model = build_model(cfg, in_channels=2, out_channels=3)
    assert isinstance(model, UNet) and ARCHITECTURES["unet"] is UNet
    assert (model.in_channels, model.out_channels, model.channels) == (2, 3, (4, 8, 16))
    assert model.padding == "valid" and model.deep_supervision
    # No name means "unet"; absent attributes take the constructor defaults.
    assert build_model(SimpleNamespace(spatial_dims=2), 1, 2).channels == (16, 32, 64, 128)
    with pytest.raises(ConfigError, match="Wrong architecture `resnet`. Available options are: unet"):
        build_model(SimpleNamespace(name="resnet"), 1, 2)


def test_weight_init():
    model = UNet(2, features=4, depth=2, norm="none")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    first = model.encoders[0][0][0].weight  # fan_in 9: std = sqrt(2 / (1 + 0.01²) / 9)
    assert first.std().item() == pytest.approx((2 / 1.0001 / 9) ** 0.5, rel=0.35)


def _disk(size, radius) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in size], indexing="ij")
    return (sum(g**2 for g in grids) <= radius**2).long()


def _ring_image(label: torch.Tensor, radius: int) -> torch.Tensor:
    """Only the outline of the disk, plus noise: filling the inside needs spatial context."""
    size = label.shape[1:]
    ring = (label - _disk(size, radius - 2)[None]).float()
    return (ring + 0.3 * torch.randn(size))[None]


def _overfit(model: UNet, image: torch.Tensor, label: torch.Tensor, steps: int, lr: float = 1e-2) -> float:
    """Train on one sample with cross-entropy (on every deep-supervision output); return eval Dice."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    margin = model.margin(image.shape[2:])
    crop = tuple(slice(m, s - m) for m, s in zip(margin, label.shape[1:]))
    target = label[(slice(None),) + crop]
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        outputs = model(image)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = 0.0
        for k, logits in enumerate(outputs):
            scaled = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")
            loss = loss + 0.5**k * F.cross_entropy(logits, scaled[:, 0].long())
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return dice(model(image).argmax(1), target)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_overfits_one_2d_sample(padding):
    torch.manual_seed(0)
    size = (32, 32) if padding == "same" else (44, 44)  # valid, depth 2: 44 → 28 (margin 8)
    label = _disk(size, radius=7)[None]
    image = _ring_image(label, radius=7)
    model = UNet(2, 1, 2, features=8, depth=3 if padding == "same" else 2, padding=padding)
    assert _overfit(model, image, label, steps=100) > 0.9


def test_overfits_one_3d_sample_with_deep_supervision():
    torch.manual_seed(0)
    label = _disk((16, 16, 16), radius=5)[None]
    image = _ring_image(label, radius=5)
    model = UNet(3, 1, 2, features=4, depth=3, deep_supervision=True)
    assert _overfit(model, image, label, steps=100) > 0.9
