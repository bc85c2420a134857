"""Evaluation as per-clip data: arithmetic against a stub whose answers are known, robust ≤
clean, worst case, cascade = full, batch independence, restarts, the threat model of the
attacks (joint steps, eval mode, absent bodies) and the gradient-masking diagnostics."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustact.models.attacks import attack, run_attack
from robustact.models.config import ATTACKS, MAX_QUERIES, MAX_STEPS, AttackConfig, ConfigError, max_steps, preset_config
from robustact.models.evaluate import (ATTACK_SPEC_MAX_LENGTH, ATTACK_SPEC_PATTERN, BROKEN, CLEAN_WRONG, SKIPPED, SURVIVED,
                             ClipRecords, build_suite, cascade_order, evaluate, parse_attack_spec, run_records)
from robustact.models.fusion import ModelOutput, build_model
from robustact.models.report import build_report, compare

T, H, TS, V, M = 2, 4, 3, 5, 2
CENTRES = torch.tensor([0.5, 1.0, 1.5])


class LinearStub(torch.nn.Module):
    """Three classes along u = mean(rgb) + mean(skel): logit_c = -50 (u - centre_c)²,
    centres 0.5, 1.0, 1.5, so the boundaries are u = 0.75 and 1.25. Every input gradient
    has one sign, so an L∞ attack with budget ε moves u by exactly ε per attacked modality
    (the stub's inputs stay far from the [0, 1] box)."""

    class cfg:  # noqa: N801 - what evaluate reads of a model config
        num_classes = 3

    def __init__(self, detach: bool = False):
        super().__init__()
        self.detach = detach

    def forward(self, rgb, skel):
        u = rgb.flatten(1).mean(1) + skel.flatten(1).mean(1)
        z = u.detach() if self.detach else u
        logits = -50 * (z[:, None] - CENTRES) ** 2
        if self.detach:  # a masked model: the score moves with u, its gradient is exactly zero
            logits = logits + 0.0 * u[:, None]
        return ModelOutput(logits, [])


# (label, u): clip 0 robust; 1 and 5 sit 0.02 from a boundary (broken by any mode at 8/255
# ≈ 0.031); 2 sits 0.05 away (only RS, which moves u by 2ε, breaks it); 3 robust; 4 wrong.
CLIPS = [(0, 0.5), (0, 0.73), (1, 1.2), (2, 1.5), (1, 0.5), (2, 1.27)]


def stub_data():
    rgb = torch.stack([torch.full((3, T, H, H), u / 2) for _, u in CLIPS])
    skel = torch.stack([torch.full((3, TS, V, M), u / 2) for _, u in CLIPS])
    labels = torch.tensor([label for label, _ in CLIPS])
    return torch.utils.data.TensorDataset(rgb, skel, labels)


META = {"class_names": ["a", "b", "c"], "model": {"arch": "fusion"}, "train": {"defence": "none"}}


def test_report_arithmetic_against_the_stub():
    report, records = evaluate(LinearStub(), META, stub_data(), build_suite(["fgsm", "pgd10"]), batch_size=4)
    assert report["schema"] == "robustact.report/v2"
    assert report["clean"] == {"accuracy": pytest.approx(500 / 6), "per_class": [100.0, 50.0, 100.0]}
    expected = {"R": (50.0, [50.0, 50.0, 50.0]), "S": (50.0, [50.0, 50.0, 50.0]),
                "RS": (100 / 3, [50.0, 0.0, 50.0])}
    for entry in report["attacks"]:
        for mode, (acc, per_class) in expected.items():
            assert entry["modes"][mode]["accuracy"] == pytest.approx(acc), (entry["label"], mode)
            assert entry["modes"][mode]["per_class"] == pytest.approx(per_class)
            assert entry["modes"][mode]["attacked"] == 5
        assert entry["avg"] == pytest.approx((50 + 50 + 100 / 3) / 3)
    (worst,) = report["worst_case"]
    assert {m: worst["modes"][m]["accuracy"] for m in ("R", "S", "RS")} == pytest.approx(
        {"R": 50.0, "S": 50.0, "RS": 100 / 3})
    assert worst["overall"]["accuracy"] == pytest.approx(100 / 3)
    assert worst["overall"]["per_class"] == pytest.approx([50.0, 0.0, 50.0])
    # The clean-wrong clip was never attacked; the per-clip table says who broke what.
    assert (records.outcome[4] == CLEAN_WRONG).all()
    rs_cols = [i for i, c in enumerate(records.suite) if c["mode"] == "RS"]
    r_cols = [i for i, c in enumerate(records.suite) if c["mode"] == "R"]
    assert (records.outcome[2, rs_cols] == BROKEN).all() and (records.outcome[2, r_cols] == SURVIVED).all()
    assert (records.outcome[[0, 3]] == SURVIVED).all()
    assert report["diagnostics"]["flags"] == []
    assert report["diagnostics"]["unbounded"]["accuracy"] == 0.0


def test_build_report_is_a_pure_function_of_the_records():
    suite = [c.to_dict() for c in build_suite(["pgd2"], modes=["R", "RS"])]
    records = ClipRecords(
        suite, clip=np.arange(4), label=np.array([0, 1, 1, 0]), clean_pred=np.array([0, 1, 0, 0]),
        outcome=np.array([[0, 1], [1, 1], [-1, -1], [0, 0]], dtype=np.int8),
        iterate=np.array([[-1, 2], [1, 1], [-1, -1], [-1, -1]], dtype=np.int32),
        restart=np.zeros((4, 2), np.int16), grad_zero_rgb=np.zeros(4, np.int8), grad_zero_skel=np.zeros(4, np.int8),
        unbounded=np.array([1, 1, -1, 1], np.int8), unstable=np.zeros(4, np.int8),
        probabilities=np.zeros(4, np.int8))
    report = build_report(records, {**META, "class_names": ["a", "b"]})
    (pgd,) = report["attacks"]
    assert report["clean"]["accuracy"] == 75.0
    assert pgd["modes"]["R"]["accuracy"] == 50.0 and pgd["modes"]["RS"]["accuracy"] == 25.0
    assert pgd["modes"]["R"]["per_class"] == [100.0, 0.0]
    assert report["worst_case"][0]["overall"]["accuracy"] == 25.0
    assert "avg" not in pgd  # S was not run


def tiny_model_and_clips(model_seed: int, data_seed: int, clips: int, classes: int):
    """A randomly initialised tiny-preset fusion model, random clips and the model's own
    clean predictions as labels (so every clip starts correctly classified)."""
    torch.manual_seed(model_seed)
    cfg = preset_config("tiny", num_classes=classes)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(data_seed)
    rgb = torch.rand(clips, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = torch.rand(clips, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
    with torch.no_grad():
        labels = model(rgb, skel).logits.argmax(1)
    return model, rgb, skel, labels


def test_robust_never_exceeds_clean_and_worst_case_bounds_every_column():
    model, rgb, skel, pred = tiny_model_and_clips(0, 3, clips=10, classes=4)
    labels = pred.clone()
    labels[:4] = (labels[:4] + 1) % 4  # four clips wrong on clean input
    data = torch.utils.data.TensorDataset(rgb, skel, labels)
    meta = {**META, "class_names": list("abcd")}
    suite = build_suite(["fgsm", "pgd5", "apgd-ce5", "apgd-dlr5", "square20"], eps=[1, 3])
    report, records = evaluate(model, meta, data, suite, batch_size=4)
    clean = report["clean"]["accuracy"]
    assert clean == 60.0
    for w in report["worst_case"]:
        for entry in (e for e in report["attacks"] if e["eps_rgb"] == w["eps_rgb"]):
            for m in ("R", "S", "RS"):
                assert w["modes"][m]["accuracy"] <= entry["modes"][m]["accuracy"] <= clean
        assert w["overall"]["accuracy"] <= min(w["modes"][m]["accuracy"] for m in ("R", "S", "RS"))
    assert (records.outcome[:4] == CLEAN_WRONG).all()
    assert (records.outcome[4:] >= 0).all()
    broken_at_3 = report["worst_case"][1]["overall"]["accuracy"]
    assert broken_at_3 < clean, "the attacks must break something for this test to mean anything"

    # The cascade reaches the same worst case and the same outcome wherever it attacked.
    cascade, cascade_records = evaluate(model, meta, data, suite, batch_size=4, strategy="worst-case")
    assert [w["modes"] for w in cascade["worst_case"]] == [w["modes"] for w in report["worst_case"]]
    attacked = cascade_records.outcome != SKIPPED
    assert (cascade_records.outcome[attacked] == records.outcome[attacked]).all()
    assert (cascade_records.outcome == SKIPPED).any(), "the cascade skipped nothing"
    assert cascade_records.outcome[attacked & (cascade_records.outcome >= 0)].size < records.outcome[records.outcome >= 0].size


def test_a_clip_result_does_not_depend_on_its_batch():
    model, rgb, skel, labels = tiny_model_and_clips(1, 5, clips=7, classes=3)
    data = torch.utils.data.TensorDataset(rgb, skel, labels)
    suite = build_suite(["pgd5", "apgd-ce5", "square30"], modes=["RS"], eps=[0.5])
    runs = [run_records(model, data, suite, batch_size=b, seed=7) for b in (1, 3, 7)]
    for other in runs[1:]:
        assert np.array_equal(other.outcome, runs[0].outcome)
        assert np.array_equal(other.iterate, runs[0].iterate)
    assert (runs[0].outcome == BROKEN).any() and (runs[0].outcome == SURVIVED).any()
    # Shards: two halves computed apart concatenate to the same table.
    first = run_records(model, torch.utils.data.Subset(data, [0, 1, 2]), suite, seed=7, clip_ids=[0, 1, 2])
    second = run_records(model, torch.utils.data.Subset(data, [3, 4, 5, 6]), suite, seed=7, clip_ids=[3, 4, 5, 6])
    merged = ClipRecords.concat([second, first])
    assert np.array_equal(merged.outcome, runs[0].outcome) and np.array_equal(merged.clip, np.arange(7))
    # The start depends on the seed and the clip id, not on the position in the batch.
    pgd = suite[0]
    a = run_attack(model, rgb, skel, labels, pgd, seed=7, clip_ids=range(7), track=False)
    b = run_attack(model, rgb[[3]], skel[[3]], labels[[3]], pgd, seed=7, clip_ids=[3], track=False)
    c = run_attack(model, rgb, skel, labels, pgd, seed=8, clip_ids=range(7), track=False)
    assert torch.allclose(a.rgb[3], b.rgb[0], atol=1e-6) and not torch.allclose(a.rgb, c.rgb)


@pytest.mark.parametrize("strategy", ["full", "worst-case"])
def test_units_in_any_order_rebuild_the_unsharded_table(strategy):
    """A sharded evaluation: the clean pass, then (group, batch) units run in any order,
    each on its own (as different workers would), applied to the clean table, give the
    table ``run_records`` gives. Under ``full`` each unit is a batch of the unsharded run,
    so every array is identical."""
    from robustact.models.evaluate import UNBOUNDED_GROUP, apply_unit, attack_groups, clean_records, plan_units, run_unit

    model, rgb, skel, labels = tiny_model_and_clips(1, 5, clips=9, classes=3)
    labels = labels.clone()
    labels[[1, 4]] = (labels[[1, 4]] + 1) % 3  # two clips wrong on clean input: never attacked
    data = torch.utils.data.TensorDataset(rgb, skel, labels)
    suite = build_suite(["pgd3", "square20"], modes=["R", "S", "RS"], eps=[0.5])
    whole = run_records(model, data, suite, batch_size=2, seed=7, strategy=strategy)
    table = clean_records(model, data, suite, batch_size=2, clip_ids=range(9))
    units = plan_units(table, suite, strategy, True, batch_size=2)
    groups = len(attack_groups(suite, strategy))
    assert groups == (1 if strategy == "worst-case" else 6)
    attacked = int(whole.clean_correct.sum())
    assert attacked == 7 and len(units) == (groups + 1) * -(-attacked // 2)
    assert sum(g == UNBOUNDED_GROUP for g, _ in units) == -(-attacked // 2)
    for unit in reversed(units):
        apply_unit(table, run_unit(model, data, suite, unit, strategy=strategy, seed=7, clip_ids=range(9),
                                   batch_size=2))
    for key in ClipRecords.ARRAYS:
        assert np.array_equal(getattr(table, key), getattr(whole, key)), key
    # A capped plan: units of several whole batches, the same table.
    capped = plan_units(table, suite, strategy, True, batch_size=2, max_units=len(units) // 2)
    assert len(capped) <= len(units) // 2 and all(len(rows) in (4, 3) for _, rows in capped)
    again = clean_records(model, data, suite, batch_size=2, clip_ids=range(9))
    for unit in capped:
        apply_unit(again, run_unit(model, data, suite, unit, strategy=strategy, seed=7, clip_ids=range(9),
                                   batch_size=2))
    for key in ClipRecords.ARRAYS:
        assert np.array_equal(getattr(again, key), getattr(whole, key)), key
    assert (whole.outcome == BROKEN).any() and (whole.outcome == SURVIVED).any()
    if strategy == "worst-case":
        assert (whole.outcome == SKIPPED).any()


def test_dataloader_workers_do_not_change_a_result():
    model, rgb, skel, labels = tiny_model_and_clips(2, 6, clips=6, classes=3)
    data = torch.utils.data.TensorDataset(rgb, skel, labels)
    suite = build_suite(["fgsm", "pgd3"], modes=["RS"], eps=[32])
    serial, parallel = (run_records(model, data, suite, batch_size=4, seed=3, num_workers=w) for w in (0, 2))
    for key in ("label", "clean_pred", "outcome", "iterate", "restart", "unbounded"):
        assert np.array_equal(getattr(serial, key), getattr(parallel, key)), key
    assert (serial.outcome == BROKEN).any()


def test_records_round_trip_without_pickle(tmp_path):
    records = run_records(LinearStub(), stub_data(), build_suite(["fgsm"]))
    records.save(tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz", allow_pickle=False) as raw:
        assert all(raw[k].dtype != object for k in raw.files)
    back = ClipRecords.load(tmp_path / "r.npz")
    assert back.suite == records.suite and back.meta == records.meta
    assert all(np.array_equal(getattr(back, k), getattr(records, k)) for k in ClipRecords.ARRAYS)
    with pytest.raises(ValueError, match="two record tables"):
        ClipRecords.concat([records, records])


def test_restarts_keep_the_worst_and_record_which_restart():
    model, rgb, skel, labels = tiny_model_and_clips(2, 9, clips=12, classes=3)
    ids = list(range(12))
    weak = AttackConfig(name="pgd", mode="RS", steps=2, eps_rgb=3 / 255, eps_skel=3 / 255, alpha_rgb=1.5 / 255,
                        alpha_skel=1.5 / 255)
    one = run_attack(model, rgb, skel, labels, weak, seed=0, clip_ids=ids)
    four = run_attack(model, rgb, skel, labels, AttackConfig(**{**weak.to_dict(), "restarts": 4}), seed=0, clip_ids=ids)
    assert torch.equal(four.broken & (four.restart == 0), one.broken), "restart 0 is the single run"
    assert four.broken.sum() > one.broken.sum(), "pick a budget where restarts find more"
    assert set(four.restart[four.broken].tolist()) <= {0, 1, 2, 3} and (four.restart[four.broken] > 0).any()
    assert (four.restart[~four.broken] == -1).all()
    with torch.no_grad():
        assert (model(four.rgb, four.skel).logits.argmax(1) != labels)[four.broken].all()
    with pytest.raises(ConfigError, match="restarts"):
        AttackConfig(name="fgsm", restarts=2)


def test_one_joint_pgd_step_uses_each_modality_s_own_alpha_and_gradient():
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=4)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rgb = 0.25 + 0.5 * torch.rand(3, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = 0.25 + 0.5 * torch.rand(3, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
    labels = torch.tensor([0, 1, 2])
    a_r, a_s = 3 / 255, 1 / 255
    step = AttackConfig(name="pgd", mode="RS", steps=1, eps_rgb=0.2, eps_skel=0.2, alpha_rgb=a_r, alpha_skel=a_s,
                        random_start=False)
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, step)
    x = [rgb.clone().requires_grad_(True), skel.clone().requires_grad_(True)]
    g_r, g_s = torch.autograd.grad(F.cross_entropy(model(*x).logits, labels, reduction="sum"), x)
    assert torch.allclose(adv_rgb - rgb, a_r * g_r.sign(), atol=1e-7)
    assert torch.allclose(adv_skel - skel, a_s * g_s.sign(), atol=1e-7)
    # A sequential update (skeleton gradient taken after the RGB step) would differ.
    x2 = [adv_rgb.clone().requires_grad_(True), skel.clone().requires_grad_(True)]
    _, g_s_after = torch.autograd.grad(F.cross_entropy(model(*x2).logits, labels, reduction="sum"), x2)
    assert not torch.equal(g_s_after.sign(), g_s.sign())


class TrainModeFlips(torch.nn.Module):
    """Train mode reverses the logits: an attack run in train mode would push the wrong way."""

    class cfg:  # noqa: N801
        num_classes = 3

    def forward(self, rgb, skel):
        u = rgb.flatten(1).mean(1) + skel.flatten(1).mean(1)
        logits = -50 * (u[:, None] - CENTRES) ** 2
        return ModelOutput(-logits if self.training else logits, [])


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr"])
def test_attacks_run_in_eval_mode_and_restore_train_mode(name):
    model = TrainModeFlips().train()
    data = stub_data()
    rgb, skel, labels = data.tensors
    cfg = AttackConfig(name=name, mode="RS", steps=1 if name == "fgsm" else 10, random_start=False)
    result = run_attack(model, rgb[[1, 5]], skel[[1, 5]], labels[[1, 5]], cfg, seed=0, clip_ids=[1, 5])
    assert model.training, "train mode not restored"
    assert result.broken.all(), "attacked in train mode: the eval-mode prediction did not flip"


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "square"])
def test_absent_bodies_stay_absent_unless_allowed(name):
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_classes=3)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(3, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = torch.rand(3, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
    skel[..., 1] = 0  # second body absent
    skel[0, :, 5:, :, 0] = 0  # first body leaves after frame 5 in clip 0
    labels = torch.tensor([0, 1, 2])
    steps = 1 if name == "fgsm" else 40 if name == "square" else 3
    base = AttackConfig(name=name, mode="S", steps=steps, eps_skel=16 / 255, random_start=name != "fgsm")
    _, adv = attack(model, rgb, skel, labels, base, seed=0)
    assert (adv[..., 1] == 0).all() and (adv[0, :, 5:, :, 0] == 0).all(), "a ghost body appeared"
    assert (adv[..., 0] != skel[..., 0]).any(), "the present body did not move"
    if name == "pgd":
        allowed = AttackConfig(**{**base.to_dict(), "perturb_absent_bodies": True})
        _, adv = attack(model, rgb, skel, labels, allowed, seed=0)
        assert (adv[..., 1] != 0).any()


def test_diagnostics_flag_a_masked_model_and_not_a_healthy_one():
    suite = build_suite(["pgd10", "square300"], modes=["RS"])
    healthy, _ = evaluate(LinearStub(), META, stub_data(), suite)
    assert healthy["diagnostics"]["flags"] == []
    masked, records = evaluate(LinearStub(detach=True), META, stub_data(), suite)
    checks = {f["check"] for f in masked["diagnostics"]["flags"]}
    assert {"zero_gradient", "black_box", "unbounded"} <= checks, masked["diagnostics"]
    assert masked["diagnostics"]["zero_gradient"]["all"] == 100.0
    # PGD cannot move the masked model; Square, reading scores only, breaks what PGD left.
    pgd, square = masked["attacks"]
    assert pgd["modes"]["RS"]["accuracy"] > square["modes"]["RS"]["accuracy"]


def test_dlr_needs_three_classes_and_cascade_orders_cheapest_white_box_first():
    model = build_model(preset_config("tiny", num_classes=2)).eval()
    data = torch.utils.data.TensorDataset(torch.rand(1, 3, 8, 32, 32), torch.rand(1, 3, 16, 25, 2), torch.tensor([0]))
    with pytest.raises(ConfigError, match="3 classes"):
        run_records(model, data, build_suite(["apgd-dlr"]))
    suite = build_suite(["square100", "apgd-ce", "fgsm", "pgd20"], modes=["R", "RS"], eps=[4, 8])
    chains = cascade_order(suite)
    assert [[suite[i].label for i in chain] for chain in chains] == [["FGSM", "PGD20", "APGD-CE100", "Square100"]] * 4
    assert [suite[chain[0]].mode for chain in chains] == ["R", "RS", "R", "RS"]


def test_compare_reads_v1_and_v2_and_the_worst_case():
    v2, _ = evaluate(LinearStub(), META, stub_data(), build_suite(["pgd10"]))
    v1 = {"schema": "robustact.report/v1", "model": {"name": "old"}, "clean": {"accuracy": 80.0},
          "attacks": [{"label": "PGD10", "eps_rgb": 8 / 255, "eps_skel": 8 / 255,
                       "modes": {m: {"accuracy": 10.0} for m in ("R", "S", "RS")}}]}
    table = compare([v1, v2], attack="PGD10")
    assert table["rows"][0]["wc"] is None and table["rows"][1]["wc"] == pytest.approx(100 / 3)
    worst = compare([v2], attack="worst-case")
    assert worst["rows"][0]["RS"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------- attack strings


def attack_spec_candidates() -> list[str]:
    """Strings near the attack-spec grammar: every name with counts around the bounds,
    other cases, spaces, leading zeros, non-ASCII digits, and a seeded fuzz of fragments."""
    import random

    names = ATTACKS + ("autoattack",)
    counts = ["", "0", "00", "01", "007", "1", "2", "9", "10", "20", "99", "100", "999", "1000", "1001", "5000",
              "9999", "10000", "10001", "99999", "999999999", "9" * 5000, "٣", "²", "-5", "+5", " 5", "1.5", "1e3",
              "1\n"]
    out = [name + count for name in names for count in counts]
    out += [variant for name in names for variant in (name.upper(), name.title(), f" {name}", f"{name} ", f"{name}\n",
                                                       name[:-1], f"{name}-", f"{name}x5")]
    fragments = ["pgd", "cw", "apgd", "-ce", "-dlr", "square", "fgsm", "auto", "attack", "0", "1", "5", "9", "00",
                 " ", "P", "-", ""]
    rng = random.Random(0)
    out += ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    return out


def accepted_by_the_engine(spec: str) -> bool:
    try:
        build_suite([spec], modes=["RS"])
    except ConfigError:
        return False
    return True


def test_the_attack_spec_pattern_admits_exactly_what_the_engine_parses():
    """ATTACK_SPEC_PATTERN (the API's schema pattern) and parse_attack_spec (the CLI) agree
    string for string, near the grammar and over every count up to the bounds."""
    for spec in attack_spec_candidates():
        assert bool(re.fullmatch(ATTACK_SPEC_PATTERN, spec)) == accepted_by_the_engine(spec), spec[:40]
    for name in ATTACKS[1:]:  # every count the engine takes matches, and the next one is refused by both
        for k in range(1, max_steps(name) + 2):
            assert bool(re.fullmatch(ATTACK_SPEC_PATTERN, f"{name}{k}")) == (k <= max_steps(name)), f"{name}{k}"
            assert accepted_by_the_engine(f"{name}{k}") == (k <= max_steps(name)), f"{name}{k}"
    assert max(len(s) for s in attack_spec_candidates() if accepted_by_the_engine(s)) == ATTACK_SPEC_MAX_LENGTH


@pytest.mark.parametrize("spec,words", [
    ("pgd999999999", f"at most {MAX_STEPS} steps"), ("cw1001", f"at most {MAX_STEPS} steps"),
    ("apgd-ce1001", "at most"), ("apgd-dlr1001", "at most"), ("square10001", f"at most {MAX_QUERIES} queries"),
    ("pgd" + "9" * 5000, "at most"), ("pgd0", "at least 1"), ("pgd020", "leading zeros"), ("fgsm1", "no step count"),
    ("PGD20", "lower case"), (" autoattack", "lower case"), ("pgd٣", "unknown attack"), ("deepfool", "unknown attack"),
])
def test_attack_strings_out_of_bounds_are_config_errors(spec, words):
    """What the CLI says (its --attacks go through build_suite); long input is cut short."""
    with pytest.raises(ConfigError, match=words) as caught:
        build_suite([spec])
    assert caught.value.field == "attacks" and len(str(caught.value)) < 300


def test_attack_counts_at_the_bounds():
    assert parse_attack_spec(f"pgd{MAX_STEPS}") == ("pgd", MAX_STEPS)
    assert parse_attack_spec(f"square{MAX_QUERIES}") == ("square", MAX_QUERIES)
    assert parse_attack_spec("square") == ("square", 5000) and parse_attack_spec("cw") == ("cw", 30)
    assert AttackConfig(name="square", steps=MAX_QUERIES).steps == MAX_QUERIES
    with pytest.raises(ConfigError, match="steps"):
        AttackConfig(name="pgd", steps=MAX_STEPS + 1)
    with pytest.raises(ConfigError, match="steps"):
        AttackConfig(name="square", steps=MAX_QUERIES + 1)


def test_report_gives_eps_skel_in_metres_per_axis():
    """ε_S is a fraction of the model's skeleton range: 8/255 of a 2 m x-range is 62.7 mm."""
    model = LinearStub()
    data = stub_data()
    suite = build_suite(["pgd5"], modes=["S"], eps=[8])
    meta = {**META, "normalisation": {"skel_min": [-1.0, -0.5, 2.0], "skel_max": [1.0, 1.5, 5.0]}}
    report, _ = evaluate(model, meta, data, suite, batch_size=4)
    expected = [8 / 255 * 2.0, 8 / 255 * 2.0, 8 / 255 * 3.0]
    assert report["attacks"][0]["eps_skel_metres"] == pytest.approx(expected, abs=1e-6)
    assert report["worst_case"][0]["eps_skel_metres"] == pytest.approx(expected, abs=1e-6)
    from robustact.models.report import format_report

    assert "at most 62.7 / 62.7 / 94.1 mm along x / y / z" in format_report(report)
    report, _ = evaluate(model, META, data, suite, batch_size=4)
    assert report["attacks"][0]["eps_skel_metres"] is None
