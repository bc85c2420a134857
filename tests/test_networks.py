"""Networks: I3D, HCN, AMR and the fusion model, against the reference facts of DESIGN.md
section 4 and the AMR equations 8-10. Full-size models are only built on the meta device
(shapes without memory or compute); everything that computes uses the tiny preset."""

import pytest
import torch
import torch.nn.functional as F

from robustact.models.amr import AMR
from robustact.models.config import AMR_PAIRS, preset_config
from robustact.models.fusion import ActionNet, ModelOutput, build_model
from robustact.models.hcn import HCN, STAGES
from robustact.models.i3d import ENDPOINTS, I3D, MaxPool3dSame, same_padding

K = 5


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = torch.rand(b, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
    return rgb, skel


def _shape_recorder(names, store):
    def make(name):
        def hook(x):
            store[name] = tuple(x.shape[1:])
            return x
        return hook
    return {n: make(n) for n in names}


@pytest.fixture(scope="module")
def tiny():
    return preset_config("tiny", num_classes=K)


# --------------------------------------------------------------------------- I3D


def test_i3d_parameter_count_at_full_width():
    with torch.device("meta"):
        model = I3D(60)
    assert _count(model) == pytest.approx(12.35e6, rel=0.01)


def test_i3d_endpoints_in_reference_order():
    with torch.device("meta"):
        model = I3D(60)
    assert list(model.features) == [
        "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
        "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
        "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]
    assert tuple(model.features) == ENDPOINTS


def test_i3d_tf_same_shapes_at_64x224x224():
    with torch.device("meta"):
        model = I3D(60)
        x = torch.empty(1, 3, 64, 224, 224)
    seen = {}
    out = model.forward_features(x, _shape_recorder(ENDPOINTS, seen))
    assert tuple(out.shape) == (1, 1024, 8, 7, 7)
    assert seen["Conv3d_1a_7x7"] == (64, 32, 112, 112)
    assert seen["MaxPool3d_2a_3x3"] == (64, 32, 56, 56)
    assert seen["Conv3d_2c_3x3"] == (192, 32, 56, 56)
    assert seen["Mixed_3c"] == (480, 32, 28, 28)
    assert seen["Mixed_4f"] == (832, 16, 14, 14)
    assert seen["Mixed_5b"] == (832, 8, 7, 7)
    assert seen == model.feature_shapes(64, 224)
    assert tuple(model(x).shape) == (1, 60)


def test_tf_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(8, 2, 2) == (0, 0)
    assert same_padding(7, 2, 2) == (0, 1)


def test_same_max_pool_ignores_padding_for_negative_inputs():
    x = -1.0 - torch.rand(1, 1, 1, 4, 4)
    out = MaxPool3dSame((1, 3, 3), (1, 2, 2))(x)  # pads one row/column after
    assert out.shape == (1, 1, 1, 2, 2)
    assert out[0, 0, 0, 1, 1] == x[0, 0, 0, 2:, 2:].max()  # zero padding would give 0


def test_i3d_analytic_shapes_match_a_real_forward_and_width_scales_channels(tiny):
    model = I3D(K, width=tiny.i3d_width).eval()
    seen = {}
    with torch.no_grad():
        model.forward_features(_batch(tiny)[0], _shape_recorder(ENDPOINTS, seen))
    assert seen == model.feature_shapes(tiny.rgb_frames, tiny.rgb_size)
    assert model.num_features == round(1024 * tiny.i3d_width) == seen["Mixed_5c"][0]


# --------------------------------------------------------------------------- HCN


def test_hcn_parameter_count():
    assert _count(HCN(60, frames=32, joints=25, persons=2)) == pytest.approx(0.785e6, rel=0.01)


@pytest.mark.parametrize("frames", [32, 16, 8])
def test_hcn_stage_shapes_and_short_clips(frames):
    model = HCN(K, frames=frames).eval()
    seen = {}
    x = torch.rand(3, 3, frames, 25, 2)
    with torch.no_grad():
        feat = model.forward_features(x, _shape_recorder(STAGES, seen))
        logits = model(x)
    assert seen == model.feature_shapes()
    assert seen["conv4"][0] == 128 and seen["conv5"][0] == 128 and seen["conv6"][0] == 256
    assert feat.shape[0] == 3 * 2  # persons folded into the batch
    assert model.forward_head(feat, pre_logits=True).shape == (3, 256)
    assert logits.shape == (3, K)
    if frames == 32:
        assert seen["conv6"] == (256, 2, 2)  # fc7 input 256 x T/16 x 2


def test_hcn_persons_share_weights_and_order_does_not_matter():
    model = HCN(K, frames=16).eval()
    x = torch.rand(2, 3, 16, 25, 2)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.flip(-1)), atol=1e-6)


