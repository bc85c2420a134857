"""Invariants of the multimodal attacks, on the real tiny-preset networks."""

import pytest
import torch
import torch.nn.functional as F

from robustact.models.attacks import attack, cw_margin_loss, fgsm
from robustact.models.config import AttackConfig, preset_config
from robustact.models.fusion import build_model

K = 5


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = torch.rand(b, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
    labels = torch.randint(0, K, (b,), generator=g)
    return rgb, skel, labels


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=K, num_amr=2)
    return build_model(cfg).eval(), cfg


ATTACKS = [AttackConfig(name="fgsm", steps=1), AttackConfig(name="pgd", steps=3), AttackConfig(name="cw", steps=3)]


@pytest.mark.parametrize("base", ATTACKS, ids=lambda a: a.name)
@pytest.mark.parametrize("mode", ["R", "S", "RS"])
def test_ball_box_no_mutation_and_untouched_modality(fusion, base, mode):
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg)
    rgb0, skel0 = rgb.clone(), skel.clone()
    a = AttackConfig(**{**base.to_dict(), "mode": mode, "eps_rgb": 8 / 255, "eps_skel": 4 / 255})
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, a, seed=1)
    assert torch.equal(rgb, rgb0) and torch.equal(skel, skel0), "inputs were mutated"
    for x0, adv, eps, on in ((rgb, adv_rgb, a.eps_rgb, "R" in mode), (skel, adv_skel, a.eps_skel, "S" in mode)):
        assert adv.shape == x0.shape
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - x0).abs().max() <= eps + 1e-6
        if on:
            assert (adv - x0).abs().max() > eps / 2, "the attacked modality did not move"
        else:
            assert adv is x0, "an unattacked modality must be returned unchanged"


def test_fgsm_steps_exactly_eps_along_the_gradient_sign(fusion):
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg)
    rgb = rgb * 0.5 + 0.25  # keep away from the box so nothing is clipped
    rgb.requires_grad_(True)
    loss = F.cross_entropy(model(rgb, skel).logits, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [rgb])
    rgb = rgb.detach()
    adv_rgb, _ = fgsm(model, rgb, skel, labels, mode="R", eps_rgb=8 / 255)
    assert torch.allclose(adv_rgb - rgb, 8 / 255 * grad.sign(), atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "cw"])
def test_deterministic_under_a_seed(fusion, name):
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg)
    a = AttackConfig(name=name, mode="RS", steps=2)
    first = attack(model, rgb, skel, labels, a, seed=7)
    second = attack(model, rgb, skel, labels, a, seed=7)
    other = attack(model, rgb, skel, labels, a, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_no_parameter_gradients_and_mode_restored(fusion):
    model, cfg = fusion
    model.train()
    try:
        rgb, skel, labels = _batch(cfg)
        attack(model, rgb, skel, labels, AttackConfig(name="pgd", steps=2), seed=0)
        assert model.training, "training mode was not restored"
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_pgd_increases_the_loss(fusion):
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg, b=8)
    with torch.no_grad():
        clean = F.cross_entropy(model(rgb, skel).logits, labels)
    for mode in ("R", "S", "RS"):
        adv = attack(model, rgb, skel, labels, AttackConfig(name="pgd", mode=mode, steps=5), seed=0)
        with torch.no_grad():
            assert F.cross_entropy(model(*adv).logits, labels) > clean


class _SumStub(torch.nn.Module):
    """logit_0 = -(mean rgb + mean skel), logit_1 = 0: every input gradient of the CE loss of
    class 0 has one sign, so an L∞ step of size ε in a modality raises the loss by exactly
    the same amount whatever the other modality does."""

    def forward(self, rgb, skel):
        from robustact.models.fusion import ModelOutput

        u = rgb.flatten(1).mean(1) + skel.flatten(1).mean(1)
        return ModelOutput(torch.stack([-u, torch.zeros_like(u)], dim=1), [])


def test_joint_attack_is_at_least_as_strong_as_one_modality(fusion):
    # Where the answer is known: on the stub, PGD without random start moves u by exactly ε
    # per attacked modality, so RS raises the logit gap by 2ε and each single mode by ε.
    rgb, skel = torch.full((2, 3, 2, 4, 4), 0.5), torch.full((2, 3, 3, 5, 2), 0.5)
    labels = torch.zeros(2, dtype=torch.long)
    stub = _SumStub()
    gaps = {}
    for mode in ("R", "S", "RS"):
        cfg = AttackConfig(name="pgd", mode=mode, steps=4, eps_rgb=8 / 255, eps_skel=8 / 255, alpha_rgb=2 / 255,
                           alpha_skel=2 / 255, random_start=False)
        adv = attack(stub, rgb, skel, labels, cfg, seed=0)
        gaps[mode] = (stub(*adv).logits[:, 1] - stub(*adv).logits[:, 0]).tolist()
    clean = (stub(rgb, skel).logits[:, 1] - stub(rgb, skel).logits[:, 0]).tolist()
    for i in range(2):
        assert gaps["R"][i] == pytest.approx(clean[i] + 8 / 255, abs=1e-6)
        assert gaps["S"][i] == pytest.approx(clean[i] + 8 / 255, abs=1e-6)
        assert gaps["RS"][i] == pytest.approx(clean[i] + 16 / 255, abs=1e-6)
    # On the real network, no slack: the joint attack ends at a loss at least that of
    # either single-modality attack, clip by clip.
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg, b=8)
    losses = {}
    for mode in ("R", "S", "RS"):
        adv = attack(model, rgb, skel, labels, AttackConfig(name="pgd", mode=mode, steps=10), seed=0)
        with torch.no_grad():
            losses[mode] = F.cross_entropy(model(*adv).logits, labels, reduction="none")
    assert (losses["RS"] >= losses["R"]).all() and (losses["RS"] >= losses["S"]).all(), losses


def test_cw_margin_loss_matches_its_formula():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    # sample 0: z_y=2, max other=1 → relu(2-1+k); sample 1: z_y=1, max other=3 → relu(1-3+k)
    for kappa in (0.0, 50.0):
        expected = -(max(0.0, 1 + kappa) + max(0.0, -2 + kappa))
        assert cw_margin_loss(logits, labels, kappa).item() == pytest.approx(expected)


def test_unimodal_model_ignores_the_other_modality():
    cfg = preset_config("tiny", num_classes=K, arch="rgb")
    model = build_model(cfg).eval()
    rgb, skel, labels = _batch(cfg)
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, AttackConfig(name="pgd", mode="S", steps=2), seed=0)
    assert adv_rgb is rgb
    with torch.no_grad():
        assert torch.equal(model(adv_rgb, adv_skel).logits, model(rgb, skel).logits)


def test_zero_budget_is_the_identity(fusion):
    model, cfg = fusion
    rgb, skel, labels = _batch(cfg)
    a = AttackConfig(name="pgd", mode="RS", steps=2, eps_rgb=0.0, eps_skel=0.0)
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, a, seed=0)
    assert torch.equal(adv_rgb, rgb) and torch.equal(adv_skel, skel)
