"""Dice + focal loss: ordering on known logits and deep supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.training.loss import build_loss
from tests.helpers import torch_threads

SHAPE = (2, 1, 16, 16, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def lesion_label(dtype=torch.long) -> torch.Tensor:
    """Two patches, a small lesion in the first only (as in a batch of mostly negative patches)."""
    label = torch.zeros(SHAPE, dtype=dtype)
    label[0, 0, 5:8, 6:9, 3:5] = 1
    return label


def logits_for(label: torch.Tensor, margin: float) -> torch.Tensor:
    """Two-class logits that pick ``label`` with the given margin (negative: pick the opposite)."""
    fg = (label.float() * 2 - 1) * margin / 2
    return torch.cat([-fg, fg], dim=1)


def loss_config(*overrides):
    return load_config(None, list(overrides)).loss


@pytest.mark.parametrize("overrides", [[], ["loss.include_background=true"], ["loss.focal_weight=0"],
                                       ["loss.dice_weight=0"], ["loss.gamma=0"],
                                       ["loss.focal_softmax=true"], ["loss.focal_softmax=true", "loss.gamma=0"]])
def test_loss_orders_perfect_background_and_inverted(overrides):
    loss = build_loss(loss_config(*overrides), deep_supervision=False)
    label = lesion_label()
    perfect = loss(logits_for(label, 20.0), label)
    background = loss(logits_for(torch.zeros_like(label), 20.0), label)
    uncertain = loss(torch.zeros(2, 2, *SHAPE[2:]), label)
    inverted = loss(logits_for(label, -20.0), label)

    for value in (perfect, background, uncertain, inverted):
        assert value.ndim == 0 and torch.isfinite(value)
    assert perfect < 1e-3
    assert perfect < uncertain < inverted
    assert perfect < background < inverted


def test_dice_term_of_all_background_is_one():
    """With background excluded, predicting no lesion gives a foreground Dice of 0, i.e. a Dice loss of 1."""
    loss = build_loss(loss_config("loss.focal_weight=0"), deep_supervision=False)
    label = lesion_label()
    value = loss(logits_for(torch.zeros_like(label), 30.0), label)
    assert value.item() == pytest.approx(1.0, abs=1e-4)


def test_weights_scale_the_terms():
    label = lesion_label()
    logits = torch.randn(2, 2, *SHAPE[2:], generator=torch.Generator().manual_seed(0))
    dice_only = build_loss(loss_config("loss.focal_weight=0"), False)(logits, label)
    focal_only = build_loss(loss_config("loss.dice_weight=0"), False)(logits, label)
    both = build_loss(loss_config("loss.dice_weight=2", "loss.focal_weight=3"), False)(logits, label)
    torch.testing.assert_close(both, 2 * dice_only + 3 * focal_only, rtol=1e-5, atol=1e-6)


def test_loss_is_finite_for_an_empty_batch():
    label = torch.zeros(SHAPE, dtype=torch.long)
    loss = build_loss(loss_config(), deep_supervision=False)
    assert torch.isfinite(loss(logits_for(label, 10.0), label))
    assert torch.isfinite(loss(torch.zeros(2, 2, *SHAPE[2:]), label))


def test_loss_has_gradients():
    label = lesion_label()
    logits = torch.zeros(2, 2, *SHAPE[2:], requires_grad=True)
    build_loss(loss_config(), deep_supervision=False)(logits, label).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def deep_outputs(label):
    full = torch.randn(2, 2, *SHAPE[2:], generator=torch.Generator().manual_seed(1))
    half = torch.randn(2, 2, 8, 8, 4, generator=torch.Generator().manual_seed(2))
    quarter = torch.randn(2, 2, 4, 4, 2, generator=torch.Generator().manual_seed(3))
    return [full, half, quarter]


def test_deep_supervision_single_output_equals_base_loss():
    label = lesion_label(torch.float32)
    logits = torch.randn(2, 2, *SHAPE[2:], generator=torch.Generator().manual_seed(0))
    base = build_loss(loss_config(), deep_supervision=False)
    deep = build_loss(loss_config(), deep_supervision=True)
    torch.testing.assert_close(deep([logits], label), base(logits, label))
    torch.testing.assert_close(deep(logits, label), base(logits, label))


def test_deep_supervision_weights_halve_per_level():
    label = lesion_label(torch.float32)
    outputs = deep_outputs(label)
    base = build_loss(loss_config(), deep_supervision=False)
    deep = build_loss(loss_config(), deep_supervision=True)
    expected = sum(
        weight * base(out, F.interpolate(label, size=out.shape[2:], mode="nearest-exact"))
        for weight, out in zip([1.0, 0.5, 0.25], outputs)
    )
    value = deep(outputs, label)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_deep_supervision_configured_weights():
    label = lesion_label(torch.float32)
    outputs = deep_outputs(label)[:2]
    base = build_loss(loss_config(), deep_supervision=False)
    deep = build_loss(loss_config("loss.deep_supervision_weights=[1.0, 0.1]"), deep_supervision=True)
    half_label = F.interpolate(label, size=(8, 8, 4), mode="nearest-exact")
    expected = base(outputs[0], label) + 0.1 * base(outputs[1], half_label)
    torch.testing.assert_close(deep(outputs, label), expected, rtol=1e-5, atol=1e-6)


def test_deep_supervision_accepts_integer_labels_as_the_trainer_gives_them():
    label = lesion_label(torch.long)
    deep = build_loss(loss_config(), deep_supervision=True)
    value = deep(deep_outputs(label), label)
    torch.testing.assert_close(value, deep(deep_outputs(label), label.float()))


def test_softmax_focal_with_gamma_0_is_the_cross_entropy_over_every_class():
    """loss.focal_softmax, gamma 0: the focal term is torch's softmax cross-entropy (background included)."""
    torch.manual_seed(0)
    logits, label = torch.randn(2, 2, *SHAPE[2:]), lesion_label()
    loss = build_loss(loss_config("loss.focal_softmax=true", "loss.gamma=0", "loss.dice_weight=0"),
                      deep_supervision=False)
    expected = F.cross_entropy(logits, label[:, 0])
    assert loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-5)


def test_softmax_focal_depends_on_the_background_logit():
    """The sigmoid focal (default) scores the lesion logit alone; the softmax one the difference the
    inference's softmax decides by: raising the background logit by 3 everywhere changes it, shifting both
    logits together does not."""
    torch.manual_seed(1)
    logits, label = torch.randn(2, 2, *SHAPE[2:]), lesion_label()
    shift = torch.zeros_like(logits)
    shift[:, 0] = 3.0
    sigmoid = build_loss(loss_config("loss.dice_weight=0"), deep_supervision=False)
    softmax = build_loss(loss_config("loss.focal_softmax=true", "loss.dice_weight=0"), deep_supervision=False)
    assert sigmoid(logits + shift, label).item() == pytest.approx(sigmoid(logits, label).item())
    assert abs(softmax(logits + shift, label).item() - softmax(logits, label).item()) > 0.1  # mostly background: lower
    assert softmax(logits + 5.0, label).item() == pytest.approx(softmax(logits, label).item(), rel=1e-5)
    # gamma 2 on a confident correct voxel weighs (1 - p)^2 of the cross-entropy: far below it
    gamma2 = build_loss(loss_config("loss.focal_softmax=true", "loss.dice_weight=0"), deep_supervision=False)
    ce = build_loss(loss_config("loss.focal_softmax=true", "loss.gamma=0", "loss.dice_weight=0"),
                    deep_supervision=False)
    good = logits_for(label, 4.0)
    assert gamma2(good, label).item() < 0.05 * ce(good, label).item()
