"""RGB + skeleton action recognition networks: two-stream late fusion with optional AMRs,
and the unimodal baselines.

Architecture of the AMR paper (``/work/shared/paper``, Fig. 1 and section 4.2): an I3D
RGB branch and an HCN skeleton branch; the globally pooled ``Mixed_5c`` features and the
HCN fc7 feature are concatenated and classified by one fully connected layer. ``S`` AMRs
sit at the layer pairs of ``config.AMR_PAIRS``, counted back from the classifier:
(Mixed_5c, conv6), (Mixed_5b, conv5), (Mixed_4f, conv4).

The AMR reweighting of each modality only involves that modality's feature, so each
trunk runs once from input to output with hooks that reweight in place; the auxiliary
classifier of an AMR then combines the two pooled vectors its hooks recorded. This is
exactly eqs. 8-10 with both trunks in their natural order.

``arch="rgb"`` and ``arch="skeleton"`` build only their own branch and never touch the
other input, so its gradient is ``None`` (``torch.autograd.grad(..., allow_unused=True)``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .amr import AMR
from .baselines import ExFMem
from .config import AMR_PAIRS, ModelConfig
from .hcn import HCN
from .i3d import I3D

__all__ = ["ActionNet", "ModelOutput", "build_model"]


class ModelOutput(NamedTuple):
    """``logits`` (B, K) of the network; ``aux[i-1]`` (B, K) are AMR i's auxiliary logits
    (empty without AMRs)."""

    logits: torch.Tensor
    aux: list[torch.Tensor]


class ActionNet(nn.Module):
    """The network described by a ``ModelConfig``.

    Submodules (present depending on ``cfg.arch``): ``i3d`` (I3D; logits head only for
    "rgb"), ``hcn`` (HCN; fc8 only for "skeleton"), ``classifier`` (fusion FC), ``amrs``
    (``nn.ModuleList`` of ``AMR``, index i-1 for AMR i).

    ``forward(rgb (B, 3, T, H, W), skel (B, 3, T_s, V, M))``, both in [0, 1] ->
    ``ModelOutput``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.num_classes
        self.i3d = self.hcn = self.classifier = None
        if cfg.arch in ("fusion", "rgb"):
            self.i3d = I3D(k if cfg.arch == "rgb" else 0, width=cfg.i3d_width, dropout=cfg.dropout)
        if cfg.arch in ("fusion", "skeleton"):
            self.hcn = HCN(k if cfg.arch == "skeleton" else 0, frames=cfg.skel_frames, joints=cfg.joints,
                           persons=cfg.persons, in_channels=cfg.skel_channels, dropout=cfg.dropout)
        if cfg.arch == "fusion":
            self.dropout = nn.Dropout(cfg.dropout)
            self.classifier = nn.Linear(self.i3d.num_features + self.hcn.num_features, k)
        # ExFMem memory banks (buffers, filled by ``models.train`` after training; identity
        # until then).
        self.exfmem = None
        if cfg.exfmem_size:
            self.exfmem = ExFMem(cfg.exfmem_size, self.i3d.num_features, self.hcn.num_features,
                                 lam=cfg.exfmem_lambda, mix=cfg.exfmem_mix, steps=cfg.exfmem_steps)

        # W_R and W_s take the full feature shapes at the configured input geometry; both
        # trunks know their shapes analytically (no dry run, so even the paper-size model
        # builds instantly).
        self.amrs = nn.ModuleList()
        if cfg.num_amr:
            rgb_shapes = self.i3d.feature_shapes(cfg.rgb_frames, cfg.rgb_size)
            skel_shapes = self.hcn.feature_shapes()
            for layer_rgb, layer_skel in AMR_PAIRS[:cfg.num_amr]:
                self.amrs.append(AMR(rgb_shapes[layer_rgb], skel_shapes[layer_skel], k,
                                     activation=cfg.amr_activation, init=cfg.amr_init,
                                     layer_rgb=layer_rgb, layer_skel=layer_skel))

    # -- forward

    def forward_features(self, rgb: torch.Tensor, skel: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Fusion arch only: ``(rgb feature (B, C), skeleton fc7 feature (B, 256), aux)``,
        the two vectors the classifier concatenates, after all AMRs."""
        if self.cfg.arch != "fusion":
            raise RuntimeError(f"forward_features is for the fusion arch, not {self.cfg.arch!r}")
        if self.amrs and tuple(rgb.shape[2:]) != (self.cfg.rgb_frames, self.cfg.rgb_size, self.cfg.rgb_size):
            # Without AMRs I3D takes any clip size; W_R fixes it.
            raise ValueError(f"AMR weights are built for RGB clips of (T, H, W) = "
                             f"{(self.cfg.rgb_frames, self.cfg.rgb_size, self.cfg.rgb_size)}, "
                             f"got {tuple(rgb.shape[2:])}")
        persons = skel.shape[-1]
        pooled_rgb: dict[int, torch.Tensor] = {}
        pooled_skel: dict[int, torch.Tensor] = {}
        rgb_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        skel_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for i, amr in enumerate(self.amrs):
            rgb_hooks[amr.layer_rgb] = _rgb_hook(amr, i, pooled_rgb)
            skel_hooks[amr.layer_skel] = _skel_hook(amr, i, persons, pooled_skel)

        f_rgb = self.i3d.forward_head(self.i3d.forward_features(rgb, rgb_hooks), pre_logits=True)
        f_skel = self.hcn.forward_head(self.hcn.forward_features(skel, skel_hooks), persons=persons,
                                       pre_logits=True)
        aux = [amr.classify(pooled_rgb[i], pooled_skel[i]) for i, amr in enumerate(self.amrs)]
        return f_rgb, f_skel, aux

    def classify(self, f_rgb: torch.Tensor, f_skel: torch.Tensor) -> torch.Tensor:
        """Fusion arch: logits from the two pooled features of ``forward_features``, through
        the ExFMem banks when they are built, then dropout and the FC classifier."""
        if self.exfmem is not None:
            f_rgb, f_skel = self.exfmem(f_rgb, f_skel)
        return self.classifier(self.dropout(torch.cat([f_rgb, f_skel], dim=1)))

    def forward(self, rgb: torch.Tensor, skel: torch.Tensor) -> ModelOutput:
        if self.cfg.arch == "rgb":
            return ModelOutput(self.i3d(rgb), [])
        if self.cfg.arch == "skeleton":
            return ModelOutput(self.hcn(skel), [])
        f_rgb, f_skel, aux = self.forward_features(rgb, skel)
        return ModelOutput(self.classify(f_rgb, f_skel), aux)

    # -- inspection

    @torch.no_grad()
    def amr_weights(self) -> list[dict]:
        """Effective AMR weights (after the activation), per AMR in index order:
        ``{"index", "layer_rgb", "layer_skel", "mean_rgb", "mean_skel",
        "channel_mean_rgb": [C_R floats], "channel_mean_skel": [C_s floats]}``
        (Table 3 and Fig. 4 of the paper)."""
        out = []
        for i, amr in enumerate(self.amrs, start=1):
            w_rgb, w_skel = amr.effective_weights()
            out.append({
                "index": i,
                "layer_rgb": amr.layer_rgb,
                "layer_skel": amr.layer_skel,
                "mean_rgb": w_rgb.mean().item(),
                "mean_skel": w_skel.mean().item(),
                "channel_mean_rgb": w_rgb.mean(dim=(0, 2, 3, 4)).tolist(),
                "channel_mean_skel": w_skel.mean(dim=(0, 2, 3)).tolist(),
            })
        return out


def _rgb_hook(amr: AMR, i: int, pooled: dict[int, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = amr.reweight_rgb(x)
        pooled[i] = amr.pool_rgb(x)
        return x
    return hook


def _skel_hook(amr: AMR, i: int, persons: int, pooled: dict[int, torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(x: torch.Tensor) -> torch.Tensor:
        x = amr.reweight_skel(x)
        pooled[i] = amr.pool_skel(x, persons)
        return x
    return hook


def build_model(cfg: ModelConfig) -> ActionNet:
    """The network for ``cfg``, freshly initialised."""
    return ActionNet(cfg)
