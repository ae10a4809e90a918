"""GAN losses against hand-computed values, the WGAN-GP penalty of a linear D, ACGAN loss and noisy labels."""
import math

import pytest
import torch
import torch.nn as nn

from src.config import make_config
from src.losses import (GAN_LOSSES, LECAM_DECAY, LECAM_START_STEPS, LECAM_WEIGHT, LeCamAnchors, aux_class_loss,
                        d_bce_loss, d_hinge_loss, d_ls_loss, d_rals_loss, d_wgan_loss, g_bce_loss, g_hinge_loss,
                        g_ls_loss, g_rals_loss, g_wgan_loss, gradient_penalty, lecam_penalty, noisy_labels)
from src.models import build_models


# mean(real) = -0.75, mean(fake) = 0.5
REAL = torch.tensor([0.5, -2.0])
FAKE = torch.tensor([1.5, -0.5])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_hinge():
    # D: mean(relu(1 - [0.5, -2])) = mean(0.5, 3) = 1.75; mean(relu(1 + [1.5, -0.5])) = mean(2.5, 0.5) = 1.5
    assert d_hinge_loss(REAL, FAKE).item() == pytest.approx(3.25)
    assert g_hinge_loss(REAL, FAKE).item() == pytest.approx(-0.5)


def test_bce_with_hard_and_soft_targets():
    expected_d = (-(log_sigmoid(0.5) + log_sigmoid(-2.0)) / 2
                  - (log_sigmoid(-1.5) + log_sigmoid(0.5)) / 2)  # log(1 - sigmoid(x)) = log_sigmoid(-x)
    assert d_bce_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    real_t, fake_t = torch.tensor([0.9, 1.0]), torch.tensor([0.1, 0.0])
    # BCE(x, t) = -(t log s(x) + (1 - t) log s(-x))
    expected_soft = (-(0.9 * log_sigmoid(0.5) + 0.1 * log_sigmoid(-0.5) + log_sigmoid(-2.0)) / 2
                     - (0.1 * log_sigmoid(1.5) + 0.9 * log_sigmoid(-1.5) + log_sigmoid(0.5)) / 2)
    assert d_bce_loss(REAL, FAKE, real_t, fake_t).item() == pytest.approx(expected_soft, rel=1e-6)
    assert d_bce_loss(REAL, FAKE, 0.9, 0.1).item() == pytest.approx(
        (-(0.9 * log_sigmoid(0.5) + 0.1 * log_sigmoid(-0.5) + 0.9 * log_sigmoid(-2.0) + 0.1 * log_sigmoid(2.0)) / 2
         - (0.1 * log_sigmoid(1.5) + 0.9 * log_sigmoid(-1.5) + 0.1 * log_sigmoid(-0.5) + 0.9 * log_sigmoid(0.5)) / 2),
        rel=1e-6)
    assert g_bce_loss(REAL, FAKE).item() == pytest.approx(-(log_sigmoid(1.5) + log_sigmoid(-0.5)) / 2, rel=1e-6)


def test_least_squares():
    # D: 0.5 * (mean((-0.5)^2, (-3)^2) + mean(1.5^2, (-0.5)^2)) = 0.5 * (4.625 + 1.25)
    assert d_ls_loss(REAL, FAKE).item() == pytest.approx(2.9375)
    # soft targets: 0.5 * (mean((0.5-0.9)^2, (-2-1)^2) + mean((1.5-0.1)^2, (-0.5-0)^2)) = 0.5 * (4.58 + 1.105)
    assert d_ls_loss(REAL, FAKE, torch.tensor([0.9, 1.0]), torch.tensor([0.1, 0.0])).item() == pytest.approx(2.8425)
    # G: 0.5 * mean((0.5)^2, (-1.5)^2) = 0.625
    assert g_ls_loss(REAL, FAKE).item() == pytest.approx(0.625)


