"""The multimodal defences of Tian & Xu (CVPR 2021), the paper's MinSim and ExFMem baselines.

MinSim (the audio-visual "dissimilarity constraint", here RGB-skeleton: multimodal
dispersion and unimodal compactness): trained on clean inputs with

    L = CE(f(x_R, x_s), y) + β · (1/B) Σ_b cos(P_R f_R^b, P_s f_s^b)
          + γ · ½ Σ_{m ∈ {R, s}} (1/B) Σ_b (1 − cos(z_m^b, c_m^{y_b}))

with z_m^b = P_m f_m^b / ‖P_m f_m^b‖ and c_m^y the mean of z_m over the batch's clips of
class y. The first term disperses the modalities (a clip's two features point apart); the
second compacts each modality (its features of one class point together), so dispersion
cannot be bought by scattering a modality's features at random. β = γ = 1 by default
(``minsim_beta``, ``minsim_gamma``). We read the form of the compactness term from the
method's description (Tian & Xu's equations are not reproduced in the AMR paper); γ = 0
gives the cross-modal term alone.

where f_R (B, C_R) and f_s (B, 256) are the two pooled features the fusion classifier
concatenates. The widths differ (C_R = 1024·width), so each is mapped to a common
``dim`` by a projection. The projections are *fixed* random Gaussian matrices (seeded,
entries N(0, 1/dim), i.e. linear heads frozen at initialisation), not learned: learnable
heads trained on this loss alone can drive the similarity towards −1 on their own (map the
two mean features to opposite directions) without moving the features at all, which would
make the constraint vacuous. A fixed random projection approximately preserves inner
products (Johnson-Lindenstrauss), so the network itself has to pull the modalities apart.

ExFMem (external feature memory banks): after training, each modality keeps a fixed bank
D (N unit-norm training features, as columns). At inference a pooled feature f is
sparse-coded over its bank with ISTA on the direction f̂ = f/‖f‖ (so λ is scale-free),

    h = argmin_h ½‖f̂ − D h‖² + λ‖h‖₁     (K iterations, step 1/L, L = λ_max(DᵀD))

and mixed back before the classifier: f ← a·‖f‖·D h + (1 − a)·f. Every step is a plain
tensor op (soft-thresholding is differentiable almost everywhere), so white-box attacks
differentiate through the K ISTA iterations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExFMem", "ista", "minsim_compactness", "minsim_projection", "minsim_similarity", "soft_threshold"]

MINSIM_SEED = 0


@functools.lru_cache(maxsize=8)
def _projection_cpu(in_features: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + in_features)
    return torch.randn(in_features, dim, generator=g) / dim ** 0.5


def minsim_projection(in_features: int, dim: int, seed: int = MINSIM_SEED) -> torch.Tensor:
    """The fixed (in_features, dim) projection of a modality's feature into the common space.
    Deterministic in (in_features, dim, seed); ``minsim_similarity`` uses seed 0 for RGB and
    1 for the skeleton, so the two matrices are independent even when the widths agree."""
    return _projection_cpu(in_features, dim, seed)


def minsim_similarity(f_rgb: torch.Tensor, f_skel: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Batch mean of cos(P_R f_R, P_s f_s): the MinSim term (a scalar in [−1, 1])."""
    p_rgb = minsim_projection(f_rgb.shape[1], dim, MINSIM_SEED).to(f_rgb)
    p_skel = minsim_projection(f_skel.shape[1], dim, MINSIM_SEED + 1).to(f_skel)
    return F.cosine_similarity(f_rgb @ p_rgb, f_skel @ p_skel, dim=1, eps=1e-8).mean()


def minsim_compactness(f: torch.Tensor, labels: torch.Tensor, dim: int = 128, seed: int = MINSIM_SEED) -> torch.Tensor:
    """MinSim's unimodal compactness term for one modality: the batch mean of
    1 − cos(P f_i, c_{y_i}), where c_y is the mean of the unit-normalised projected features
    of the batch's clips of class y (its own included). 0 when every class's features point
    the same way; a clip alone in its class in the batch adds 0. Same projection as
    ``minsim_similarity`` (``seed``: 0 for RGB, 1 for the skeleton)."""
    z = F.normalize(f @ minsim_projection(f.shape[1], dim, seed).to(f), dim=1, eps=1e-8)
    classes, index = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, index, z)
    counts = torch.bincount(index, minlength=len(classes)).to(z.dtype)
    centroids = sums / counts[:, None]
    return (1 - F.cosine_similarity(z, centroids[index], dim=1, eps=1e-8)).mean()


