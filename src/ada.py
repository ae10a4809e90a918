"""Adaptive augmentation strength (Karras et al. 2020, StyleGAN2-ADA's heuristic) for the DiffAugment ops.

D overfits its training set when its outputs on real images turn confidently positive. ADA watches
r = E[sign D(real)] and every `interval` D steps moves the per-image augmentation probability p by
sign(r - target) * (real images in the interval) / (ada_kimg * 1000): p climbs from 0 to 1 in ada_kimg thousand
images while D overfits, and falls back while it does not. The official defaults (stylegan2-ada-pytorch
training_loop.py): target 0.6, interval 4, ada_kimg 500; p starts at 0. There p only has a floor of 0; here it is
also capped at 1, the largest probability there is.

Which ops p drives is the DiffAugment policy's business (augment.diff_augment): ADA's own pipeline applies colour
transforms at the same p as the geometric ones, so with ADA the policy may include colour; at p near 0 (a D that
does not overfit) colour jitter then costs nothing, which is what kept it out of the default policy for short runs.

Everything per step stays on the device (no host sync): p is a 0-dim tensor diff_augment reads on the device.
Under DDP each rank steers its own p from its own batches (no collective): the ranks' p stay close, and rank 0's is
the one logged and checkpointed.
"""
from __future__ import annotations

import torch

ADA_TARGET = 0.6      # r = E[sign D(real)] that ADA steers towards
ADA_INTERVAL = 4      # D steps between two adjustments of p
ADA_KIMG = 500.0      # thousands of images for p to move by 1 (short runs may need fewer: a parameter)


class AdaController:
    """p, the per-image probability of every DiffAugment op, steered by the sign of D's outputs on real images.

    Call observe(real_logit) after each D step; every `interval` calls p moves and the signs start again.
    """

    def __init__(self, device, target: float = ADA_TARGET, interval: int = ADA_INTERVAL, ada_kimg: float = ADA_KIMG,
                 p: float = 0.0):
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"ADA target {target} must be in [0, 1]: it is a mean of signs on real images")
        if interval < 1 or ada_kimg <= 0:
            raise ValueError(f"ADA interval ({interval}) and ada_kimg ({ada_kimg}) must be positive")
        self.target, self.interval, self.ada_kimg = float(target), int(interval), float(ada_kimg)
        self.p = torch.tensor(float(p), device=device)
        self.sign_sum = torch.zeros((), device=device)
        self.images = 0   # real images whose signs are in sign_sum
        self.steps = 0    # D steps observed since the last adjustment

    def observe(self, real_logit: torch.Tensor) -> None:
        """Add one D step's real logits (detached; one per image); adjust p when the interval is complete."""
        logits = real_logit.detach().float().reshape(len(real_logit), -1).mean(dim=1)
        self.sign_sum += logits.sign().sum()
        self.images += len(logits)
        self.steps += 1
        if self.steps >= self.interval:
            self.adjust()

    def adjust(self) -> None:
        # p += sign(r - target) * images / (ada_kimg * 1000), clamped to [0, 1]; on the device
        r = self.sign_sum / max(1, self.images)
        step = (r - self.target).sign() * (self.images / (self.ada_kimg * 1000.0))
        self.p = (self.p + step).clamp(0.0, 1.0)
        self.sign_sum.zero_()
        self.images, self.steps = 0, 0

    def state_dict(self) -> dict:
        """Plain numbers for the checkpoint (a host read: call it at checkpoint time, not every step)."""
        return {"p": float(self.p), "sign_sum": float(self.sign_sum), "images": self.images, "steps": self.steps,
                "target": self.target, "interval": self.interval, "ada_kimg": self.ada_kimg}

    def load_state_dict(self, state: dict) -> None:
        """p and the half-finished interval from a checkpoint; target, interval and speed stay this run's."""
        self.p = torch.tensor(float(state["p"]), device=self.p.device)
        self.sign_sum = torch.tensor(float(state["sign_sum"]), device=self.p.device)
        self.images, self.steps = int(state["images"]), int(state["steps"])