def test_relativistic_average_least_squares():
    # D: 0.5 * (mean(([0.5, -2] - 0.5 - 1)^2) + mean(([1.5, -0.5] + 0.75 + 1)^2)) = 0.5 * (6.625 + 6.0625)
    assert d_rals_loss(REAL, FAKE).item() == pytest.approx(6.34375)
    # G: 0.5 * (mean(([1.5, -0.5] + 0.75 - 1)^2) + mean(([0.5, -2] - 0.5 + 1)^2)) = 0.5 * (1.0625 + 1.625)
    assert g_rals_loss(REAL, FAKE).item() == pytest.approx(1.34375)


def test_wgan():
    assert d_wgan_loss(REAL, FAKE).item() == pytest.approx(0.5 - (-0.75))
    assert g_wgan_loss(REAL, FAKE).item() == pytest.approx(-0.5)


def test_registry_covers_every_config_loss_with_one_signature():
    for name in GAN_LOSSES:
        make_config({"loss": name})  # every registry name is a valid --loss
    with pytest.raises(ValueError, match="--loss"):
        make_config({"loss": "not-a-loss"})
    assert set(GAN_LOSSES) == {"hinge", "bce", "ls", "rals", "wgan-gp"}
    for loss in GAN_LOSSES.values():
        d_value = loss.d_loss(REAL.bfloat16(), FAKE.bfloat16(), torch.full((2,), 0.95), 0.05)
        g_value = loss.g_loss(REAL.bfloat16(), FAKE.bfloat16())
        assert d_value.dtype == g_value.dtype == torch.float32  # reduced in fp32 whatever the logits' dtype
        assert d_value.shape == g_value.shape == ()


def test_g_losses_push_low_fake_logits_up():
    for name, loss in GAN_LOSSES.items():
        fake = torch.tensor([-0.5, -1.0], requires_grad=True)  # below every G target (LS's is 1)
        loss.g_loss(REAL, fake).backward()
        assert (fake.grad < 0).all(), name  # a lower loss needs higher D(G(z))


