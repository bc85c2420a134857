"""Frozen configs shared by the networks, attacks, training and evaluation.

Every config round-trips through plain JSON (``to_dict`` / ``from_dict``) so it can be
stored next to a checkpoint or a report and reloaded without pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

ARCHES = ("fusion", "rgb", "skeleton")
DEFENCES = ("none", "at-r", "at-s", "at-rs", "amr", "amr-frozen", "minsim", "exfmem", "minsim-exfmem")
# Eq. 12's objective with the AMR heads; "amr-frozen" keeps every AMR's W at its initial
# value (0.5 under the sigmoid): the ablation that separates the loss from the reweighting.
AMR_DEFENCES = ("amr", "amr-frozen")
# Tian & Xu (CVPR 2021) baselines: defences that add the MinSim term / build ExFMem banks.
MINSIM_DEFENCES = ("minsim", "minsim-exfmem")
EXFMEM_DEFENCES = ("exfmem", "minsim-exfmem")
# Bank entries per modality when a defence uses ExFMem and ModelConfig.exfmem_size is 0.
EXFMEM_DEFAULT_SIZE = 512
OPTIMIZERS = ("sgd", "adam")
ATTACKS = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "square")
# Gradient-based attacks (Square is score-based: it only reads logits).
GRADIENT_ATTACKS = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr")
# Default iterations (queries for Square) when an attack spec gives none: the paper's PGD20
# and CW30, AutoAttack's 100 APGD iterations and 5,000 Square queries.
DEFAULT_STEPS = {"fgsm": 1, "pgd": 20, "cw": 30, "apgd-ce": 100, "apgd-dlr": 100, "square": 5000}
# Upper bounds of an attack's iterations and of Square's queries, so that one request (or a
# CLI typo) cannot ask for a run of years: 1000 is 50x the paper's PGD20 and 10x AutoAttack's
# APGD; 10,000 queries is twice AutoAttack's standard Square budget.
MAX_STEPS = 1000
MAX_QUERIES = 10_000
MODES = ("R", "S", "RS")
AMR_ACTIVATIONS = ("sigmoid", "identity")

# AMR pairs, counted back from the classifier: the i-th AMR sits at PAIRS[i].
AMR_PAIRS = (("Mixed_5c", "conv6"), ("Mixed_5b", "conv5"), ("Mixed_4f", "conv4"))


def max_steps(attack: str) -> int:
    """Largest iteration count of ``attack`` (query budget for Square)."""
    return MAX_QUERIES if attack == "square" else MAX_STEPS


class ConfigError(ValueError):
    """A config field holds a value outside its domain. ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown field for {cls.__name__}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a network; enough to rebuild it from scratch.

    Inputs are RGB ``(B, 3, rgb_frames, rgb_size, rgb_size)`` and skeleton
    ``(B, skel_channels, skel_frames, joints, persons)``, both in [0, 1]. NTU RGB+D: 3
    coordinates (x, y, z in metres), 25 joints, 2 bodies; iMiGUE-style 2-D pose: 2
    coordinates (image x, y), 22 upper-body joints, 1 body.
    """

    arch: str = "fusion"
    num_classes: int = 60
    rgb_frames: int = 64
    rgb_size: int = 224
    skel_frames: int = 32
    joints: int = 25
    persons: int = 2
    skel_channels: int = 3
    i3d_width: float = 1.0
    dropout: float = 0.5
    num_amr: int = 0
    # AMR weight parametrisation. The paper gives neither; the default keeps W in (0, 1)
    # through a sigmoid of a parameter initialised at 0 (W = 0.5 at the start), which
    # matches the 0.31-0.49 means of its Table 3. "identity" with init 1.0 starts as a no-op.
    amr_activation: str = "sigmoid"
    amr_init: float = 0.0
    # ExFMem (Tian & Xu 2021), fusion arch only: N training features per modality kept as
    # buffers (0 = no memory banks); at inference each pooled feature is sparse-coded over
    # its bank by `exfmem_steps` ISTA iterations with L1 weight `exfmem_lambda` (on the
    # unit-normalised feature) and mixed back as a·Dh + (1-a)·f with a = `exfmem_mix`.
    exfmem_size: int = 0
    exfmem_lambda: float = 0.05
    exfmem_mix: float = 0.5
    exfmem_steps: int = 20

    def __post_init__(self):
        if self.arch not in ARCHES:
            raise ConfigError("arch", f"must be one of {ARCHES}, got {self.arch!r}")
        if self.num_classes < 2:
            raise ConfigError("num_classes", "must be at least 2")
        if not 0 <= self.num_amr <= len(AMR_PAIRS):
            raise ConfigError("num_amr", f"must be in 0..{len(AMR_PAIRS)}, got {self.num_amr}")
        if self.num_amr and self.arch != "fusion":
            raise ConfigError("num_amr", "AMR needs the two-stream fusion model")
        if self.amr_activation not in AMR_ACTIVATIONS:
            raise ConfigError("amr_activation", f"must be one of {AMR_ACTIVATIONS}")
        if self.i3d_width <= 0:
            raise ConfigError("i3d_width", "must be positive")
        if self.exfmem_size < 0:
            raise ConfigError("exfmem_size", "must be >= 0")
        if self.exfmem_size and self.arch != "fusion":
            raise ConfigError("exfmem_size", "ExFMem needs the two-stream fusion model")
        if self.exfmem_lambda < 0:
            raise ConfigError("exfmem_lambda", "must be >= 0")
        if not 0 <= self.exfmem_mix <= 1:
            raise ConfigError("exfmem_mix", "must be in [0, 1]")
        if self.exfmem_steps < 1:
            raise ConfigError("exfmem_steps", "must be at least 1")
        for name in ("rgb_frames", "rgb_size", "skel_frames", "joints", "persons"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be positive")
        if self.skel_channels not in (2, 3):
            raise ConfigError("skel_channels", f"must be 2 (x, y) or 3 (x, y, z), got {self.skel_channels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


def resolve_model_config(model_cfg: ModelConfig, train_cfg: "TrainConfig") -> ModelConfig:
    """Check that a model config fits a defence and fill the defaults the defence implies.

    MinSim and ExFMem need the fusion arch (two modality features). A defence using ExFMem
    gets ``exfmem_size = EXFMEM_DEFAULT_SIZE`` when the model config leaves it at 0; memory
    banks without such a defence are refused (nothing would fill them).
    """
    defence = train_cfg.defence
    if defence in MINSIM_DEFENCES + EXFMEM_DEFENCES and model_cfg.arch != "fusion":
        raise ConfigError("arch", f"defence {defence!r} needs the two-stream fusion model")
    if defence in EXFMEM_DEFENCES:
        if not model_cfg.exfmem_size:
            model_cfg = dataclasses.replace(model_cfg, exfmem_size=EXFMEM_DEFAULT_SIZE)
    elif model_cfg.exfmem_size:
        raise ConfigError("exfmem_size", f"memory banks need defence exfmem or minsim-exfmem, not {defence!r}")
    if defence == "amr-frozen" and not model_cfg.num_amr:
        raise ConfigError("num_amr", "amr-frozen freezes the AMR weights: it needs at least one AMR")
    return model_cfg


# Input geometry and width per preset. "tiny" is sized for 2 CPU cores: PGD-10 adversarial
# training of a few hundred clips takes minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(rgb_frames=64, rgb_size=224, skel_frames=32, i3d_width=1.0),
    "tiny": dict(rgb_frames=8, rgb_size=32, skel_frames=16, i3d_width=0.25),
}


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError("preset", f"must be one of {tuple(PRESETS)}, got {preset!r}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


@dataclass(frozen=True)
class AttackConfig:
    """One L-inf attack on modality R, S or both (RS).

    ``name``: ``fgsm``, ``pgd`` (CE loss), ``cw`` (CW margin loss optimised by PGD),
    ``apgd-ce`` / ``apgd-dlr`` (Croce & Hein 2020) or ``square`` (Andriushchenko et al.
    2020, score-based; ``steps`` is its query budget; at most MAX_STEPS iterations, MAX_QUERIES
    queries). Budgets and step sizes are per
    modality, in the [0, 1] input scale. FGSM takes a single step of size eps (``steps`` and
    ``alpha`` are ignored); APGD sets its own step sizes (2·eps, halved on a schedule).
    ``restarts`` > 1 re-runs a randomised attack on the clips still standing, each restart
    from its own random start. ``perturb_absent_bodies``: whether an attack may write into
    the all-zero slots of absent skeleton bodies (default no: a perturbation there creates a
    "ghost" person that no recording contains; see docs/ENGINE.md).
    """

    name: str = "pgd"
    mode: str = "RS"
    steps: int = 20
    eps_rgb: float = 8 / 255
    eps_skel: float = 8 / 255
    alpha_rgb: float = 2 / 255
    alpha_skel: float = 2 / 255
    random_start: bool = True
    # Confidence margin of the CW loss, as in the MART/TRADES "CW optimised by PGD" code.
    cw_kappa: float = 50.0
    restarts: int = 1
    perturb_absent_bodies: bool = False

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ConfigError("name", f"must be one of {ATTACKS}, got {self.name!r}")
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {MODES}, got {self.mode!r}")
        if not 1 <= self.steps <= max_steps(self.name):
            raise ConfigError("steps", f"must be in 1..{max_steps(self.name)} for {self.name}")
        for name in ("eps_rgb", "eps_skel"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, "must be in [0, 1]")
        for name in ("alpha_rgb", "alpha_skel"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(name, "must be in (0, 1]")
        if self.restarts < 1:
            raise ConfigError("restarts", "must be at least 1")
        if self.restarts > 1 and not self.randomised:
            raise ConfigError("restarts", f"{self.label} has no random start: restarts would repeat the same run")

    @property
    def randomised(self) -> bool:
        """Whether two runs with different seeds can differ (random start or random search)."""
        return self.name in ("apgd-ce", "apgd-dlr", "square") or (self.name in ("pgd", "cw") and self.random_start)

    @property
    def label(self) -> str:
        """Short name used in tables: FGSM, PGD20, CW30, APGD-CE100, APGD-DLR100, Square5000;
        ``x5`` appended for 5 restarts."""
        if self.name == "fgsm":
            base = "FGSM"
        elif self.name == "square":
            base = f"Square{self.steps}"
        else:
            base = f"{self.name.upper()}{self.steps}"
        return base if self.restarts == 1 else f"{base}x{self.restarts}"

    @property
    def cost(self) -> float:
        """Rough cost per clip in forward+backward passes (a Square query is a forward, about
        a third of one), used to order a worst-case cascade cheapest first."""
        passes = 1 if self.name == "fgsm" else self.steps
        if self.name == "square":
            passes = self.steps / 3
        return passes * self.restarts

    def with_mode(self, mode: str) -> "AttackConfig":
        return dataclasses.replace(self, mode=mode)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttackConfig":
        return _from_dict(cls, data)


def _default_train_attack() -> AttackConfig:
    return AttackConfig(name="pgd", mode="RS", steps=10)


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe. Defaults are the paper's NTU recipe (DESIGN.md section 3)."""

    defence: str = "amr"
    lam: float = 1.0
    epochs: int = 80
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "sgd" is the paper's recipe. "adam" (HCN's original optimiser, use lr 1e-3) trains the
    # skeleton branch far faster on small synthetic sets, where SGD at lr 0.01 leaves HCN
    # near chance for tens of epochs.
    optimizer: str = "sgd"
    attack: AttackConfig = field(default_factory=_default_train_attack)
    seed: int = 0
    # MinSim (defences minsim, minsim-exfmem): weight β of the batch-mean cosine similarity
    # of the two modalities' features, compared after fixed random projections to
    # `minsim_dim` dimensions (see models/baselines.py).
    minsim_beta: float = 1.0
    minsim_dim: int = 128
    # MinSim's unimodal compactness term: weight γ of each modality's batch-mean cosine
    # distance of a feature to its class centroid in the batch (same projections; see
    # models/baselines.py). 0 gives the cross-modal term alone (before issue 11).
    minsim_gamma: float = 1.0
    # Weight decay on the AMR weights θ. Off by default: with it, θ is pulled to 0 and so
    # W = σ(θ) to 0.5, and the weights barely move (means 0.4998–0.5022 after 20 epochs).
    amr_weight_decay: bool = False
    # Learning rate of the AMR weights θ as a multiple of ``lr`` (1: the same). Under Adam a
    # step moves θ by about lr whatever the gradient's size, so at lr 1e-3 θ can only drift
    # ~0.26 in 260 steps, and W = σ(θ) a quarter of that (bench/amr_weights.py).
    amr_lr_scale: float = 1.0
    def __post_init__(self):
        if self.defence not in DEFENCES:
            raise ConfigError("defence", f"must be one of {DEFENCES}, got {self.defence!r}")
        if self.lam < 0:
            raise ConfigError("lam", "must be >= 0")
        if self.epochs < 1:
            raise ConfigError("epochs", "must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be at least 1")
        if self.lr <= 0:
            raise ConfigError("lr", "must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.minsim_beta < 0:
            raise ConfigError("minsim_beta", "must be >= 0")
        if self.minsim_dim < 1:
            raise ConfigError("minsim_dim", "must be at least 1")
        if self.minsim_gamma < 0:
            raise ConfigError("minsim_gamma", "must be >= 0")
        if self.amr_lr_scale <= 0:
            raise ConfigError("amr_lr_scale", "must be positive")

    @property
    def attack_mode(self) -> str | None:
        """Modalities attacked by the inner maximisation, or None for clean training
        (MinSim and ExFMem train on clean inputs, as in Tian & Xu)."""
        return {"none": None, "at-r": "R", "at-s": "S", "at-rs": "RS", "amr": "RS",
                "amr-frozen": "RS"}.get(self.defence)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        if isinstance(data.get("attack"), dict):
            data["attack"] = AttackConfig.from_dict(data["attack"])
        return _from_dict(cls, data)
