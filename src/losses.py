"""GAN losses on D's logits, one uniform signature each, plus the WGAN-GP penalty and the ACGAN class loss.

Every D loss is d_loss(real_logit, fake_logit, real_target=1.0, fake_target=0.0) and every G loss is
g_loss(real_logit, fake_logit): the targets matter to bce and ls only, real logits to RaLS's G loss only.
Logits are cast to fp32 first so autocast never reduces a loss in half precision. GAN_LOSSES names each objective
with what its D step needs besides the logits (noisy targets, a penalty), so the training round needs no loss names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossTarget = torch.Tensor | float


def _loss_target(target: LossTarget, like: torch.Tensor) -> torch.Tensor:
    # a float target becomes a tensor shaped like the logits; a tensor target is used as given, in fp32
    if isinstance(target, torch.Tensor):
        return target.to(device=like.device, dtype=torch.float32)
    return torch.full_like(like, float(target))


# ---- hinge (Lim & Ye; SNGAN, SAGAN, BigGAN) ------------------------------------------------------------
def d_hinge_loss(real_logit, fake_logit, real_target: LossTarget = 1.0, fake_target: LossTarget = 0.0) -> torch.Tensor:
    # L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]
    return F.relu(1.0 - real_logit.float()).mean() + F.relu(1.0 + fake_logit.float()).mean()


def g_hinge_loss(real_logit, fake_logit) -> torch.Tensor:
    # L_G = -E[D(G(z))]
    return -fake_logit.float().mean()


# ---- non-saturating BCE (Goodfellow et al.; DCGAN) -------------------------------------------------------
def d_bce_loss(real_logit, fake_logit, real_target: LossTarget = 1.0, fake_target: LossTarget = 0.0) -> torch.Tensor:
    # L_D = BCE(sigmoid(D(x)), t_real) + BCE(sigmoid(D(G(z))), t_fake); soft/noisy targets t in [0, 1]
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return (F.binary_cross_entropy_with_logits(real_logit, _loss_target(real_target, real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, _loss_target(fake_target, fake_logit)))


def g_bce_loss(real_logit, fake_logit) -> torch.Tensor:
    # L_G = BCE(sigmoid(D(G(z))), 1) = E[softplus(-D(G(z)))]  (non-saturating)
    return F.softplus(-fake_logit.float()).mean()


# ---- least squares (Mao et al., LSGAN with a=0, b=c=1) -----------------------------------------------------
def d_ls_loss(real_logit, fake_logit, real_target: LossTarget = 1.0, fake_target: LossTarget = 0.0) -> torch.Tensor:
    # L_D = 1/2 E[(D(x) - t_real)^2] + 1/2 E[(D(G(z)) - t_fake)^2]
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return 0.5 * ((real_logit - _loss_target(real_target, real_logit)).pow(2).mean()
                  + (fake_logit - _loss_target(fake_target, fake_logit)).pow(2).mean())


def g_ls_loss(real_logit, fake_logit) -> torch.Tensor:
    # L_G = 1/2 E[(D(G(z)) - 1)^2]
    return 0.5 * (fake_logit.float() - 1.0).pow(2).mean()


# ---- relativistic average least squares (Jolicoeur-Martineau) ----------------------------------------------
def d_rals_loss(real_logit, fake_logit, real_target: LossTarget = 1.0, fake_target: LossTarget = 0.0) -> torch.Tensor:
    # L_D = 1/2 (E[(D(x) - E D(G(z)) - 1)^2] + E[(D(G(z)) - E D(x) + 1)^2])
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return 0.5 * ((real_logit - fake_logit.mean() - 1.0).pow(2).mean()
                  + (fake_logit - real_logit.mean() + 1.0).pow(2).mean())


def g_rals_loss(real_logit, fake_logit) -> torch.Tensor:
    # L_G = 1/2 (E[(D(G(z)) - E D(x) - 1)^2] + E[(D(x) - E D(G(z)) + 1)^2])
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return 0.5 * ((fake_logit - real_logit.mean() - 1.0).pow(2).mean()
                  + (real_logit - fake_logit.mean() + 1.0).pow(2).mean())


# ---- Wasserstein (Arjovsky et al.; add gradient_penalty for WGAN-GP) ---------------------------------------
def d_wgan_loss(real_logit, fake_logit, real_target: LossTarget = 1.0, fake_target: LossTarget = 0.0) -> torch.Tensor:
    # L_D = E[D(G(z))] - E[D(x)]
    return fake_logit.float().mean() - real_logit.float().mean()


def g_wgan_loss(real_logit, fake_logit) -> torch.Tensor:
    # L_G = -E[D(G(z))]
    return -fake_logit.float().mean()


def gradient_penalty(D, real_img: torch.Tensor, fake_img: torch.Tensor, labels: torch.Tensor | None,
                     weight: float = 10.0) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): weight * E[(||grad_x_hat D(x_hat)||_2 - 1)^2], x_hat = a x + (1 - a) G(z),
    a ~ U[0, 1] per sample. Interpolates in fp32; create_graph=True so the penalty trains D.

    Under fp16 autocast the gradient of the unscaled logits may lose small values: prefer bf16 or fp32 with wgan-gp.
    """
    real_img = real_img.detach().float()
    fake_img = fake_img.detach().float()
    alpha = torch.rand(real_img.shape[0], 1, 1, 1, device=real_img.device)
    mixed_img = (alpha * real_img + (1.0 - alpha) * fake_img).requires_grad_(True)
    adv_logit = D(mixed_img, labels)[0]
    (grad,) = torch.autograd.grad(adv_logit.float().sum(), mixed_img, create_graph=True)
    grad_norm = grad.flatten(1).norm(2, dim=1)
    return weight * (grad_norm - 1.0).pow(2).mean()


