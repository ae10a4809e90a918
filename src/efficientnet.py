"""EfficientNet-Lite0 (TensorFlow origin) with EfficientNet-PyTorch key names: an offline FID backbone.

Lite = EfficientNet-B0 without squeeze-excite, ReLU6 instead of swish, stem 32 / head 1280 fixed.
TensorFlow "same" padding (asymmetric for stride 2) and BatchNorm eps 1e-3 as in the TF checkpoint.
`features` maps [0,1] RGB images of any size to the 1280-d globally pooled head activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EFFNET_LITE0_DIM = 1280
EFFNET_LITE0_INPUT_SIZE = 224
EFFNET_BN_EPS = 1e-3        # TF batch_norm_epsilon
EFFNET_BN_MOMENTUM = 0.01   # TF decay 0.99 in torch's convention (only matters if ever trained)

# Stages of Lite0: (repeats, kernel, first stride, expand ratio, out channels); B0 widths, no SE.
EFFNET_LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class EffNetSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding: output = ceil(input / stride), extra pad at bottom/right."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = _effnet_same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _effnet_same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h[0] == pad_h[1] and pad_w[0] == pad_w[1]:
            # symmetric: let the convolution pad (no extra copy of the activation)
            return F.conv2d(x, self.weight, None, self.stride, (pad_h[0], pad_w[0]), 1, self.groups)
        x = F.pad(x, (pad_w[0], pad_w[1], pad_h[0], pad_h[1]))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _effnet_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    # total = max((ceil(i/s) - 1) * s + k - i, 0), split floor before / ceil after
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _effnet_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EFFNET_BN_EPS, momentum=EFFNET_BN_MOMENTUM)


class EffNetLiteBlock(nn.Module):
    """MBConv without SE: [1x1 expand] -> depthwise kxk -> 1x1 project; identity skip when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = EffNetSameConv2d(in_ch, mid, 1)
            self._bn0 = _effnet_bn(mid)
        self._depthwise_conv = EffNetSameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _effnet_bn(mid)
        self._project_conv = EffNetSameConv2d(mid, out_ch, 1)
        self._bn2 = _effnet_bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ImageNet-1k; loads efficientnet-lite0.pth strictly."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = EffNetSameConv2d(3, 32, 3, stride=2)
        self._bn0 = _effnet_bn(32)
        blocks, in_ch = [], 32
        for repeats, kernel, stride, expand, out_ch in EFFNET_LITE0_STAGES:
            for i in range(repeats):
                blocks.append(EffNetLiteBlock(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = EffNetSameConv2d(in_ch, EFFNET_LITE0_DIM, 1)
        self._bn1 = _effnet_bn(EFFNET_LITE0_DIM)
        self._fc = nn.Linear(EFFNET_LITE0_DIM, num_classes)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Pooled head activations: bilinear resize to 224, scale (x*255 - 127) / 128, trunk, mean."""
        x = F.interpolate(x01, size=(EFFNET_LITE0_INPUT_SIZE, EFFNET_LITE0_INPUT_SIZE),
                          mode="bilinear", align_corners=False)
        x = (x * 255.0 - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return x.mean(dim=(2, 3))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (standard 1000-class order); dropout is a no-op at inference."""
        return self._fc(self.features(x01))