class LinearD(nn.Module):
    """D(x) = <w, x> + b, so grad_x D = w everywhere."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape) * 0.1)
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, img, labels):
        return (img * self.w).flatten(1).sum(1) + self.b, None


def test_gradient_penalty_of_a_linear_d():
    torch.manual_seed(0)
    D = LinearD((3, 4, 4))
    real_img, fake_img = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4).requires_grad_(True)
    penalty = gradient_penalty(D, real_img, fake_img, None, weight=10.0)
    norm = D.w.detach().norm().item()
    assert penalty.item() == pytest.approx(10.0 * (norm - 1.0) ** 2, rel=1e-5)
    # create_graph: the penalty trains D; d/dw 10 (|w| - 1)^2 = 20 (|w| - 1) w / |w|
    penalty.backward()
    assert torch.allclose(D.w.grad, 20.0 * (norm - 1.0) * D.w.detach() / norm, rtol=1e-4, atol=1e-6)
    assert fake_img.grad is None  # G gets nothing from the penalty


def test_gradient_penalty_runs_through_a_real_d():
    cfg = make_config({"recipe": "sagan", "g_ch": 8, "d_ch": 8, "loss": "wgan-gp"})
    _, D = build_models(cfg, 3)
    real_img, fake_img = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    penalty = gradient_penalty(D, real_img, fake_img, torch.tensor([0, 2]), weight=cfg.gp_weight)
    penalty.backward()  # double backward through SN, attention and projection
    assert torch.isfinite(penalty) and penalty.item() >= 0
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


def test_aux_class_loss():
    assert aux_class_loss(None, torch.tensor([1, 2])).item() == 0.0
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / 3)) / 2
    assert aux_class_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)
    assert aux_class_loss(logits.bfloat16(), torch.tensor([0, 1])).dtype == torch.float32


def test_noisy_labels():
    targets = noisy_labels(1000, 0.9, 1.0, "cpu")
    assert targets.shape == (1000,) and targets.min() >= 0.9 and targets.max() <= 1.0
    assert targets.std() > 0.02  # really spread over the range, not a constant
    assert torch.equal(noisy_labels(8, 0.0, 0.1, "cpu", torch.Generator().manual_seed(3)),
                       noisy_labels(8, 0.0, 0.1, "cpu", torch.Generator().manual_seed(3)))
    assert torch.equal(noisy_labels(4, 1.0, 1.0, "cpu"), torch.ones(4))
    with pytest.raises(ValueError, match="empty"):
        noisy_labels(4, 1.0, 0.9, "cpu")


def test_each_loss_carries_what_its_d_step_needs():
    """Noisy targets for bce/ls only (drawn in the configured ranges), a penalty for wgan-gp only."""
    assert {n for n, loss in GAN_LOSSES.items() if loss.noisy_targets} == {"bce", "ls"}
    assert {n for n, loss in GAN_LOSSES.items() if loss.penalty is not None} == {"wgan-gp"}
    assert GAN_LOSSES["hinge"].d_targets(4, 0.9, 0.1, "cpu") == (1.0, 0.0)
    real_target, fake_target = GAN_LOSSES["bce"].d_targets(1000, 0.9, 0.1, "cpu")
    assert real_target.shape == fake_target.shape == (1000,)
    assert 0.9 <= real_target.min() and real_target.max() <= 1.0 and real_target.std() > 0.02
    assert 0.0 <= fake_target.min() and fake_target.max() <= 0.1


def test_lecam_penalty_by_hand():
    real = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    fake = torch.tensor([-3.0, 1.0], requires_grad=True)
    # real side: relu([2, -1, 0.5] + 0.5) = [2.5, 0, 1] -> (6.25 + 0 + 1) / 3; fake side: relu(1 - [-3, 1]) = [4, 0] -> 8
    penalty = lecam_penalty(real, fake, torch.tensor(1.0), torch.tensor(-0.5))
    assert penalty.item() == pytest.approx(7.25 / 3 + 8.0)
    penalty.backward()
    # d/dx relu(x - a)^2 / n = 2 relu(x - a) / n: only the overshooting side is pushed back
    assert real.grad.tolist() == pytest.approx([2 * 2.5 / 3, 0.0, 2 * 1.0 / 3])
    assert fake.grad.tolist() == pytest.approx([-2 * 4.0 / 2, 0.0])


def test_lecam_anchors_follow_the_batch_while_warming_up_then_average():
    assert (LECAM_DECAY, LECAM_START_STEPS, LECAM_WEIGHT) == (0.9, 1000, 0.3)  # the authors' BigGAN-CIFAR settings
    anchors = LeCamAnchors("cpu", decay=0.9, start_steps=2)
    # warm-up: the anchors are the batch means, no penalty
    assert anchors.penalty(torch.tensor([1.0, 3.0]), torch.tensor([-1.0])).item() == 0.0
    assert anchors.penalty(torch.tensor([0.5, 1.5]), torch.tensor([-2.0, 0.0])).item() == 0.0
    assert anchors.anchors.tolist() == pytest.approx([1.0, -1.0])
    # then a moving average, updated before the penalty: real 0.9 * 1 + 0.1 * 3 = 1.2, fake 0.9 * -1 + 0.1 * 1 = -0.8
    real, fake = torch.tensor([3.0]), torch.tensor([1.0])
    penalty = anchors.penalty(real, fake)
    assert anchors.anchors.tolist() == pytest.approx([1.2, -0.8])
    # relu(3 + 0.8)^2 + relu(1.2 - 1)^2
    assert penalty.item() == pytest.approx(3.8 ** 2 + 0.2 ** 2)


def test_lecam_anchors_survive_a_checkpoint():
    anchors = LeCamAnchors("cpu", decay=0.9, start_steps=0)
    anchors.penalty(torch.tensor([2.0]), torch.tensor([-2.0]))
    state = anchors.state_dict()
    assert state == pytest.approx({"real": 0.2, "fake": -0.2, "steps": 1})
    restored = LeCamAnchors("cpu", decay=0.9, start_steps=0)
    restored.load_state_dict(state)
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.5])
    assert restored.penalty(real, fake).item() == pytest.approx(anchors.penalty(real, fake).item())