def soft_threshold(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The proximal operator of t·‖·‖₁: sign(x)·max(|x| − t, 0)."""
    return torch.sign(x) * torch.relu(x.abs() - t)


def ista(f: torch.Tensor, bank: torch.Tensor, lam: float, steps: int,
         lipschitz: torch.Tensor | float | None = None) -> torch.Tensor:
    """ISTA for the lasso h = argmin ½‖f − Dh‖² + λ‖h‖₁, batched.

    ``f`` (B, C); ``bank`` (N, C) holds the atoms as rows, i.e. D = bankᵀ (C, N); returns
    h (B, N). Starts at h = 0 and takes ``steps`` proximal-gradient steps of size 1/L,
    L = λ_max(DᵀD) (computed here when not given). Differentiable in ``f``.
    """
    if lipschitz is None:
        lipschitz = torch.linalg.matrix_norm(bank, ord=2) ** 2
    step = 1.0 / torch.clamp(torch.as_tensor(lipschitz, dtype=f.dtype, device=f.device), min=1e-12)
    gram = bank @ bank.T           # DᵀD (N, N)
    corr = f @ bank.T              # (Dᵀf)ᵀ (B, N)
    h = torch.zeros_like(corr)
    for _ in range(steps):
        h = soft_threshold(h - step * (h @ gram - corr), step * lam)
    return h


class ExFMem(nn.Module):
    """Fixed memory banks of training features, one per modality, as buffers (so they are
    part of ``model.safetensors``).

    Buffers: ``bank_rgb`` (N, C_R) and ``bank_skel`` (N, C_s), unit-norm rows;
    ``lipschitz`` (2,) = λ_max(DᵀD) per bank; ``count`` (scalar) = number of filled rows.
    While ``count`` is 0 (before ``build``, i.e. during training) the module is the
    identity.
    """

    def __init__(self, size: int, rgb_features: int, skel_features: int, lam: float, mix: float, steps: int):
        super().__init__()
        self.size, self.lam, self.mix, self.steps = size, lam, mix, steps
        self.register_buffer("bank_rgb", torch.zeros(size, rgb_features))
        self.register_buffer("bank_skel", torch.zeros(size, skel_features))
        self.register_buffer("lipschitz", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def built(self) -> bool:
        return int(self.count) > 0

    @torch.no_grad()
    def build(self, f_rgb: torch.Tensor, f_skel: torch.Tensor) -> None:
        """Fill the banks with (up to ``size``) training features, normalised to unit norm."""
        n = min(self.size, f_rgb.shape[0])
        if n < 1 or f_skel.shape[0] < n:
            raise ValueError("ExFMem.build needs at least one feature of each modality")
        self.bank_rgb.zero_()
        self.bank_skel.zero_()
        for i, (bank, feats) in enumerate(((self.bank_rgb, f_rgb), (self.bank_skel, f_skel))):
            atoms = F.normalize(feats[:n].to(bank), dim=1, eps=1e-8)
            bank[:n] = atoms
            self.lipschitz[i] = torch.linalg.matrix_norm(atoms, ord=2) ** 2
        self.count.fill_(n)

    def code(self, f: torch.Tensor, which: int) -> torch.Tensor:
        """Sparse-code ``f`` (B, C) over bank ``which`` (0 RGB, 1 skeleton) and mix back."""
        bank = (self.bank_rgb, self.bank_skel)[which][: int(self.count)]
        norm = f.norm(dim=1, keepdim=True)
        direction = f / norm.clamp_min(1e-8)
        h = ista(direction, bank, self.lam, self.steps, self.lipschitz[which])
        return self.mix * norm * (h @ bank) + (1.0 - self.mix) * f

    def forward(self, f_rgb: torch.Tensor, f_skel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.built:
            return f_rgb, f_skel
        return self.code(f_rgb, 0), self.code(f_skel, 1)
