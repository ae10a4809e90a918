"""The GAN maths of a training round in one place, as StyleGAN2-ADA's loss.accumulate_gradients: losses, noisy
targets, penalties, the auxiliary breed loss, reuse of fakes, the spectral-norm power iteration, augmentation and
the optimiser steps, and the small-data levers: ADA's augmentation probability, LeCam's anchors, G's breeds by the
data's frequencies. The loop only names the phases: `begin_round`, `d_phase` per real batch, `g_phase`, `end_round`.

Nothing here reads a value back to the host: the round's sums stay on the device until the status tick.
"""
from __future__ import annotations

import torch

from src.ada import AdaController
from src.augment import diff_augment, parse_diffaug_policy, random_flip, uint8_to_unit
from src.config import Config
from src.generate import TRAINING_BREEDS
from src.layers import spectral_norm_power_iteration_
from src.losses import GAN_LOSSES, LeCamAnchors, aux_class_loss
from src.nets import GanNets
from src.precision import autocast_disabled, precision_autocast, to_memory_format

# What a round sums on the device, in this order: D's loss, mean D(x), mean D(G(z)) over the D phases; G's loss.
ROUND_SUMS = ("d_loss", "d_real", "d_fake", "g_loss")


class GanStep:
    """Built once from the settled config, the run's nets and the training data's images per breed; holds the
    round's device sums and kept fakes, and the levers' state (state_dict: for the checkpoint)."""

    def __init__(self, cfg: Config, nets: GanNets, breed_counts: torch.Tensor):
        self.nets, self.precision, self.n_classes = nets, nets.precision, len(breed_counts)
        self.loss = GAN_LOSSES[cfg.loss]
        self.diffaug, self.flip = tuple(parse_diffaug_policy(cfg.diffaug)), cfg.flip  # parsed once
        self.aux_weight, self.gp_weight = cfg.aux_weight, cfg.gp_weight
        self.real_label_min, self.fake_label_max = cfg.real_label_min, cfg.fake_label_max
        self.g_steps = cfg.g_steps
        self.device = next(nets.G.parameters()).device
        self.breed_counts, self.draw_breeds = breed_counts.to(self.device), TRAINING_BREEDS[cfg.labels]
        # ADA: p drives every DiffAugment op, from 0 (None: the whole policy on every image)
        self.ada = AdaController(self.device, cfg.ada_target, ada_kimg=cfg.ada_kimg) if cfg.ada_target > 0 else None
        self.lecam = LeCamAnchors(self.device) if cfg.lecam_weight > 0 else None
        self.lecam_weight = cfg.lecam_weight
        self.sums = torch.zeros(len(ROUND_SUMS), device=self.device)
        self.batch_size, self.reuse_fakes, self.kept_fakes, self.real_logit = 0, False, None, None

    def begin_round(self, batch_size: int, n_dis: int) -> None:
        """A round of n_dis D phases then g_steps G phases on `batch_size` images per phase (this rank's share)."""
        self.batch_size = batch_size
        self.sums = torch.zeros(len(ROUND_SUMS), device=self.device)
        # With one D phase, its fakes (with G's graph kept) also serve the first G phase: one G forward fewer.
        self.reuse_fakes = n_dis == 1 and self.g_steps >= 1
        self.kept_fakes, self.real_logit = None, None
        spectral_norm_power_iteration_(self.nets.sn_G)  # G's one iteration for its first update

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        # z and breeds of one generated batch
        z = torch.randn(self.batch_size, self.nets.G.z_dim, device=self.device)
        return z, self.draw_breeds(self.batch_size, self.breed_counts)

    def _real_img(self, real_u8: torch.Tensor) -> torch.Tensor:
        # uint8 -> [-1, 1], brought to what D judges in training (the model knows its resolution), random mirror
        real_img = self.nets.D.fit_real(uint8_to_unit(real_u8))
        if self.flip:
            real_img = random_flip(real_img)
        return to_memory_format(real_img, self.precision)

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        # DiffAugment: the same policy on real and fake, differentiable so G learns through it
        if self.diffaug:
            p = self.ada.p if self.ada is not None else 1.0
            img = to_memory_format(diff_augment(img, self.diffaug, p), self.precision)
        return img

    def _optimizer_step(self, loss: torch.Tensor, optimizer, scaler) -> None:
        # scale (fp16 only) -> backward -> unscale + inf check + step -> update the scale
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def d_phase(self, real_u8: torch.Tensor, real_y: torch.Tensor) -> None:
        """One D update: real and generated batches through D; D's loss sees the fakes detached from G."""
        nets = self.nets
        spectral_norm_power_iteration_(nets.sn_D)
        z, gen_y = self._latents()
        real_target, fake_target = self.loss.d_targets(self.batch_size, self.real_label_min, self.fake_label_max,
                                                       self.device)
        with precision_autocast(self.precision):
            if self.reuse_fakes:
                self.kept_fakes = (nets.G_train(z, gen_y, full_res=False), gen_y)
                gen_img = self.kept_fakes[0].detach()
            else:
                with torch.no_grad():
                    gen_img = nets.G_fwd(z, gen_y, full_res=False)
            real_img = self._real_img(real_u8)
            real_logit, real_class = nets.D_train(self._augment(real_img), real_y)
            fake_logit, _ = nets.D_train(self._augment(gen_img), gen_y)
            d_loss = self.loss.d_loss(real_logit, fake_logit, real_target, fake_target)
            if real_class is not None:
                d_loss = d_loss + self.aux_weight * aux_class_loss(real_class, real_y)
            if self.lecam is not None:
                d_loss = d_loss + self.lecam_weight * self.lecam.penalty(real_logit, fake_logit)
        if self.loss.penalty is not None:
            # the penalty's double backward runs in fp32 (fp16 would underflow the input gradients) and through the
            # plain D: a torch.compile'd graph cannot be differentiated twice
            with autocast_disabled(self.precision):
                d_loss = d_loss + self.loss.penalty(nets.D, real_img.float(), gen_img.float(), real_y,
                                                    weight=self.gp_weight)
        self._optimizer_step(d_loss, nets.opt_d, nets.scaler_d)
        # RaLS's G loss compares with D(x): the last D phase's real logits (detached) serve
        self.real_logit = real_logit.detach()
        if self.ada is not None:
            self.ada.observe(self.real_logit)
        self.sums[:3] += torch.stack([d_loss.detach().float(), self.real_logit.float().mean(),
                                      fake_logit.detach().float().mean()])

    def g_phase(self, g_step: int) -> None:
        """One G update: gradients flow through the frozen (just updated) D into G."""
        nets = self.nets
        if g_step > 0:
            spectral_norm_power_iteration_(nets.sn_G)
        nets.D.requires_grad_(False)
        try:
            with precision_autocast(self.precision):
                if g_step == 0 and self.kept_fakes is not None:
                    gen_img, gen_y = self.kept_fakes
                    self.kept_fakes = None
                else:
                    z, gen_y = self._latents()
                    gen_img = nets.G_train(z, gen_y, full_res=False)
                fake_logit, fake_class = nets.D_fwd(self._augment(gen_img), gen_y)
                g_loss = self.loss.g_loss(self.real_logit, fake_logit)
                if fake_class is not None:
                    g_loss = g_loss + self.aux_weight * aux_class_loss(fake_class, gen_y)
            self._optimizer_step(g_loss, nets.opt_g, nets.scaler_g)
        finally:
            nets.D.requires_grad_(True)
        self.sums[3] += g_loss.detach().float()

    def ada_p(self) -> float | None:
        """ADA's current p (one host read: for the status tick), None without ADA."""
        return float(self.ada.p) if self.ada is not None else None

    def state_dict(self) -> dict:
        """The levers' state for the checkpoint: ADA's p and interval, LeCam's anchors (plain numbers)."""
        return {"ada": self.ada.state_dict() if self.ada is not None else None,
                "lecam": self.lecam.state_dict() if self.lecam is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run's levers as they were; a lever the checkpoint's run did not use starts afresh."""
        if self.ada is not None and state.get("ada"):
            self.ada.load_state_dict(state["ada"])
        if self.lecam is not None and state.get("lecam"):
            self.lecam.load_state_dict(state["lecam"])

    def end_round(self) -> torch.Tensor:
        """The round's device sums, in the order of ROUND_SUMS (nothing is read back to the host)."""
        self.kept_fakes = None
        return self.sums
