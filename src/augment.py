"""DiffAugment (Zhao et al. 2020) and flips on device tensors: differentiable, no host syncs, global torch RNG.

Images are [B, C, H, W] in [-1, 1]. Ranges as in the paper: brightness +U(-0.5, 0.5), saturation x U(0, 2),
contrast x U(0.5, 1.5), translation up to 1/8 of the image with zero padding, cutout of a square half the image.
"""
from __future__ import annotations

import torch


def rand_brightness(x: torch.Tensor) -> torch.Tensor:
    # x + U(-0.5, 0.5), one offset per image
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def rand_saturation(x: torch.Tensor) -> torch.Tensor:
    # scale each pixel's deviation from its channel mean by U(0, 2)
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * 2.0) + x_mean


def rand_contrast(x: torch.Tensor) -> torch.Tensor:
    # scale the deviation from the image mean by U(0.5, 1.5)
    x_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - x_mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + x_mean


def translate_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move image b by (dy[b], dx[b]) whole pixels (positive: down, right), filling with zeros.

    out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]], or 0 where that falls outside the image. Done as two products
    with 0/1 shift matrices, out = S_y x S_x (S_y[b, i, k] = [k = i - dy[b]], S_x[b, k, j] = [k = j - dx[b]]): exact,
    and its backward is two more small products, where gathering by index needs a slow scatter-add.
    """
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    shift_rows = (rows[None, None, :] == rows[None, :, None] - dy.reshape(b, 1, 1)).to(x.dtype)  # [B, H, H]
    shift_cols = (cols[None, :, None] == cols[None, None, :] - dx.reshape(b, 1, 1)).to(x.dtype)  # [B, W, W]
    return shift_rows[:, None] @ x @ shift_cols[:, None]


def rand_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    # integer shifts uniform in [-ratio * size, ratio * size] per image and axis
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b,), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b,), device=x.device)
    return translate_images(x, dy, dx)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    # zero a (ratio * size)^2 square centred anywhere in the image (clipped by the border), one per image
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    centre_y = torch.randint(0, h + (1 - size_h % 2), (b, 1), device=x.device)
    centre_x = torch.randint(0, w + (1 - size_w % 2), (b, 1), device=x.device)
    top, left = centre_y - size_h // 2, centre_x - size_w // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size_h)  # [B, H]
    in_cols = (cols >= left) & (cols < left + size_w)  # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


AUGMENT_FNS = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def parse_diffaug_policy(policy: str) -> list[str]:
    """'color,translation,cutout' -> its names, checked; '' -> []."""
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUGMENT_FNS]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(map(repr, unknown))} in --diffaug {policy!r}; "
                         f"valid names: {', '.join(AUGMENT_FNS)} (comma-separated, '' for none)")
    return names


def apply_per_image(fn, x: torch.Tensor, p) -> torch.Tensor:
    """fn(x) for each image with probability p (a float or a 0-dim device tensor, read on the device: no host sync),
    x itself for the others. Both branches are computed and blended, so gradients flow through the chosen one."""
    chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
    return torch.where(chosen, fn(x), x)


def diff_augment(x: torch.Tensor, policy: str | tuple[str, ...], p=1.0) -> torch.Tensor:
    """Apply the policy's ops in order, the same way to real and fake batches (D only ever sees augmented images).

    policy: 'translation,cutout', or its names as parse_diffaug_policy gave them (the loop parses once).

    p: each op is applied to each image independently with this probability (ADA's per-image probability; a float
    or a 0-dim device tensor). p = 1 (a float) is DiffAugment itself, every op on every image, and draws exactly the
    random numbers it always did; p = 0 (a float) returns x.
    """
    names = parse_diffaug_policy(policy) if isinstance(policy, str) else policy
    if isinstance(p, (int, float)) and p <= 0:
        return x
    always = isinstance(p, (int, float)) and p >= 1
    for name in names:
        for fn in AUGMENT_FNS[name]:
            x = fn(x) if always else apply_per_image(fn, x, p)
    return x


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def uint8_to_unit(img_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images -> float32 in [-1, 1] (x / 127.5 - 1), keeping the device and memory layout."""
    if img_uint8.dtype != torch.uint8:
        raise TypeError(f"uint8_to_unit expects a uint8 tensor, got {img_uint8.dtype}")
    return img_uint8.float() / 127.5 - 1.0
