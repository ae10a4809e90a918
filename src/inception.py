"""The FID Inception (TensorFlow 2015-12-05 graph, as ported by pytorch-fid): pool_3 features, 2048-d.

Layer names and shapes follow torchvision's Inception3 so that pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` loads with strict=True; the blocks are the FID variants
(TensorFlow's average pool ignores padded zeros; the last block max-pools), 1008 classes, no aux head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_INCEPTION_DIM = 2048
FID_INCEPTION_INPUT_SIZE = 299


class FIDConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (TF eps 1e-3) + ReLU: torchvision's BasicConv2d layout."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _fid_tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool divides by the number of real (non-padded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = FIDConvBN(in_ch, 64, 1)
        self.branch5x5_1 = FIDConvBN(in_ch, 48, 1)
        self.branch5x5_2 = FIDConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = FIDConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = FIDConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = FIDConvBN(96, 96, 3, padding=1)
        self.branch_pool = FIDConvBN(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_fid_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | 1x1-3x3-strided 3x3 | maxpool."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = FIDConvBN(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = FIDConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = FIDConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = FIDConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = FIDConvBN(in_ch, 192, 1)
        self.branch7x7_1 = FIDConvBN(in_ch, c7, 1)
        self.branch7x7_2 = FIDConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = FIDConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = FIDConvBN(in_ch, c7, 1)
        self.branch7x7dbl_2 = FIDConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = FIDConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = FIDConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = FIDConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = FIDConvBN(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_fid_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class FIDInceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = FIDConvBN(in_ch, 192, 1)
        self.branch3x3_2 = FIDConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = FIDConvBN(in_ch, 192, 1)
        self.branch7x7x3_2 = FIDConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = FIDConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = FIDConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b: average pool, Mixed_7c: max pool as in the FID graph)."""

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = FIDConvBN(in_ch, 320, 1)
        self.branch3x3_1 = FIDConvBN(in_ch, 384, 1)
        self.branch3x3_2a = FIDConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = FIDConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = FIDConvBN(in_ch, 448, 1)
        self.branch3x3dbl_2 = FIDConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = FIDConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = FIDConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = FIDConvBN(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _fid_tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception; `features` maps [0,1] RGB images of any size to pool_3 (N x 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = FIDConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = FIDConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = FIDConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = FIDConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = FIDConvBN(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = FIDInceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = FIDInceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FID_INCEPTION_DIM, 1008)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """pool_3 activations: bilinear resize to 299, scale [0,1] -> [-1,1], trunk, global mean."""
        x = F.interpolate(x01, size=(FID_INCEPTION_INPUT_SIZE, FID_INCEPTION_INPUT_SIZE),
                          mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Logits over the graph's 1008 classes (only for sanity checks; FID uses `features`)."""
        return self.fc(self.features(x01))
