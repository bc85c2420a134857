"""Tian & Xu (CVPR 2021) baselines: MinSim loss and ExFMem sparse coding against their
formulas, ExFMem banks through a checkpoint, and a MinSim+ExFMem training run."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from robustact.models.baselines import ExFMem, ista, minsim_projection, minsim_similarity, soft_threshold
from robustact.models.checkpoint import load_checkpoint, save_checkpoint
from robustact.models.config import EXFMEM_DEFAULT_SIZE, ConfigError, TrainConfig, preset_config, resolve_model_config
from robustact.models.fusion import build_model
from robustact.models.train import objective, train
from tests.test_train import K, TensorClips


def test_minsim_similarity_is_batch_mean_cosine_of_projected_features():
    g = torch.Generator().manual_seed(0)
    f_rgb, f_skel = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g)
    p_rgb, p_skel = minsim_projection(12, 4, 0), minsim_projection(7, 4, 1)
    a, b = f_rgb @ p_rgb, f_skel @ p_skel
    expected = sum((a[i] @ b[i]) / (a[i].norm() * b[i].norm()) for i in range(5)) / 5
    assert minsim_similarity(f_rgb, f_skel, dim=4).item() == pytest.approx(expected.item(), rel=1e-5)
    # fixed (not learned): the same matrices on every call
    assert torch.equal(minsim_projection(12, 4, 0), p_rgb)


def test_minsim_objective_is_ce_plus_beta_similarity_plus_gamma_compactness():
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=K)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=4)
    tc = TrainConfig(defence="minsim", minsim_beta=0.7, minsim_gamma=0.4, minsim_dim=16)
    assert tc.attack_mode is None  # clean training, as in Tian & Xu
    loss, logits = objective(model, tc, data.rgb, data.skel, data.labels, attack_seed=0)
    f_rgb, f_skel, _ = model.forward_features(data.rgb, data.skel)
    z_rgb = f_rgb @ minsim_projection(f_rgb.shape[1], 16, 0)
    z_skel = f_skel @ minsim_projection(f_skel.shape[1], 16, 1)
    cos = F.cosine_similarity(z_rgb, z_skel, dim=1).mean()

    def compactness(z):  # mean cosine distance to the class centroid of unit vectors, by hand
        z = F.normalize(z, dim=1)
        return torch.stack([1 - F.cosine_similarity(z[i], z[data.labels == data.labels[i]].mean(0), dim=0)
                            for i in range(len(z))]).mean()

    assert compactness(z_rgb) > 0 and compactness(z_skel) > 0  # two clips share class 0
    expected = (F.cross_entropy(model(data.rgb, data.skel).logits, data.labels) + 0.7 * cos
                + 0.4 * (compactness(z_rgb) + compactness(z_skel)) / 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits, model(data.rgb, data.skel).logits)


def test_ista_solves_lasso_for_an_orthonormal_dictionary():
    # With orthonormal atoms (DᵀD = I, L = 1) the lasso solution is soft-thresholding of Dᵀf,
    # and ISTA reaches it in one step from h = 0.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=g))  # (C=6, N=4), orthonormal columns
    bank = q.T                                                # atoms as rows
    f = torch.randn(3, 6, generator=g)
    lam = 0.3
    closed = soft_threshold(f @ q, lam)
    assert torch.allclose(closed, torch.sign(f @ q) * torch.clamp((f @ q).abs() - lam, min=0))
    for steps in (1, 10):
        assert torch.allclose(ista(f, bank, lam, steps), closed, atol=1e-5)


def test_ista_converges_on_a_general_lasso():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(5, 8, generator=g)
    f = torch.randn(2, 8, generator=g)
    lam = 0.2
    h = ista(f, bank, lam, steps=3000)
    # KKT: Dᵀ(f − Dh) = λ·sign(h) where h ≠ 0, |·| ≤ λ where h = 0
    grad = (f - h @ bank) @ bank.T
    nz = h != 0
    assert torch.allclose(grad[nz], lam * torch.sign(h[nz]), atol=1e-4)
    assert (grad[~nz].abs() <= lam + 1e-4).all()


def test_exfmem_mixes_reconstruction_and_feature():
    g = torch.Generator().manual_seed(3)
    mem = ExFMem(size=8, rgb_features=6, skel_features=5, lam=0.1, mix=0.3, steps=15)
    f_rgb, f_skel = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
    assert mem(f_rgb, f_skel)[0] is f_rgb  # identity before the banks are built
    mem.build(torch.randn(6, 6, generator=g), torch.randn(6, 5, generator=g))  # 6 < size: partly filled
    assert int(mem.count) == 6
    d = mem.bank_rgb[:6]
    assert torch.allclose(d.norm(dim=1), torch.ones(6))
    assert mem.lipschitz[0].item() == pytest.approx(torch.linalg.eigvalsh(d @ d.T).max().item(), rel=1e-4)
    out_rgb, _ = mem(f_rgb, f_skel)
    norm = f_rgb.norm(dim=1, keepdim=True)
    h = ista(f_rgb / norm, d, 0.1, 15)
    assert torch.allclose(out_rgb, 0.3 * norm * (h @ d) + 0.7 * f_rgb, atol=1e-5)


def test_exfmem_banks_round_trip_through_safetensors(tmp_path):
    cfg = preset_config("tiny", num_classes=K, exfmem_size=8)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=6)
    with torch.no_grad():
        f_rgb, f_skel, _ = model.forward_features(data.rgb, data.skel)
    model.exfmem.build(f_rgb, f_skel)
    save_checkpoint(tmp_path / "m", model, {"model": cfg.to_dict(), "class_names": data.class_names})
    loaded, meta = load_checkpoint(tmp_path / "m")
    assert meta["model"]["exfmem_size"] == 8
    for name in ("bank_rgb", "bank_skel", "lipschitz", "count"):
        assert torch.equal(getattr(loaded.exfmem, name), getattr(model.exfmem, name))
    assert int(loaded.exfmem.count) == 6
    with torch.no_grad():
        assert torch.allclose(loaded(data.rgb, data.skel).logits, model(data.rgb, data.skel).logits, atol=1e-5)


def test_config_pairs_defence_and_banks():
    fusion = preset_config("tiny", num_classes=K)
    assert resolve_model_config(fusion, TrainConfig(defence="exfmem")).exfmem_size == EXFMEM_DEFAULT_SIZE
    assert resolve_model_config(fusion, TrainConfig(defence="minsim")).exfmem_size == 0
    with pytest.raises(ConfigError) as e:
        resolve_model_config(preset_config("tiny", arch="rgb"), TrainConfig(defence="minsim"))
    assert e.value.field == "arch"
    with pytest.raises(ConfigError) as e:
        resolve_model_config(dataclasses.replace(fusion, exfmem_size=4), TrainConfig(defence="none"))
    assert e.value.field == "exfmem_size"
    for field, value in (("exfmem_mix", 1.5), ("exfmem_steps", 0), ("exfmem_lambda", -1.0)):
        with pytest.raises(ConfigError) as e:
            preset_config("tiny", **{field: value})
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        TrainConfig(defence="minsim", minsim_beta=-1)
    assert e.value.field == "minsim_beta"


def test_minsim_exfmem_trains_and_attack_gradients_flow_through_ista(tmp_path):
    cfg = preset_config("tiny", num_classes=K, exfmem_size=6, exfmem_steps=5)
    data = TensorClips(cfg, n=8)
    tc = TrainConfig(defence="minsim-exfmem", epochs=1, batch_size=4, optimizer="adam", lr=1e-3)
    summary = train(cfg, tc, data, tmp_path)
    model, meta = load_checkpoint(summary["model_dir"])
    assert meta["train"]["defence"] == "minsim-exfmem" and meta["exfmem"]["bank_size"] == 6
    assert int(model.exfmem.count) == 6 and model.exfmem.bank_rgb.abs().sum() > 0

    rgb = data.rgb[:2].clone().requires_grad_(True)
    skel = data.skel[:2].clone().requires_grad_(True)
    loss = F.cross_entropy(model(rgb, skel).logits, data.labels[:2])
    g_rgb, g_skel = torch.autograd.grad(loss, (rgb, skel))
    assert g_rgb.abs().sum() > 0 and g_skel.abs().sum() > 0

    # the gradient really passes through the ISTA coding: it changes with the mix a
    model.exfmem.mix = 1.0
    loss_full = F.cross_entropy(model(rgb, skel).logits, data.labels[:2])
    g_full, = torch.autograd.grad(loss_full, rgb)
    assert g_full.abs().sum() > 0 and not torch.allclose(g_full, g_rgb)
