"""GAN building blocks: spectral norm, conditional BN, self-attention, minibatch stddev, pixel norm, G/D blocks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


class SpectralNormFp32(nn.Module):
    """Parametrization W -> W / sigma(W), sigma from power iteration kept in fp32 even under autocast.

    torch's own spectral_norm runs its matrix-vector products inside the caller's autocast region, so on CUDA
    they run in fp16/bf16; this one switches autocast off for the power iteration and for sigma.
    forward only reads u, v (buffers, saved in state_dict); the training loop advances them with one power
    iteration per optimiser step (spectral_norm_power_iteration_, before the step's forwards). Updating them inside
    forward breaks two forwards before one backward (real and fake through D) under torch.compile, which saves the
    buffers themselves for backward.
    """

    def __init__(self, weight: torch.Tensor, dim: int = 0, eps: float = 1e-12, warmup_iters: int = 15):
        super().__init__()
        self.dim = dim
        self.eps = eps
        rows, cols = self._matrix(weight).shape
        self.register_buffer("u", F.normalize(weight.new_empty(rows, dtype=torch.float32).normal_(), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(weight.new_empty(cols, dtype=torch.float32).normal_(), dim=0, eps=eps))
        self.reset_vectors(weight, warmup_iters)

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        # sigma of the [out, in * k * k] matrix; ConvTranspose keeps its output channels on dim 1
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    @torch.no_grad()
    def _power_iteration(self, weight_mat: torch.Tensor, n_iters: int) -> None:
        # u <- W v / |W v|, v <- W^T u / |W^T u|; updated in place so DataParallel replicas and DDP see them
        for _ in range(n_iters):
            self.u.copy_(F.normalize(weight_mat @ self.v.float(), dim=0, eps=self.eps))
            self.v.copy_(F.normalize(weight_mat.t() @ self.u.float(), dim=0, eps=self.eps))

    @torch.no_grad()
    def reset_vectors(self, weight: torch.Tensor, n_iters: int = 15) -> None:
        """Re-seed u, v for a freshly initialised weight."""
        self._power_iteration(self._matrix(weight).float(), n_iters)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            weight_mat = self._matrix(weight).float()
            sigma = torch.dot(self.u, weight_mat @ self.v)  # sigma = u^T W v
            return (weight.float() / sigma).to(weight.dtype)


def spectral_norm_layers(model: nn.Module) -> list:
    """[(SpectralNormFp32, original weight)] of every spectral-normalised weight of `model`, collected once
    (walking the modules every step costs ~0.7 ms for the default G and D)."""
    layers = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrization = module.parametrizations.weight
            layers += [(step, parametrization.original) for step in parametrization if isinstance(step, SpectralNormFp32)]
    return layers


@torch.no_grad()
def spectral_norm_power_iteration_(layers: list) -> None:
    """One power iteration for each (SpectralNormFp32, weight) of spectral_norm_layers(): call once per optimiser
    step, before the step's forwards (SN's one iteration per update), with no graph of the previous step waiting."""
    for sn, weight in layers:
        sn._power_iteration(sn._matrix(weight).float(), 1)


def with_sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Register SpectralNormFp32 on module.weight when enabled; returns the module."""
    if not enabled:
        return module
    dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, "weight", SpectralNormFp32(module.weight.detach(), dim=dim))
    return module


def sn_conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True,
              sn: bool = True) -> nn.Module:
    return with_sn(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=bias), sn)


def sn_linear(in_features: int, out_features: int, bias: bool = True, sn: bool = True) -> nn.Module:
    return with_sn(nn.Linear(in_features, out_features, bias=bias), sn)