def test_the_fused_skeleton_feature_is_dropped_out_once():
    """The fusion classifier drops out [f_RGB, f_skel] once (p = 0.5 each); the fc7
    feature it gets must not have been dropped out already (that kept a skeleton unit with
    probability 0.25). The unimodal HCN keeps its dropout before fc8."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=K)).train()
    hcn = model.hcn
    hcn.drop6.eval()  # the only dropout before fc7 in the head
    conv6 = torch.rand(2 * 2, 256, *hcn.feature_shapes()["conv6"][1:])
    features = [hcn.forward_head(conv6, persons=2, pre_logits=True) for _ in range(3)]
    assert all(torch.equal(features[0], f) for f in features[1:]), "fc7's feature is dropped out in training"
    unimodal = build_model(preset_config("tiny", num_classes=K, arch="skeleton")).hcn.train()
    unimodal.drop6.eval()
    logits = [unimodal.forward_head(conv6, persons=2) for _ in range(2)]
    assert not torch.equal(logits[0], logits[1]), "unimodal HCN lost its dropout before fc8"
    # The fusion classifier's own dropout acts on that feature: half the units on average.
    model.classifier.weight.data.zero_()
    model.classifier.bias.data.zero_()
    x = torch.ones(4000, model.classifier.in_features)
    kept = (model.dropout(x) != 0).float().mean().item()
    assert kept == pytest.approx(0.5, abs=0.02)


def test_hcn_rejects_a_clip_of_the_wrong_length():
    with pytest.raises(ValueError, match="T, V"):
        HCN(K, frames=32)(torch.rand(1, 3, 16, 25, 2))


# --------------------------------------------------------------------------- fusion + AMR


@pytest.mark.parametrize("arch", ["fusion", "rgb", "skeleton"])
def test_forward_shapes_of_every_arch(tiny, arch):
    model = build_model(preset_config("tiny", num_classes=K, arch=arch)).eval()
    assert isinstance(model, ActionNet)
    with torch.no_grad():
        out = model(*_batch(tiny, b=3))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, K) and out.aux == []


@pytest.mark.parametrize("num_amr", [0, 1, 2, 3])
def test_one_aux_output_per_amr_with_full_feature_shapes(num_amr):
    cfg = preset_config("tiny", num_classes=K, num_amr=num_amr)
    model = build_model(cfg).eval()
    rgb, skel = _batch(cfg, b=3)
    with torch.no_grad():
        out = model(rgb, skel)
        rgb_seen, skel_seen = {}, {}
        model.i3d.forward_features(rgb, _shape_recorder(ENDPOINTS, rgb_seen))
        model.hcn.forward_features(skel, _shape_recorder(STAGES, skel_seen))
    assert out.logits.shape == (3, K)
    assert len(out.aux) == len(model.amrs) == num_amr
    for amr, (layer_rgb, layer_skel), aux in zip(model.amrs, AMR_PAIRS, out.aux):
        assert aux.shape == (3, K)
        assert (amr.layer_rgb, amr.layer_skel) == (layer_rgb, layer_skel)
        assert tuple(amr.w_rgb.shape) == (1, *rgb_seen[layer_rgb])
        assert tuple(amr.w_skel.shape) == (1, *skel_seen[layer_skel])


def test_amr_forward_is_equations_8_to_10():
    torch.manual_seed(0)
    amr = AMR((6, 2, 3, 3), (4, 2, 5), K, activation="sigmoid")
    with torch.no_grad():
        amr.w_rgb.normal_()
        amr.w_skel.normal_()
    x_rgb, x_skel = torch.randn(3, 6, 2, 3, 3), torch.randn(3 * 2, 4, 2, 5)
    r, s, aux = amr(x_rgb, x_skel, persons=2)
    w_r, w_s = torch.sigmoid(amr.w_rgb), torch.sigmoid(amr.w_skel)
    assert torch.allclose(r, x_rgb * w_r) and torch.allclose(s, x_skel * w_s)
    z_r = (x_rgb * w_r).mean(dim=(2, 3, 4))
    z_s = (x_skel * w_s).mean(dim=(2, 3)).view(3, 2, 4).max(dim=1).values
    assert torch.allclose(aux, amr.fc(torch.cat([z_r, z_s], dim=1)))


def test_identity_amr_at_one_is_a_no_op_on_the_logits(tiny):
    torch.manual_seed(0)
    plain = build_model(preset_config("tiny", num_classes=K)).eval()
    with_amr = build_model(preset_config("tiny", num_classes=K, num_amr=3, amr_activation="identity",
                                         amr_init=1.0)).eval()
    missing, unexpected = with_amr.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("amrs.") for k in missing)
    rgb, skel = _batch(tiny, b=3)
    with torch.no_grad():
        assert torch.equal(with_amr(rgb, skel).logits, plain(rgb, skel).logits)


def test_sigmoid_default_starts_at_one_half_and_amr_weights_report(tiny):
    cfg = preset_config("tiny", num_classes=K, num_amr=3)
    assert (cfg.amr_activation, cfg.amr_init) == ("sigmoid", 0.0)
    model = build_model(cfg)
    report = model.amr_weights()
    assert [r["index"] for r in report] == [1, 2, 3]
    for r, amr, (layer_rgb, layer_skel) in zip(report, model.amrs, AMR_PAIRS):
        assert set(r) == {"index", "layer_rgb", "layer_skel", "mean_rgb", "mean_skel",
                          "channel_mean_rgb", "channel_mean_skel"}
        assert (r["layer_rgb"], r["layer_skel"]) == (layer_rgb, layer_skel)
        assert r["mean_rgb"] == r["mean_skel"] == 0.5
        assert len(r["channel_mean_rgb"]) == amr.w_rgb.shape[1]
        assert len(r["channel_mean_skel"]) == amr.w_skel.shape[1]
        assert set(r["channel_mean_rgb"]) == set(r["channel_mean_skel"]) == {0.5}
    # the report follows the effective weights, not the raw parameters
    with torch.no_grad():
        model.amrs[0].w_skel.fill_(2.0)
    assert model.amr_weights()[0]["mean_skel"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert build_model(preset_config("tiny", num_classes=K)).amr_weights() == []


@pytest.mark.parametrize("arch,used,ignored", [("rgb", 0, 1), ("skeleton", 1, 0)])
def test_unimodal_model_ignores_the_other_input(tiny, arch, used, ignored):
    model = build_model(preset_config("tiny", num_classes=K, arch=arch)).eval()
    inputs = list(_batch(tiny, seed=0))
    other = list(inputs)
    other[ignored] = _batch(tiny, seed=1)[ignored]
    with torch.no_grad():
        assert torch.equal(model(*inputs).logits, model(*other).logits)
    inputs = [x.requires_grad_(True) for x in inputs]
    grads = torch.autograd.grad(model(*inputs).logits.sum(), inputs, allow_unused=True)
    assert grads[ignored] is None
    assert grads[used] is not None and grads[used].abs().sum() > 0


def test_gradients_reach_both_inputs_and_every_amr_parameter(tiny):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=K, num_amr=3)).eval()
    rgb, skel = (x.requires_grad_(True) for x in _batch(tiny))
    out = model(rgb, skel)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + sum(a.sum() for a in out.aux)
    loss.backward()
    for x in (rgb, skel):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for amr in model.amrs:
        for p in (amr.w_rgb, amr.w_skel, amr.fc.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout(tiny):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_classes=K, num_amr=2))
    rgb, skel = _batch(tiny)
    model.eval()
    with torch.no_grad():
        a, b = model(rgb, skel), model(rgb, skel)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.aux, b.aux))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(rgb, skel).logits, model(rgb, skel).logits)


def test_amr_model_rejects_rgb_clips_of_another_size(tiny):
    model = build_model(preset_config("tiny", num_classes=K, num_amr=1)).eval()
    rgb, skel = _batch(tiny)
    with pytest.raises(ValueError, match="AMR"):
        model(rgb[:, :, :4], skel)


def test_fusion_classifier_sees_pooled_i3d_and_fc7_features(tiny):
    model = build_model(preset_config("tiny", num_classes=K)).eval()
    f_rgb, f_skel, aux = model.forward_features(*_batch(tiny, b=3))
    assert f_rgb.shape == (3, round(1024 * tiny.i3d_width)) and f_skel.shape == (3, 256) and aux == []
    assert model.classifier.in_features == f_rgb.shape[1] + 256
    assert model.i3d.logits is None and model.hcn.fc8 is None  # no unused heads in fusion


def test_paper_size_fusion_with_three_amrs_builds_with_the_reference_shapes():
    with torch.device("meta"):
        model = build_model(preset_config("paper", num_classes=60, num_amr=3))
    shapes = [(tuple(a.w_rgb.shape[1:]), tuple(a.w_skel.shape[1:])) for a in model.amrs]
    assert shapes == [((1024, 8, 7, 7), (256, 2, 2)), ((832, 8, 7, 7), (128, 4, 4)),
                      ((832, 16, 14, 14), (128, 8, 8))]


def test_stride_one_same_max_pool_matches_explicit_minus_inf_padding():
    x = -1.0 - torch.rand(1, 2, 3, 5, 5)
    expected = F.max_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), value=float("-inf")), 3, 1)
    assert torch.equal(MaxPool3dSame(3, 1)(x), expected)


def test_two_dimensional_skeletons_with_22_joints_run_through_hcn_amr_and_the_attacks():
    """iMiGUE-style input (issue 11, item 8): 2 coordinates, 22 upper-body joints, 1 body.
    HCN, the AMRs and every attack mode follow the config; 3-coordinate clips are refused."""
    from robustact.models.attacks import attack
    from robustact.models.config import AttackConfig, ConfigError

    cfg = preset_config("tiny", num_classes=K, num_amr=3, skel_channels=2, joints=22, persons=1)
    model = build_model(cfg).eval()
    assert model.hcn.in_channels == 2 and model.hcn.joints == 22
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
    skel = torch.rand(2, 2, cfg.skel_frames, 22, 1, generator=g)
    out = model(rgb, skel)
    assert out.logits.shape == (2, K) and len(out.aux) == 3
    labels = out.logits.argmax(1)
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, AttackConfig(name="pgd", mode="S", steps=3), seed=0)
    assert adv_skel.shape == skel.shape and (adv_skel - skel).abs().max() <= 8 / 255 + 1e-6
    assert not torch.equal(adv_skel, skel) and torch.equal(adv_rgb, rgb)
    with pytest.raises(ValueError, match=r"\(C, T, V\) = \(2, "):
        model(rgb, torch.rand(2, 3, cfg.skel_frames, 22, 1))
    with pytest.raises(ConfigError, match="skel_channels"):
        preset_config("tiny", num_classes=K, skel_channels=4)


def test_uploaded_skeletons_must_have_the_model_s_coordinates():
    import numpy as np

    from robustact.models.data.ntu import scale_skeleton
    from robustact.service.decoder import DecodeError, Geometry, _decode_skeleton

    geometry = Geometry(rgb_frames=8, rgb_size=32, skel_frames=16, joints=22, persons=1,
                        skel_min=(0.0, 0.0), skel_max=(1920.0, 1080.0), skel_channels=2)
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).uniform(100, 900, (30, 22, 2)).astype(np.float32))
    skel, info = _decode_skeleton(io.BytesIO(buffer.getvalue()), ".npy", "pose.npy", "skeleton", geometry, _limits())
    assert skel.shape == (2, 16, 22, 1) and 0 <= skel.min() and skel.max() <= 1
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((30, 22, 3), np.float32))
    with pytest.raises(DecodeError, match=r"3 coordinates per joint; this model expects 2 \(x, y\)"):
        _decode_skeleton(io.BytesIO(buffer.getvalue()), ".npy", "pose.npy", "skeleton", geometry, _limits())
    assert scale_skeleton(np.ones((2, 22, 2, 1)), (0.0, 0.0), (2.0, 4.0))[0, 0, :, 0].tolist() == [0.5, 0.25]


def _limits():
    from robustact.service.decoder import Limits

    return Limits(max_skeleton_frames=1000)
