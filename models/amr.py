"""AMR: the Attention-based Modality Reweighter (eqs. 8-10).

Paper: "Adversarial Robustness in RGB-Skeleton Action Recognition: Leveraging Attention
Modality Reweighter" (``/work/shared/paper``, section 3.3). No public code exists; this
follows the text:

* eq. 8: two learnable tensors with the *full* feature shapes, ``W_R (1, C_R, T_R, H, W)``
  and ``W_s (1, C_s, T_s, V)``, are broadcast over the batch and multiplied elementwise
  with the features of a pair of hidden layers; the reweighted features continue forward;
* eq. 9: each reweighted feature is globally average-pooled (3-D for RGB, 2-D for the
  skeleton);
* eq. 10: the two vectors are concatenated and a fully connected layer gives the
  auxiliary prediction ``y*``.

The skeleton network folds persons into the batch, so its features are
``(B*M, C_s, T_s, V')`` and one ``W_s`` is shared by all persons; the pooled skeleton
vector is reduced with a max over persons, as the skeleton network itself does before fc7.

Parametrisation (not given by the paper, see ``ModelConfig.amr_activation``): the learned
parameter passes through an activation to give the effective weight. "sigmoid" keeps W in
(0, 1) (parameter 0 -> W = 0.5, consistent with the 0.31-0.49 means of the paper's
Table 3); "identity" uses the parameter as is, kept in [0, 1] by ``project_`` after every
optimiser step (the training loop calls it); init 0.5 starts where the sigmoid does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["AMR", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "identity": lambda p: p}


class AMR(nn.Module):
    """One AMR between an RGB feature map and a skeleton feature map.

    Arguments:
        rgb_shape (Sequence[int]): per-sample RGB feature shape ``(C_R, T_R, H, W)``.
        skel_shape (Sequence[int]): per-person skeleton feature shape ``(C_s, T_s, V')``.
        num_classes (int): size of the auxiliary logits.
        activation (str): "sigmoid" or "identity"; maps the parameters to the effective
            weights. Default: "sigmoid".
        init (float): initial value of every parameter entry. Default: 0.0.
        layer_rgb, layer_skel (str): names of the layers this AMR sits after (reporting).

    Parameters:
        w_rgb (1, C_R, T_R, H, W), w_skel (1, C_s, T_s, V'): the weights before the
            activation; ``effective_weights()`` gives ``(W_R, W_s)``.
        fc: ``Linear(C_R + C_s, num_classes)``, the auxiliary classifier.
    """

    def __init__(self, rgb_shape: Sequence[int], skel_shape: Sequence[int], num_classes: int,
                 activation: str = "sigmoid", init: float = 0.0, layer_rgb: str = "", layer_skel: str = ""):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if len(rgb_shape) != 4 or len(skel_shape) != 3:
            raise ValueError(f"expected (C, T, H, W) and (C, T, V) shapes, got {rgb_shape} and {skel_shape}")
        self.activation = activation
        self.layer_rgb, self.layer_skel = layer_rgb, layer_skel
        self.w_rgb = nn.Parameter(torch.full((1, *rgb_shape), float(init)))
        self.w_skel = nn.Parameter(torch.full((1, *skel_shape), float(init)))
        self.fc = nn.Linear(rgb_shape[0] + skel_shape[0], num_classes)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep identity-parametrised weights in [0, 1] (projected gradient descent); the
        sigmoid needs nothing."""
        if self.activation == "identity":
            self.w_rgb.clamp_(0.0, 1.0)
            self.w_skel.clamp_(0.0, 1.0)

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_R, W_s)`` after the activation, shaped like the parameters."""
        act = ACTIVATIONS[self.activation]
        return act(self.w_rgb), act(self.w_skel)

    # Building blocks, also used by the fusion model, which reweights each modality inside
    # its own trunk (via hooks) and classifies once both pooled vectors exist.

    def reweight_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for RGB: ``(B, C_R, T_R, H, W) * W_R``."""
        return x * ACTIVATIONS[self.activation](self.w_rgb)

    def reweight_skel(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 8 for the skeleton: ``(B*M, C_s, T_s, V') * W_s`` (shared by persons)."""
        return x * ACTIVATIONS[self.activation](self.w_skel)

    @staticmethod
    def pool_rgb(x: torch.Tensor) -> torch.Tensor:
        """Eq. 9, RGB: 3-D global average pool -> ``(B, C_R)``."""
        return x.mean(dim=(2, 3, 4))

    @staticmethod
    def pool_skel(x: torch.Tensor, persons: int) -> torch.Tensor:
        """Eq. 9, skeleton: 2-D global average pool per person, max over persons -> ``(B, C_s)``."""
        z = x.mean(dim=(2, 3))
        return z.reshape(z.shape[0] // persons, persons, -1).amax(dim=1)

    def classify(self, z_rgb: torch.Tensor, z_skel: torch.Tensor) -> torch.Tensor:
        """Eq. 10: auxiliary logits ``(B, K)`` from the concatenated pooled vectors."""
        return self.fc(torch.cat([z_rgb, z_skel], dim=1))

    def forward(self, x_rgb: torch.Tensor, x_skel: torch.Tensor, persons: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, C_R, T_R, H, W)``, ``(B*M, C_s, T_s, V')``, M -> (reweighted RGB,
        reweighted skeleton, auxiliary logits ``(B, K)``)."""
        x_rgb, x_skel = self.reweight_rgb(x_rgb), self.reweight_skel(x_skel)
        aux = self.classify(self.pool_rgb(x_rgb), self.pool_skel(x_skel, persons))
        return x_rgb, x_skel, aux

    def extra_repr(self) -> str:
        return (f"rgb={self.layer_rgb}{tuple(self.w_rgb.shape[1:])}, "
                f"skel={self.layer_skel}{tuple(self.w_skel.shape[1:])}, activation={self.activation}")