def sn_embedding(n_classes: int, dim: int, sn: bool = True) -> nn.Module:
    return with_sn(nn.Embedding(n_classes, dim), sn)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain/bias come from the condition:
    gain = 1 + linear_g(c) [+ embed_g(y)], bias = linear_b(c) [+ embed_b(y)].

    cond_dim > 0: c is a vector (BigGAN's shared class embedding, optionally with a z chunk).
    n_classes > 0: per-layer class embeddings (plain conditional BN, SNGAN). Neither: an ordinary affine BatchNorm.
    """

    def __init__(self, num_features: int, cond_dim: int = 0, n_classes: int = 0, sn: bool = False, eps: float = 1e-5):
        super().__init__()
        self.cond_dim = cond_dim
        self.n_classes = n_classes
        conditional = cond_dim > 0 or n_classes > 0
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=not conditional)
        self.gain_linear = sn_linear(cond_dim, num_features, bias=False, sn=sn) if cond_dim > 0 else None
        self.bias_linear = sn_linear(cond_dim, num_features, bias=False, sn=sn) if cond_dim > 0 else None
        self.gain_embed = nn.Embedding(n_classes, num_features) if n_classes > 0 else None
        self.bias_embed = nn.Embedding(n_classes, num_features) if n_classes > 0 else None
        self.reset_condition_()

    @torch.no_grad()
    def reset_condition_(self) -> None:
        """Class embeddings start at zero so every class starts with gain 1, bias 0 (SNGAN's CBN)."""
        for embed in (self.gain_embed, self.bias_embed):
            if embed is not None:
                embed.weight.zero_()

    def forward(self, x: torch.Tensor, cond_vec: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bn(x)
        if self.gain_linear is None and self.gain_embed is None:
            return out
        gain = 1.0
        bias = 0.0
        if self.gain_linear is not None:
            gain = gain + self.gain_linear(cond_vec)
            bias = bias + self.bias_linear(cond_vec)
        if self.gain_embed is not None:
            gain = gain + self.gain_embed(y)
            bias = bias + self.bias_embed(y)
        return out * gain[:, :, None, None] + bias[:, :, None, None]


class SelfAttention2d(nn.Module):
    """SAGAN self-attention with BigGAN's layout: theta, phi (C/8) and g (C/2) 1x1 convs, phi and g max-pooled by 2.

    beta = softmax(theta(x)^T phi(x)) over the pooled positions; out = x + gamma * o(g(x) beta^T); gamma starts at 0,
    so the layer is the identity at initialisation.
    """

    def __init__(self, ch: int, sn: bool = True):
        super().__init__()
        if ch < 8:
            raise ValueError(f"self-attention needs at least 8 channels, got {ch}: raise the width (--g-ch/--d-ch)")
        self.theta = sn_conv2d(ch, ch // 8, 1, bias=False, sn=sn)
        self.phi = sn_conv2d(ch, ch // 8, 1, bias=False, sn=sn)
        self.g = sn_conv2d(ch, ch // 2, 1, bias=False, sn=sn)
        self.o = sn_conv2d(ch // 2, ch, 1, bias=False, sn=sn)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        theta = self.theta(x).reshape(b, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).reshape(b, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).reshape(b, c // 2, h * w // 4)
        # plain matmul + softmax (not SDPA): it supports the double backward of the gradient penalty
        beta = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # [B, HW, HW/4]
        attended = (g @ beta.transpose(1, 2)).reshape(b, c // 2, h, w)
        return x + self.gamma * self.o(attended)


class MinibatchStdDev(nn.Module):
    """ProGAN's minibatch stddev: append one channel holding mean_{c,h,w} std over a group of samples.

    Groups take every (B/G)-th sample (sample i with i + B/G, ...); G = gcd(B, group_size) so any batch works.
    """

    def __init__(self, group_size: int = 4, eps: float = 1e-8):
        super().__init__()
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        group = math.gcd(b, self.group_size)
        grouped = x.float().reshape(group, b // group, c, h, w)
        var = grouped.var(dim=0, unbiased=False)  # [B/G, C, H, W]
        std = torch.sqrt(var + self.eps).mean(dim=(1, 2, 3))  # [B/G]
        std_map = std.to(x.dtype).repeat(group)[:, None, None, None].expand(b, 1, h, w)
        return torch.cat([x, std_map], dim=1)


class PixelNorm(nn.Module):
    """ProGAN's pixelwise feature normalisation: x / sqrt(mean_c(x^2) + eps)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


class GBlock(nn.Module):
    """BigGAN/SNGAN G block: CBN-ReLU-up-conv3-CBN-ReLU-conv3, shortcut up-conv1.

    The shortcut runs conv1 before the nearest upsampling: both are linear and per-pixel, so they commute
    exactly, and the conv then touches 4x fewer pixels.
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int = 0, n_classes: int = 0, sn: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_ch, cond_dim, n_classes, sn=sn)
        self.conv1 = sn_conv2d(in_ch, out_ch, 3, padding=1, sn=sn)
        self.bn2 = ConditionalBatchNorm2d(out_ch, cond_dim, n_classes, sn=sn)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3, padding=1, sn=sn)
        self.conv_sc = sn_conv2d(in_ch, out_ch, 1, sn=sn)

    def forward(self, x: torch.Tensor, cond_vec: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.bn1(x, cond_vec, y))
        h = self.conv1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h, cond_vec, y)))
        return h + F.interpolate(self.conv_sc(x), scale_factor=2, mode="nearest")


class DBlock(nn.Module):
    """BigGAN/SNGAN D block: [ReLU]-conv3-ReLU-conv3-[avgpool], shortcut [avgpool]-conv1 when shapes change.

    preactivation=False for the first block (no ReLU on the image). The shortcut pools before its conv1
    (they commute exactly) so the conv runs on 4x fewer pixels.
    """

    def __init__(self, in_ch: int, out_ch: int, downsample: bool = True, preactivation: bool = True,
                 sn: bool = True):
        super().__init__()
        self.downsample = downsample
        self.preactivation = preactivation
        self.conv1 = sn_conv2d(in_ch, out_ch, 3, padding=1, sn=sn)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3, padding=1, sn=sn)
        self.conv_sc = sn_conv2d(in_ch, out_ch, 1, sn=sn) if (in_ch != out_ch or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        shortcut = x
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            shortcut = F.avg_pool2d(shortcut, 2)
        if self.conv_sc is not None:
            shortcut = self.conv_sc(shortcut)
        return h + shortcut


class DCGANUpBlock(nn.Module):
    """DCGAN G block: ConvTranspose(4, stride 2) doubling the resolution, then BN-ReLU (or ReLU-PixelNorm)."""

    def __init__(self, in_ch: int, out_ch: int, sn: bool = False, pixel_norm: bool = False):
        super().__init__()
        self.conv = with_sn(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=pixel_norm), sn)
        self.norm = PixelNorm() if pixel_norm else nn.BatchNorm2d(out_ch)
        self.pixel_norm = pixel_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.norm(F.relu(h)) if self.pixel_norm else F.relu(self.norm(h))


class DCGANDownBlock(nn.Module):
    """DCGAN D block: Conv(4, stride 2) halving the resolution, [BN], LeakyReLU(0.2)."""

    def __init__(self, in_ch: int, out_ch: int, sn: bool = False, batch_norm: bool = True):
        super().__init__()
        self.conv = sn_conv2d(in_ch, out_ch, 4, 2, 1, bias=not batch_norm, sn=sn)
        self.bn = nn.BatchNorm2d(out_ch) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        return F.leaky_relu(h, 0.2)


class LabelMap(nn.Module):
    """cond=concat in D: a learned per-class image-sized map, [B] labels -> [B, 1, size, size]."""

    def __init__(self, n_classes: int, size: int):
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(n_classes, size * size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embed(y).reshape(-1, 1, self.size, self.size)


class DiscriminatorHead(nn.Module):
    """D's output from pooled features h [B, F]: adv = linear(h) [+ sum(embed(y) * h)] (projection), and
    class_logits = linear_cls(h) for cond=acgan (else None)."""

    def __init__(self, feat_dim: int, n_classes: int, cond: str, sn: bool = True):
        super().__init__()
        self.adv = sn_linear(feat_dim, 1, sn=sn)
        self.proj = sn_embedding(n_classes, feat_dim, sn=sn) if cond == "projection" else None
        self.cls = sn_linear(feat_dim, n_classes, sn=sn) if cond == "acgan" else None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        adv_logit = self.adv(h).squeeze(1)
        if self.proj is not None:
            adv_logit = adv_logit + (self.proj(y) * h).sum(dim=1)  # projection discriminator
        class_logits = self.cls(h) if self.cls is not None else None
        return adv_logit, class_logits
