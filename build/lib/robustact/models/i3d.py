"""I3D: the Two-Stream Inflated 3D ConvNet (RGB stream), Inception-v1 inflated to 3-D.

Paper: "Quo Vadis, Action Recognition? A New Model and the Kinetics Dataset",
J. Carreira and A. Zisserman, CVPR 2017 (https://arxiv.org/abs/1705.07750).

Layer layout, endpoint names and TensorFlow "SAME" padding follow the DeepMind reference
(github.com/deepmind/kinetics-i3d, ``i3d.py``) and its PyTorch port
(github.com/piergiaj/pytorch-i3d); this is a fresh implementation with two additions for
CPU-sized experiments:

* ``width`` multiplies every channel count (``max(1, round(c * width))``, half rounding
  up), so ``width=0.25`` is a quarter-width network with the same topology;
* the head averages globally (adaptive pooling) instead of the reference's fixed
  ``2x7x7`` window, so any clip of at least one frame and pixel runs (e.g. 8x32x32).

Input clips are ``(B, 3, T, H, W)`` in [0, 1]; the network maps them to [-1, 1] itself
(the range the reference was trained on). At full width with 60 classes the model has
12.35 M parameters.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["I3D", "ENDPOINTS", "same_padding"]

Hooks = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

# Endpoint names in forward order (those of the DeepMind reference).
ENDPOINTS = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
    "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
)

# Inception branch widths [1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1] at full width.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

# Max-pool endpoints: (kernel, stride), both (t, h, w).
_POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one dimension: ``(before, after)``.

    The output has ``ceil(size / stride)`` positions; any odd total padding goes *after*
    (TF's convention, which differs from a symmetric PyTorch ``padding=``).
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float) -> torch.Tensor:
    """Pad the last three dims of ``x`` for a TF-SAME window; F.pad lists dims last first."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[-3:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads, value=value) if any(pads) else x


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