# ---- LeCam regularization (Tseng et al., CVPR 2021) --------------------------------------------------------
# From the authors' BigGAN code (google/lecam-gan, biggan_cifar): the anchors are moving averages of D's mean real and
# fake outputs with decay 0.9, updated at every D step before the penalty; for the first 1,000 iterations they just
# follow the batch (decay 0) and the penalty is off; weight ("--LC") 0.3 in their CIFAR runs. (Their StyleGAN2 code
# uses decay 0.99 with TF's zero-debiasing instead.)
LECAM_DECAY = 0.9
LECAM_START_STEPS = 1000
LECAM_WEIGHT = 0.3


def lecam_penalty(real_logit: torch.Tensor, fake_logit: torch.Tensor, anchor_real: torch.Tensor,
                  anchor_fake: torch.Tensor) -> torch.Tensor:
    """E[relu(D(x) - a_fake)^2] + E[relu(a_real - D(G(z)))^2]: D's real outputs are pulled towards the fake anchor
    and its fake outputs towards the real anchor, only from the side where they overshoot (anchors held fixed)."""
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return (F.relu(real_logit - anchor_fake.detach()).pow(2).mean()
            + F.relu(anchor_real.detach() - fake_logit).pow(2).mean())


class LeCamAnchors:
    """The moving averages of D's mean real and fake outputs that lecam_penalty anchors to: device tensors updated
    from logits D already computed (no extra forward pass, no host sync)."""

    def __init__(self, device, decay: float = LECAM_DECAY, start_steps: int = LECAM_START_STEPS):
        self.decay, self.start_steps = float(decay), int(start_steps)
        self.anchors = torch.zeros(2, device=device)  # [real, fake]
        self.steps = 0

    def penalty(self, real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
        """Move the anchors with this D step's logits, then the LeCam term for them (0 while warming up)."""
        decay = self.decay if self.steps >= self.start_steps else 0.0
        means = torch.stack([real_logit.detach().float().mean(), fake_logit.detach().float().mean()])
        self.anchors = decay * self.anchors + (1.0 - decay) * means
        self.steps += 1
        if self.steps <= self.start_steps:
            return torch.zeros((), device=self.anchors.device)
        return lecam_penalty(real_logit, fake_logit, self.anchors[0], self.anchors[1])

    def state_dict(self) -> dict:
        """Plain numbers for the checkpoint (a host read: at checkpoint time only)."""
        return {"real": float(self.anchors[0]), "fake": float(self.anchors[1]), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.anchors = torch.tensor([state["real"], state["fake"]], device=self.anchors.device)
        self.steps = int(state["steps"])


def aux_class_loss(class_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """ACGAN's auxiliary breed loss: cross-entropy(class_logits, labels); a 0 tensor when D has no classifier."""
    if class_logits is None:
        return torch.zeros((), device=labels.device)
    return F.cross_entropy(class_logits.float(), labels)


def noisy_labels(n: int, low: float, high: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n targets uniform in [low, high] (the Kaggle kernels' real 0.9-1.0, fake 0.0-0.1)."""
    if low > high:
        raise ValueError(f"noisy label range is empty: low {low} > high {high}")
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


@dataclass(frozen=True)
class GanLoss:
    """One GAN objective: its D and G losses and what D's step needs besides the logits."""
    d_loss: Callable                 # d_loss(real_logit, fake_logit, real_target, fake_target)
    g_loss: Callable                 # g_loss(real_logit, fake_logit)
    noisy_targets: bool = False      # D's targets drawn from [real_label_min, 1] and [0, fake_label_max]
    penalty: Callable | None = None  # an extra D term penalty(D, real_img, fake_img, labels, weight), run in fp32

    def d_targets(self, n: int, real_min: float, fake_max: float, device) -> tuple[LossTarget, LossTarget]:
        """(real_target, fake_target) for one D step of n images."""
        if not self.noisy_targets:
            return 1.0, 0.0
        return noisy_labels(n, real_min, 1.0, device), noisy_labels(n, 0.0, fake_max, device)


GAN_LOSSES = {
    "hinge": GanLoss(d_hinge_loss, g_hinge_loss),
    "bce": GanLoss(d_bce_loss, g_bce_loss, noisy_targets=True),
    "ls": GanLoss(d_ls_loss, g_ls_loss, noisy_targets=True),
    "rals": GanLoss(d_rals_loss, g_rals_loss),
    "wgan-gp": GanLoss(d_wgan_loss, g_wgan_loss, penalty=gradient_penalty),
}
