"""Training objectives against their formulas; checkpoints, resume, cancellation."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from robustact.models.attacks import attack
from robustact.models.checkpoint import CheckpointError, load_checkpoint
from robustact.models.config import AttackConfig, ConfigError, TrainConfig, preset_config
from robustact.models.fusion import build_model
from robustact.models.train import TrainingCancelled, TrainingDiverged, cosine_lr, objective, train

K = 3


class TensorClips(torch.utils.data.Dataset):
    """A few random clips with the attributes ``train`` reads from a ClipDataset."""

    def __init__(self, cfg, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
        self.skel = torch.rand(n, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
        self.labels = torch.arange(n) % K
        self.class_names = [f"class {i}" for i in range(K)]
        self.skel_min, self.skel_max = [-1.0, -1.0, 2.0], [1.0, 1.0, 4.0]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.rgb[i], self.skel[i], int(self.labels[i])


FAST_ATTACK = AttackConfig(name="pgd", mode="RS", steps=2)


def test_amr_objective_is_equation_12():
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=K, num_amr=2)
    model = build_model(cfg).eval()  # eval: no dropout, so both computations see the same net
    data = TensorClips(cfg, n=4)
    rgb, skel, y = data.rgb, data.skel, data.labels
    tc = TrainConfig(defence="amr", lam=0.7, attack=FAST_ATTACK)
    loss, _ = objective(model, tc, rgb, skel, y, attack_seed=5)
    adv = attack(model, rgb, skel, y, FAST_ATTACK, seed=5)
    nat, out = model(rgb, skel), model(*adv)
    aux = sum(F.cross_entropy(a, y) for a in out.aux) / 2
    expected = F.cross_entropy(nat.logits, y) + 0.7 * (F.cross_entropy(out.logits, y) + aux)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("defence,mode", [("at-r", "R"), ("at-s", "S"), ("at-rs", "RS")])
def test_madry_objective_uses_the_right_modalities(defence, mode):
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=K)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=4)
    tc = TrainConfig(defence=defence, attack=FAST_ATTACK)
    loss, _ = objective(model, tc, data.rgb, data.skel, data.labels, attack_seed=3)
    adv = attack(model, data.rgb, data.skel, data.labels, FAST_ATTACK.with_mode(mode), seed=3)
    assert loss.item() == pytest.approx(F.cross_entropy(model(*adv).logits, data.labels).item(), rel=1e-5)


def test_clean_objective_is_cross_entropy():
    cfg = preset_config("tiny", num_classes=K)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=4)
    loss, _ = objective(model, TrainConfig(defence="none"), data.rgb, data.skel, data.labels, 0)
    assert loss.item() == pytest.approx(F.cross_entropy(model(data.rgb, data.skel).logits, data.labels).item())


def test_cosine_schedule():
    assert cosine_lr(0.01, 0, 80) == pytest.approx(0.01)
    assert cosine_lr(0.01, 40, 80) == pytest.approx(0.005)
    assert cosine_lr(0.01, 79, 80) < 1e-4


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError) as e:
        TrainConfig(defence="magic")
    assert e.value.field == "defence"
    with pytest.raises(ConfigError) as e:
        preset_config("tiny", num_amr=4)
    assert e.value.field == "num_amr"
    with pytest.raises(ConfigError) as e:
        AttackConfig(eps_rgb=2.0)
    assert e.value.field == "eps_rgb"


def test_train_checkpoints_resumes_identically_and_loads_without_pickle(tmp_path):
    cfg = preset_config("tiny", num_classes=K, num_amr=1)
    data = TensorClips(cfg, n=8)
    tc = TrainConfig(defence="amr", epochs=2, batch_size=4, attack=FAST_ATTACK)
    epochs_seen = []
    straight = train(cfg, tc, data, tmp_path / "a", preset="tiny", on_checkpoint=lambda p, e: epochs_seen.append(e))
    assert epochs_seen == [1, 2]
    assert [h["epoch"] for h in straight["history"]] == [1, 2]

    # Interrupt after the first epoch's checkpoint, then resume.
    calls = {"n": 0}

    def stop_in_epoch_two():
        calls["n"] += 1
        return calls["n"] > 2  # two steps per epoch: stop at the first step of epoch 2

    with pytest.raises(TrainingCancelled):
        train(cfg, tc, data, tmp_path / "b", preset="tiny", should_stop=stop_in_epoch_two)
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["epoch"] == 1
    assert not (tmp_path / "b" / "model").exists(), "a cancelled run must not leave a final model"
    resumed = train(cfg, tc, data, tmp_path / "b", preset="tiny")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]

    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)

    model, meta = load_checkpoint(tmp_path / "a" / "model")
    assert meta["class_names"] == data.class_names and meta["preset"] == "tiny"
    assert meta["normalisation"]["skel_min"] == data.skel_min
    assert meta["train"]["defence"] == "amr" and meta["model"]["num_amr"] == 1
    assert len(model(data.rgb[:2], data.skel[:2]).aux) == 1


def test_dataloader_workers_do_not_change_training(tmp_path):
    """Clips read by two DataLoader processes train the same weights as clips read in this
    process: the batches are drawn here, loading draws nothing."""
    cfg = preset_config("tiny", num_classes=K)
    data = TensorClips(cfg, n=8)
    tc = TrainConfig(defence="at-rs", epochs=2, batch_size=4, attack=FAST_ATTACK)
    runs = [train(cfg, tc, data, tmp_path / f"w{w}", preset="tiny", num_workers=w) for w in (0, 2)]
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    a, b = (load_file(str(tmp_path / f"w{w}" / "model" / "model.safetensors")) for w in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = preset_config("tiny", num_classes=K)
    data = TensorClips(cfg, n=4)
    train(cfg, TrainConfig(defence="none", epochs=1, batch_size=4), data, tmp_path)
    with pytest.raises(ValueError, match="another config"):
        train(cfg, TrainConfig(defence="none", epochs=1, batch_size=4, lr=0.1), data, tmp_path)


def test_load_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "robustact.checkpoint/v1", "model": {"arch": "fusion"}}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(tmp_path)


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    """A learning rate far too high drives the loss to NaN within a few steps: training stops
    at once with TrainingDiverged naming the epoch, step and lr, instead of finishing with
    NaN weights (and a NaN history that Postgres' JSON refuses)."""
    cfg = preset_config("tiny", num_classes=3)
    data = TensorClips(cfg, n=8)
    tc = TrainConfig(defence="none", epochs=50, batch_size=2, lr=1e6)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).* at epoch \d+, step \d+ \(lr"):
        train(cfg, tc, data, tmp_path / "run", preset="tiny")
    assert not (tmp_path / "run" / "model").exists()


# --------------------------------------------------------------------------- AMR weights, amr-frozen, MinSim (issue 11)


def test_amr_weights_get_no_weight_decay_unless_asked():
    """Weight decay pulls θ to 0, i.e. σ(θ) to 0.5: with zero gradients, one step leaves
    θ alone by default and shrinks it with amr_weight_decay; other weights decay both ways."""
    from robustact.models.train import amr_weight_parameters, build_optimizer

    cfg = preset_config("tiny", num_classes=K, num_amr=2)
    for decay, expected in ((False, 1.0), (True, 1.0 - 0.5 * 0.1)):
        torch.manual_seed(0)
        model = build_model(cfg)
        tc = TrainConfig(defence="amr", lr=0.5, weight_decay=0.1, momentum=0.0, amr_weight_decay=decay)
        optimizer = build_optimizer(model, tc)
        for p in amr_weight_parameters(model):
            p.data.fill_(1.0)
        other = model.classifier.weight.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in amr_weight_parameters(model):
            assert torch.allclose(p, torch.full_like(p, expected)), (decay, p.flatten()[:3])
        assert torch.allclose(model.classifier.weight, other * (1 - 0.05))
    # θ may learn faster than the rest: its group's lr is amr_lr_scale × lr, kept by the schedule
    optimizer = build_optimizer(build_model(cfg), TrainConfig(defence="amr", lr=0.01, amr_lr_scale=10.0))
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, pytest.approx(0.1)]
    assert optimizer.param_groups[1]["lr_scale"] == 10.0 and "lr_scale" not in optimizer.param_groups[0]