# --------------------------------------------------------------------------- blocks


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d(eps=1e-3) -> ReLU with TF-SAME padding.

    With stride 1 and odd kernels SAME padding is symmetric and independent of the input
    size, so it is done by the convolution itself (no extra copy of the activation); the
    strided stem convolution pads asymmetrically, computed from the input size.
    BN keeps PyTorch's momentum 0.1 rather than TF's 0.999 decay (momentum 0.001): the
    short CPU runs this project trains would otherwise evaluate with running statistics
    still close to their initial values.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 1,
                 stride: int | Sequence[int] = 1):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.static = all(s == 1 for s in self.stride) and all(k % 2 for k in self.kernel_size)
        padding = tuple(k // 2 for k in self.kernel_size) if self.static else 0
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, self.stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            x = _pad_same(x, self.kernel_size, self.stride, 0.0)
        return self.act(self.bn(self.conv(x)))


class MaxPool3dSame(nn.Module):
    """3-D max pooling with TF-SAME padding.

    Padding is -inf, never 0: TF ignores padded positions in a max, and features entering
    a pool can be negative (an AMR with the identity activation may learn negative
    weights), so zero padding would change the result. The stride-1 pools of the
    Inception branches pad symmetrically, which max_pool3d's own (implicit -inf) padding
    does without a copy.
    """

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int]):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.static = all(s == 1 for s in self.stride) and all(k % 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static:
            return F.max_pool3d(x, self.kernel_size, 1, padding=tuple(k // 2 for k in self.kernel_size))
        x = _pad_same(x, self.kernel_size, self.stride, float("-inf"))
        return F.max_pool3d(x, self.kernel_size, self.stride)


class InceptionBlock(nn.Module):
    """Inflated Inception-v1 module: four branches concatenated along channels.

    ``channels = (b0, b1a, b1b, b2a, b2b, b3)``: 1x1 -> b0 | 1x1 -> b1a, 3x3 -> b1b |
    1x1 -> b2a, 3x3 -> b2b | 3x3x3 max-pool (stride 1) -> 1x1 -> b3.
    """

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = channels
        self.branch0 = Unit3D(in_channels, c0, 1)
        self.branch1 = nn.Sequential(Unit3D(in_channels, c1a, 1), Unit3D(c1a, c1b, 3))
        self.branch2 = nn.Sequential(Unit3D(in_channels, c2a, 1), Unit3D(c2a, c2b, 3))
        self.branch3 = nn.Sequential(MaxPool3dSame(3, 1), Unit3D(in_channels, c3, 1))
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


# --------------------------------------------------------------------------- model


class I3D(nn.Module):
    """Inception-v1 I3D for RGB clips.

    Arguments:
        num_classes (int): size of the logits; 0 builds the trunk and pooling only
            (``forward`` then returns the pooled ``Mixed_5c`` features).
        width (float): channel multiplier; every channel count ``c`` becomes
            ``max(1, round(c * width))``. Default: 1.0.
        in_channels (int): input channels. Default: 3.
        dropout (float): dropout before the logits. Default: 0.5.

    Attributes:
        features (nn.ModuleDict): the trunk, one entry per name of ``ENDPOINTS``, in order.
        num_features (int): channels of ``Mixed_5c`` (1024 at full width).
        feature_info (dict[str, int]): output channels of every endpoint.
    """

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.num_classes = num_classes
        self.width = width
        # Strides of every endpoint, used for analytic feature shapes.
        self._strides: dict[str, tuple[int, int, int]] = {}

        def ch(c: int) -> int:
            return max(1, int(math.floor(c * width + 0.5)))

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        info: dict[str, int] = {}
        c = in_channels
        for name in ENDPOINTS:
            if name == "Conv3d_1a_7x7":
                layers[name], c = Unit3D(c, ch(64), 7, 2), ch(64)
                self._strides[name] = (2, 2, 2)
            elif name == "Conv3d_2b_1x1":
                layers[name], c = Unit3D(c, ch(64), 1), ch(64)
            elif name == "Conv3d_2c_3x3":
                layers[name], c = Unit3D(c, ch(192), 3), ch(192)
            elif name in _POOLS:
                kernel, stride = _POOLS[name]
                layers[name] = MaxPool3dSame(kernel, stride)
                self._strides[name] = stride
            else:
                block = InceptionBlock(c, [ch(v) for v in _MIXED[name]])
                layers[name], c = block, block.out_channels
            info[name] = c
        self.features = nn.ModuleDict(layers)
        self.feature_info = info
        self.num_features = c

        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        # The reference's logits layer is a 1x1x1 convolution with bias (no BN, no ReLU).
        self.logits = nn.Conv3d(c, num_classes, 1, bias=True) if num_classes > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        # He (fan-in) init for the ReLU units. PyTorch's default conv init shrinks the
        # signal ~6x per unit, so a fresh model in eval mode (BN running stats still 0/1)
        # would end in ~1e-6 activations and denormal gradients, which are both useless
        # to an attack and extremely slow on CPU. The logits conv keeps the default init.
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv3d) and not name.startswith("logits"):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- trunk

    def forward_features(self, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        """Run the trunk on a [0, 1] clip ``(B, C, T, H, W)`` and return the ``Mixed_5c`` map.

        ``hooks[name](feature) -> feature`` is called right after endpoint ``name`` and its
        result replaces the feature for the rest of the trunk (this is how AMRs reweight).
        """
        hooks = hooks or {}
        unknown = set(hooks) - set(self.features)
        if unknown:
            raise KeyError(f"unknown I3D endpoints for hooks: {sorted(unknown)}")
        x = x * 2.0 - 1.0
        for name, layer in self.features.items():
            x = layer(x)
            if name in hooks:
                x = hooks[name](x)
        return x

    def feature_shapes(self, frames: int, size: int) -> dict[str, tuple[int, int, int, int]]:
        """Analytic ``(C, T, H, W)`` of every endpoint for a ``frames x size x size`` clip.

        TF-SAME layers output ``ceil(input / stride)`` per dimension; no forward pass needed.
        """
        t, h, w = frames, size, size
        shapes = {}
        for name in ENDPOINTS:
            st, sh, sw = self._strides.get(name, (1, 1, 1))
            t, h, w = math.ceil(t / st), math.ceil(h / sh), math.ceil(w / sw)
            shapes[name] = (self.feature_info[name], t, h, w)
        return shapes

    # -- head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of a ``Mixed_5c`` map, then dropout and the logits conv.

        ``pre_logits=True`` (or ``num_classes=0``) returns the pooled ``(B, num_features)``.
        """
        x = self.pool(x)
        if pre_logits or self.logits is None:
            return x.flatten(1)
        return self.logits(self.dropout(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` in [0, 1] -> logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))
