"""Generators and discriminators of every recipe (ResNet SNGAN/SAGAN/BigGAN family and DCGAN), built from Config."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from src.config import Config
from src.layers import (ConditionalBatchNorm2d, DBlock, DCGANDownBlock, DCGANUpBlock, DiscriminatorHead, GBlock,
                        LabelMap, MinibatchStdDev, PixelNorm, SelfAttention2d, SpectralNormFp32, sn_conv2d, sn_linear,
                        with_sn)

MODEL_IMG_SIZE = 64  # every G makes 64x64 RGB; every D reads 64x64
ATTN_RESOLUTIONS = (8, 16, 32)  # where both G and D have a block output to attend over


def hier_z_sizes(z_dim: int, n_slots: int) -> list[int]:
    """Near-equal chunk sizes of z adding up to z_dim (128 over 5 slots -> 26, 26, 26, 25, 25)."""
    if z_dim < n_slots:
        raise ValueError(f"--z-dim {z_dim} is too small to split across {n_slots} hierarchical-z slots")
    base, extra = divmod(z_dim, n_slots)
    return [base + 1] * extra + [base] * (n_slots - extra)


def _check_g_inputs(z: torch.Tensor, y: torch.Tensor | None, z_dim: int, conditional: bool) -> None:
    # shape checks only (no host sync): a wrong z or missing y fails here, not deep inside a conv
    if z.dim() != 2 or z.shape[1] != z_dim:
        raise ValueError(f"G expects z of shape [B, {z_dim}], got {list(z.shape)}")
    if conditional and (y is None or y.shape != z.shape[:1]):
        raise ValueError(f"conditional G expects labels y of shape [{z.shape[0]}], got "
                         f"{None if y is None else list(y.shape)}")


def _check_d_inputs(img: torch.Tensor, y: torch.Tensor | None, uses_labels: bool,
                    draw_res: int = MODEL_IMG_SIZE) -> None:
    if img.dim() != 4 or img.shape[1] != 3 or img.shape[2] != img.shape[3] or img.shape[2] not in (MODEL_IMG_SIZE,
                                                                                                  draw_res):
        shapes = " or ".join(f"[B, 3, {r}, {r}]" for r in sorted({MODEL_IMG_SIZE, draw_res}, reverse=True))
        raise ValueError(f"D expects images of shape {shapes}, got {list(img.shape)}")
    if uses_labels and (y is None or y.shape != img.shape[:1]):
        raise ValueError(f"conditional D expects labels y of shape [{img.shape[0]}], got "
                         f"{None if y is None else list(y.shape)}")


class ResNetGenerator(nn.Module):
    """SNGAN/BigGAN ResNet G for 64x64: linear -> 4x4x16ch, up-blocks 16ch->8ch->4ch->2ch->1ch, BN-ReLU-conv3-tanh.

    Conditional: a shared class embedding (shared_dim > 0) feeds every CBN, else per-layer class embeddings.
    hier_z: z splits into n_blocks + 1 chunks, chunk 0 to the linear stem, chunk i concatenated to the
    shared embedding for block i.
    """

    def __init__(self, z_dim: int, n_classes: int, ch: int, conditional: bool, shared_dim: int, hier_z: bool,
                 attn_res: int, sn: bool):
        super().__init__()
        self.z_dim = z_dim
        self.n_classes = n_classes
        self.draw_res = MODEL_IMG_SIZE
        self.conditional = conditional
        channels = [16 * ch, 8 * ch, 4 * ch, 2 * ch, 1 * ch]
        n_blocks = len(channels) - 1
        self.z_sizes = hier_z_sizes(z_dim, n_blocks + 1) if hier_z else [z_dim]
        block_z_dim = self.z_sizes[1:] if hier_z else [0] * n_blocks
        self.shared = nn.Embedding(n_classes, shared_dim) if conditional and shared_dim > 0 else None
        shared_width = shared_dim if self.shared is not None else 0
        per_layer_classes = n_classes if conditional and self.shared is None else 0

        self.stem = sn_linear(self.z_sizes[0], channels[0] * 4 * 4, sn=sn)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = 4
        for i in range(n_blocks):
            self.blocks.append(GBlock(channels[i], channels[i + 1], cond_dim=shared_width + block_z_dim[i],
                                      n_classes=per_layer_classes, sn=sn))
            res *= 2
            if res == attn_res:
                self.attn[str(i)] = SelfAttention2d(channels[i + 1], sn=sn)
        self.out_bn = nn.BatchNorm2d(channels[-1])
        self.out_conv = sn_conv2d(channels[-1], 3, 3, padding=1, sn=sn)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, full_res: bool = True) -> torch.Tensor:
        # full_res is every G's training switch (the drawing itself, not its 64x64 copy): this G draws at 64
        _check_g_inputs(z, y, self.z_dim, self.conditional)
        z_chunks = torch.split(z, self.z_sizes, dim=1)
        shared = self.shared(y) if self.shared is not None else None
        block_y = y if self.conditional else None
        h = self.stem(z_chunks[0]).reshape(z.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            parts = [t for t in (shared, z_chunks[i + 1] if len(z_chunks) > 1 else None) if t is not None]
            cond_vec = torch.cat(parts, dim=1) if parts else None
            h = block(h, cond_vec, block_y)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class ResNetDiscriminator(nn.Module):
    """SNGAN/BigGAN ResNet D for 64x64: blocks ch, 2ch, 4ch, 8ch (down to 4x4), 16ch (no pooling),
    ReLU, global sum pool, DiscriminatorHead (linear [+ projection] [+ aux classifier])."""

    def __init__(self, n_classes: int, ch: int, cond: str, attn_res: int, sn: bool, mbstd: bool):
        super().__init__()
        self.cond = cond
        self.draw_res = MODEL_IMG_SIZE
        self.label_map = LabelMap(n_classes, MODEL_IMG_SIZE) if cond == "concat" else None
        channels = [3 + (1 if cond == "concat" else 0), ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch]
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = MODEL_IMG_SIZE
        n_blocks = len(channels) - 1
        for i in range(n_blocks):
            last = i == n_blocks - 1
            in_ch = channels[i] + (1 if last and mbstd else 0)
            self.blocks.append(DBlock(in_ch, channels[i + 1], downsample=not last, preactivation=i > 0, sn=sn))
            res = res if last else res // 2
            if res == attn_res and not last:
                self.attn[str(i)] = SelfAttention2d(channels[i + 1], sn=sn)
        self.mbstd = MinibatchStdDev() if mbstd else None
        self.head = DiscriminatorHead(channels[-1], n_classes, cond, sn=sn)

    def fit_real(self, real_img: torch.Tensor) -> torch.Tensor:
        """Real 64x64 images as this D judges them in training: as they are."""
        return real_img

    def forward(self, img: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_d_inputs(img, y, self.cond in ("projection", "concat"))
        h = img
        if self.label_map is not None:
            h = torch.cat([h, self.label_map(y).to(h.dtype)], dim=1)
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - 1 and self.mbstd is not None:
                h = self.mbstd(h)
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        features = F.relu(h).sum(dim=(2, 3))  # global sum pooling
        return self.head(features, y)


class DCGANGenerator(nn.Module):
    """Radford et al. G: [z, label embedding] -> Linear -> 4x4x8ch -> ConvTranspose 8ch->4ch->2ch->1ch -> 3, tanh.

    draw_res 32 draws at 32x32 (4x4x4ch -> 4ch->2ch->1ch -> 3) and upsamples bilinearly to 64x64: a quarter of the
    work per image, for CPU runs such as the demo. Bilinear, not 2x2 repeats: real 64x64 photos are smooth, and on the
    real-dog proxy the same G_ema's images scored FID ~250 repeated and ~150 bilinear (BENCHMARKS.md). Training asks
    for full_res=False: the 32x32 drawing itself, which D judges as it is (no 64x64 copy to build, augment and pool
    back)."""

    def __init__(self, z_dim: int, n_classes: int, ch: int, conditional: bool, label_dim: int, attn_res: int,
                 sn: bool, pixel_norm: bool, draw_res: int = MODEL_IMG_SIZE):
        super().__init__()
        self.upscale = MODEL_IMG_SIZE // draw_res
        self.draw_res = draw_res
        self.z_dim = z_dim
        self.n_classes = n_classes
        self.conditional = conditional
        self.label_embed = nn.Embedding(n_classes, label_dim) if conditional else None
        in_dim = z_dim + (label_dim if conditional else 0)
        n_ups = int(math.log2(draw_res // 4))  # 4x4 -> draw_res in doublings: the last one is out_conv
        channels = [ch * 2 ** (n_ups - 1 - i) for i in range(n_ups)]
        self.stem = sn_linear(in_dim, channels[0] * 4 * 4, bias=pixel_norm, sn=sn)
        self.stem_norm = PixelNorm() if pixel_norm else nn.BatchNorm2d(channels[0])
        self.pixel_norm = pixel_norm
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = 4
        for i in range(len(channels) - 1):
            self.blocks.append(DCGANUpBlock(channels[i], channels[i + 1], sn=sn, pixel_norm=pixel_norm))
            res *= 2
            if res == attn_res:
                self.attn[str(i)] = SelfAttention2d(channels[i + 1], sn=sn)
        self.out_conv = with_sn(nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1), sn)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, full_res: bool = True) -> torch.Tensor:
        _check_g_inputs(z, y, self.z_dim, self.conditional)
        g_in = torch.cat([z, self.label_embed(y).to(z.dtype)], dim=1) if self.label_embed is not None else z
        h = self.stem(g_in).reshape(z.shape[0], -1, 4, 4)
        h = self.stem_norm(F.relu(h)) if self.pixel_norm else F.relu(self.stem_norm(h))
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        img = torch.tanh(self.out_conv(h))
        if not full_res or self.upscale == 1:
            return img
        return F.interpolate(img, scale_factor=self.upscale, mode="bilinear", align_corners=False)


class DCGANDiscriminator(nn.Module):
    """Radford et al. D: strided convs 3->ch->2ch->4ch->8ch with LeakyReLU(0.2) (BN from the second conv on,
    dropped when D is spectrally normalised as in SN-DCGAN), then the 4x4x8ch features, flattened, go to the head
    (the DCGAN's final 4x4 valid conv is exactly a linear layer on them). draw_res 32 judges 32x32 images with one
    block fewer: a 64x64 image is 2x2-averaged first (as the reals in training), a 32x32 one is taken as it is."""

    def __init__(self, n_classes: int, ch: int, cond: str, attn_res: int, sn: bool, mbstd: bool,
                 draw_res: int = MODEL_IMG_SIZE):
        super().__init__()
        self.cond = cond
        self.downscale = MODEL_IMG_SIZE // draw_res
        self.draw_res = draw_res
        self.label_map = LabelMap(n_classes, draw_res) if cond == "concat" else None
        n_downs = int(math.log2(draw_res // 4))
        channels = [3 + (1 if cond == "concat" else 0)] + [ch * 2 ** i for i in range(n_downs)]
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        res = draw_res
        for i in range(len(channels) - 1):
            self.blocks.append(DCGANDownBlock(channels[i], channels[i + 1], sn=sn, batch_norm=i > 0 and not sn))
            res //= 2
            if res == attn_res:
                self.attn[str(i)] = SelfAttention2d(channels[i + 1], sn=sn)
        self.mbstd = MinibatchStdDev() if mbstd else None
        self.head = DiscriminatorHead((channels[-1] + (1 if mbstd else 0)) * 4 * 4, n_classes, cond, sn=sn)

    def fit_real(self, real_img: torch.Tensor) -> torch.Tensor:
        """Real 64x64 images as this D judges them in training: 2x2-averaged once to what a 32x32 G draws."""
        return F.avg_pool2d(real_img, self.downscale) if self.downscale > 1 else real_img

    def forward(self, img: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_d_inputs(img, y, self.cond in ("projection", "concat"), self.draw_res)
        h = F.avg_pool2d(img, self.downscale) if img.shape[-1] != self.draw_res else img
        if self.label_map is not None:
            h = torch.cat([h, self.label_map(y).to(h.dtype)], dim=1)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        if self.mbstd is not None:
            h = self.mbstd(h)
        return self.head(h.flatten(1), y)


@torch.no_grad()
def init_weights_(model: nn.Module, scheme: str) -> None:
    """Initialise conv/linear/embedding weights in place.

    "ortho": orthogonal weights, zero biases (BigGAN; used for the ResNet family).
    "normal": N(0, 0.02) weights, BN gains N(1, 0.02), zero biases (DCGAN).
    Spectrally normalised layers get their raw weight initialised and their power-iteration vectors re-seeded.
    """
    # conditional-BN class embeddings stay at zero (every class starts at gain 1, bias 0)
    cbn_embeds = {id(embed) for m in model.modules() if isinstance(m, ConditionalBatchNorm2d)
                  for embed in (m.gain_embed, m.bias_embed) if embed is not None}
    for module in model.modules():
        weighted = isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding))
        if weighted and id(module) not in cbn_embeds:
            is_sn = parametrize.is_parametrized(module, "weight")
            weight = module.parametrizations.weight.original if is_sn else module.weight
            if scheme == "ortho":
                nn.init.orthogonal_(weight)
            else:
                nn.init.normal_(weight, 0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if is_sn:
                for param in module.parametrizations.weight:
                    if isinstance(param, SpectralNormFp32):
                        param.reset_vectors(weight)
        elif isinstance(module, nn.BatchNorm2d) and module.affine and scheme == "normal":
            nn.init.normal_(module.weight, 1.0, 0.02)
            module.bias.zero_()


def build_models(cfg: Config, n_classes: int) -> tuple[nn.Module, nn.Module]:
    """(G, D) for cfg.arch / cfg.cond and the widths in cfg, initialised as their papers."""
    conditional = cfg.cond != "none"
    if conditional and n_classes < 1:
        raise ValueError(f"--cond {cfg.cond} needs labelled data, but the dataset has {n_classes} classes")
    if cfg.attn_res not in (0,) + ATTN_RESOLUTIONS:
        raise ValueError(f"--attn-res {cfg.attn_res}: choose 0 (off) or one of {', '.join(map(str, ATTN_RESOLUTIONS))}")
    n_classes = max(n_classes, 1)
    if cfg.arch == "resnet":
        if cfg.draw_res != MODEL_IMG_SIZE:
            raise ValueError(f"--draw-res {cfg.draw_res} is a DCGAN option (the ResNet G draws at 64): use --arch dcgan")
        if cfg.pixel_norm:
            raise ValueError("--pixel-norm is a DCGAN option (the ResNet G uses batch norm): use --arch dcgan")
        G = ResNetGenerator(cfg.z_dim, n_classes, cfg.g_ch, conditional, cfg.shared_dim, cfg.hier_z,
                            cfg.attn_res, cfg.g_sn)
        D = ResNetDiscriminator(n_classes, cfg.d_ch, cfg.cond, cfg.attn_res, cfg.d_sn, cfg.mbstd)
        scheme = "ortho"
    else:
        # the DCGAN label embedding is shared_dim wide when set, else as wide as z
        label_dim = cfg.shared_dim if cfg.shared_dim > 0 else cfg.z_dim
        G = DCGANGenerator(cfg.z_dim, n_classes, cfg.g_ch, conditional, label_dim, cfg.attn_res, cfg.g_sn,
                           cfg.pixel_norm, cfg.draw_res)
        D = DCGANDiscriminator(n_classes, cfg.d_ch, cfg.cond, cfg.attn_res, cfg.d_sn, cfg.mbstd, cfg.draw_res)
        scheme = "normal"
    init_weights_(G, scheme)
    init_weights_(D, scheme)
    return G, D


def count_params(module: nn.Module) -> int:
    """Trainable parameters (a spectrally normalised weight counts once: its u, v are buffers)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def describe_models(G: nn.Module, D: nn.Module) -> str:
    """One line for the start-up banner: 'G ResNetGenerator 11.44M params | D ResNetDiscriminator 19.67M params'."""
    return (f"G {type(G).__name__} {count_params(G) / 1e6:.2f}M params | "
            f"D {type(D).__name__} {count_params(D) / 1e6:.2f}M params")