def test_identity_amr_weights_start_at_half_and_stay_in_the_unit_interval(tmp_path):
    from robustact.models.train import build_optimizer, project_amr_weights

    cfg = preset_config("tiny", num_classes=K, num_amr=1, amr_activation="identity", amr_init=0.5)
    model = build_model(cfg)
    amr = model.amrs[0]
    assert torch.equal(amr.effective_weights()[0], torch.full_like(amr.w_rgb, 0.5))
    optimizer = build_optimizer(model, TrainConfig(defence="amr", lr=1.0, momentum=0.0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    amr.w_rgb.grad.fill_(-3.0)  # a step to 3.5
    amr.w_skel.grad.fill_(+3.0)  # a step to -2.5
    optimizer.step()
    project_amr_weights(model)
    assert amr.w_rgb.min() == 1.0 and amr.w_skel.max() == 0.0
    # and the training loop projects after every step
    data = TensorClips(cfg, n=8)
    tc = TrainConfig(defence="amr", epochs=1, batch_size=4, lr=5.0, attack=FAST_ATTACK)
    train(cfg, tc, data, tmp_path / "run", preset="tiny")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    theta = torch.cat([weights["amrs.0.w_rgb"].flatten(), weights["amrs.0.w_skel"].flatten()])
    assert theta.min() >= 0.0 and theta.max() <= 1.0 and not torch.all(theta == 0.5)


def test_amr_frozen_is_the_amr_objective_with_fixed_weights(tmp_path):
    cfg = preset_config("tiny", num_classes=K, num_amr=2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=4)
    losses = [objective(model, TrainConfig(defence=d, lam=0.7, attack=FAST_ATTACK), data.rgb, data.skel,
                        data.labels, attack_seed=5)[0].item() for d in ("amr", "amr-frozen")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    with pytest.raises(ConfigError, match="num_amr"):
        from robustact.models.config import resolve_model_config

        resolve_model_config(preset_config("tiny", num_classes=K), TrainConfig(defence="amr-frozen"))
    data = TensorClips(cfg, n=8)
    train(cfg, TrainConfig(defence="amr-frozen", epochs=2, batch_size=4, attack=FAST_ATTACK), data,
          tmp_path / "frozen", preset="tiny")
    train(cfg, TrainConfig(defence="amr", epochs=2, batch_size=4, attack=FAST_ATTACK), data, tmp_path / "amr",
          preset="tiny")
    frozen = load_file(str(tmp_path / "frozen" / "model" / "model.safetensors"))
    moved = load_file(str(tmp_path / "amr" / "model" / "model.safetensors"))
    for i in range(2):
        for name in ("w_rgb", "w_skel"):
            assert torch.equal(frozen[f"amrs.{i}.{name}"], torch.zeros_like(frozen[f"amrs.{i}.{name}"]))  # σ = 0.5
            assert not torch.equal(moved[f"amrs.{i}.{name}"], torch.zeros_like(moved[f"amrs.{i}.{name}"]))
    heads = [k for k in frozen if k.startswith("amrs.") and not k.endswith(("w_rgb", "w_skel"))]
    assert heads and all(not torch.equal(frozen[k], moved[k]) for k in heads[:1])


def test_minsim_compactness_term():
    from robustact.models.baselines import MINSIM_SEED, minsim_compactness, minsim_projection

    torch.manual_seed(0)
    f = torch.randn(6, 40)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    z = F.normalize(f @ minsim_projection(40, 16, MINSIM_SEED), dim=1)
    expected = []
    for i in range(6):
        same = z[labels == labels[i]].mean(0)
        expected.append(1 - F.cosine_similarity(z[i], same, dim=0))
    assert minsim_compactness(f, labels, 16).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # one direction per class: nothing to compact
    tight = torch.cat([f[:1].repeat(2, 1), 3 * f[2:3].repeat(3, 1), f[5:6]])
    assert minsim_compactness(tight, labels, 16).item() == pytest.approx(0.0, abs=1e-6)
    # and the MinSim loss adds it with weight γ (half the sum over the two modalities)
    cfg = preset_config("tiny", num_classes=K)
    model = build_model(cfg).eval()
    data = TensorClips(cfg, n=6)
    with torch.no_grad():
        base = objective(model, TrainConfig(defence="minsim", minsim_gamma=0.0), data.rgb, data.skel, data.labels, 0)[0]
        full = objective(model, TrainConfig(defence="minsim", minsim_gamma=2.0), data.rgb, data.skel, data.labels, 0)[0]
        f_rgb, f_skel, _ = model.forward_features(data.rgb, data.skel)
        compact = (minsim_compactness(f_rgb, data.labels, 128, MINSIM_SEED)
                   + minsim_compactness(f_skel, data.labels, 128, MINSIM_SEED + 1)) / 2
    assert compact.item() > 1e-3  # ReLU features of an untrained net point much the same way
    assert (full - base).item() == pytest.approx(2.0 * compact.item(), abs=1e-5)
