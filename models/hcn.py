"""HCN: Hierarchical Co-occurrence Network for skeleton action recognition.

Paper: "Co-occurrence Feature Learning from Skeleton Data for Action Recognition and
Detection with Hierarchical Aggregation", C. Li, Q. Zhong, D. Xie and S. Pu, IJCAI 2018
(https://arxiv.org/abs/1804.06055).

Layer order, initialisation and the person handling follow the skelact reimplementation
(github.com/hikvision-research/skelact, ``skelact/models/backbones/hcn.py`` + ``CNNHead``,
86.5% NTU-60 X-Sub), without its optional BN after conv1; this is a fresh implementation.

* Two streams of identical shape: positions, and motion = frame difference with a zero
  first frame. Each: conv1 1x1 -> 64 + ReLU, conv2 (3, 1) -> 32, transpose so the joints
  become channels (the co-occurrence trick), conv3 3x3 -> 32 + max-pool 2,
  conv4 3x3 -> 64 + max-pool 2 + dropout.
* The streams are concatenated (128 channels), then conv5 3x3 -> 128 + max-pool 2 + ReLU +
  dropout, conv6 3x3 -> 256 + max-pool 2 + ReLU.
* Persons are folded into the batch (shared weights); after conv6 the flattened features
  are reduced by an element-wise max over persons, then dropout (skelact's ``drop6``),
  fc7 256 + ReLU + dropout, fc8 (the fusion model takes the fc7 feature before that dropout:
  its classifier drops out the concatenated features once).

Input skeletons are ``(N, C, T, V, M)`` in [0, 1]; the network maps them to [-1, 1]
itself with the plain affine ``x * 2 - 1``. Absent bodies (all-zero in [0, 1]) therefore
become a constant -1 body whose motion stream is exactly zero, and are *not* masked back
to 0: a mask computed from the input ("is this body all zero?") is discontinuous, so an
epsilon-sized perturbation of an absent body (e.g. a PGD random start) would flip it to a
present body at -1, a jump far larger than epsilon. The affine map keeps an epsilon-ball
in [0, 1] an exact 2*epsilon-ball for every entry the network sees.

Pooling uses ``ceil_mode=True``, so short clips (e.g. T=8) still leave one position after
the four halvings; for T and the 32-wide coordinate axis divisible by 16 (T=16, 32, 64)
this equals the reference's floor pooling. At T=32, V=25 and 60 classes the model has
0.785 M parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = ["HCN", "STAGES"]

Hooks = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

# Points after which ``forward_features`` calls a hook; "conv4" is the concatenation of
# both streams' conv4 outputs.
STAGES = ("conv4", "conv5", "conv6")

_C1, _C2 = 64, 32  # conv1 width; conv2, conv3 width (= the transposed coordinate axis)


def _pooled(n: int, times: int) -> int:
    """Length after ``times`` max-pools of kernel 2, stride 2, ceil_mode."""
    for _ in range(times):
        n = math.ceil(n / 2)
    return n


# --------------------------------------------------------------------------- blocks


class HCNStream(nn.Module):
    """One HCN input stream: point-level convs, joint transpose, co-occurrence convs.

    ``(N, C, T, V)`` -> ``(N, 64, T/4, 32/4)``.
    """

    def __init__(self, in_channels: int, joints: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _C1, 1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(_C1, _C2, (3, 1), padding=(1, 0))
        # After the transpose the joints are channels: conv3 mixes all joints at once,
        # which is where the co-occurrence features come from.
        self.conv3 = nn.Conv2d(joints, _C2, 3, padding=1)
        self.pool3 = nn.MaxPool2d(2, ceil_mode=True)
        self.conv4 = nn.Conv2d(_C2, 2 * _C2, 3, padding=1)
        self.pool4 = nn.MaxPool2d(2, ceil_mode=True)
        self.drop4 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu1(self.conv1(x)))  # (N, 32, T, V)
        x = x.permute(0, 3, 2, 1)                   # (N, V, T, 32): joints as channels
        x = self.pool3(self.conv3(x))
        return self.drop4(self.pool4(self.conv4(x)))


# --------------------------------------------------------------------------- model


class HCN(nn.Module):
    """Two-stream HCN.

    Arguments:
        num_classes (int): size of the logits; 0 omits fc8 (``forward`` returns fc7).
        frames (int): clip length T; fixes the fc7 input size. Default: 32.
        joints (int): joints V per body. Default: 25.
        persons (int): bodies M per clip. Default: 2.
        in_channels (int): coordinates per joint. Default: 3.
        dropout (float): dropout probability everywhere. Default: 0.5.

    Attributes:
        num_features (int): size of the fc7 feature (256).
        feature_info (dict[str, int]): channels at each name of ``STAGES``.
    """

    def __init__(self, num_classes: int, frames: int = 32, joints: int = 25, persons: int = 2,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.frames, self.joints, self.persons, self.in_channels = frames, joints, persons, in_channels
        self.num_features = 256
        self.feature_info = {"conv4": 4 * _C2, "conv5": 128, "conv6": 256}

        self.position = HCNStream(in_channels, joints, dropout)
        self.motion = HCNStream(in_channels, joints, dropout)
        self.conv5 = nn.Sequential(
            nn.Conv2d(4 * _C2, 128, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True),
            nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.conv6 = nn.Sequential(
            nn.Conv2d(128, 256, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(inplace=True))
        self.drop6 = nn.Dropout(dropout)
        # conv6 leaves 256 x T/16 x 32/16 per person, flattened into fc7.
        _, t6, w6 = self.feature_shapes()["conv6"]
        self.fc7 = nn.Sequential(nn.Linear(256 * t6 * w6, 256), nn.ReLU(inplace=True))
        # fc7's dropout belongs to the classifier, not to the feature: the fusion model returns
        # the fc7 feature before it and applies its own dropout to the concatenated features
        # (with it here too, a skeleton unit survived training with probability 0.25).
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(256, num_classes) if num_classes > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-uniform convolutions as in skelact. Linear layers get He-normal instead of
        # skelact's N(0, 0.01): with the small init the fc7 feature starts ~5x smaller than
        # the pooled I3D feature, and in late fusion (and under SGD) the classifier then learns
        # to ignore the skeleton branch on small datasets.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Analytic per-person ``(C, T', V')`` at each stage (V' is the transposed
        32-wide coordinate axis, not the joints)."""
        return {name: (self.feature_info[name], _pooled(self.frames, k), _pooled(_C2, k))
                for name, k in (("conv4", 2), ("conv5", 3), ("conv6", 4))}

    # -- trunk

    def forward_features(self, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        """``(N, C, T, V, M)`` in [0, 1] -> conv6 map ``(N*M, 256, T/16, 2)``.

        ``hooks[stage](feature) -> feature`` is called after each stage of ``STAGES`` with
        the person-folded ``(N*M, C, T', V')`` feature; its result continues forward.
        """
        hooks = hooks or {}
        unknown = set(hooks) - set(STAGES)
        if unknown:
            raise KeyError(f"unknown HCN stages for hooks: {sorted(unknown)}")
        n, c, t, v, m = x.shape
        if (c, t, v) != (self.in_channels, self.frames, self.joints):
            raise ValueError(f"HCN built for (C, T, V) = {(self.in_channels, self.frames, self.joints)}, "
                             f"got {(c, t, v)}")
        x = x * 2.0 - 1.0
        x = x.permute(0, 4, 1, 2, 3).reshape(n * m, c, t, v)  # persons share the weights
        motion = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)

        x = torch.cat([self.position(x), self.motion(motion)], dim=1)
        if "conv4" in hooks:
            x = hooks["conv4"](x)
        x = self.conv5(x)
        if "conv5" in hooks:
            x = hooks["conv5"](x)
        x = self.conv6(x)
        if "conv6" in hooks:
            x = hooks["conv6"](x)
        return x

    # -- head

    def forward_head(self, x: torch.Tensor, persons: int | None = None, pre_logits: bool = False) -> torch.Tensor:
        """Max over persons, fc7 and fc8 on a conv6 map ``(N*M, 256, T', V')``.

        ``persons`` is M (default: the constructor's). ``pre_logits=True`` (or
        ``num_classes=0``) returns the fc7 feature ``(N, 256)`` used by the fusion model,
        before fc7's dropout (the fusion classifier has its own).
        """
        m = persons or self.persons
        x = x.reshape(x.shape[0] // m, m, -1).amax(dim=1)
        x = self.fc7(self.drop6(x))
        if pre_logits or self.fc8 is None:
            return x
        return self.fc8(self.drop7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, V, M)`` in [0, 1] -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x), persons=x.shape[-1])
