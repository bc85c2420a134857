"""GPU readiness (issue 10): everything that runs on CUDA when present (attacks, training,
evaluation, classify's model) keeps float32 and gives the CPU's results within a stated
tolerance. The CUDA tests are skipped only when no GPU is present; the float32 checks run
everywhere.

Tolerances: CUDA's convolutions (cuDNN) and reductions sum in another order than the CPU's,
so logits differ by ~1e-5 relative. A PGD step moves a pixel by ±α, decided by the sign of
a gradient; where a gradient component is within rounding of 0 the two devices may step
opposite ways, so adversarial inputs are compared by the share of elements that differ by
more than 1e-4 (at most 1 %) and the attack's outcome by the share of clips whose "broken"
verdict differs (at most 1 clip in 16).
"""

from __future__ import annotations

import pytest
import torch

from robustact.models.attacks import run_attack
from robustact.models.config import AttackConfig, TrainConfig, preset_config
from robustact.models.evaluate import run_records
from robustact.models.fusion import build_model
from robustact.models.train import train
from tests.test_train import TensorClips

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PGD = AttackConfig(name="pgd", mode="RS", steps=10, eps_rgb=8 / 255, eps_skel=8 / 255, alpha_rgb=2 / 255,
                   alpha_skel=2 / 255, random_start=True)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(preset_config("tiny", num_classes=3)).eval()


def test_models_and_attacks_are_float32_by_default():
    model = _model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    data = TensorClips(model.cfg, n=4)
    result = run_attack(model, data.rgb, data.skel, data.labels, PGD, seed=0, clip_ids=[0, 1, 2, 3])
    assert result.rgb.dtype == torch.float32 and result.skel.dtype == torch.float32


@cuda
def test_an_attack_on_cuda_agrees_with_the_cpu():
    model = _model()
    data = TensorClips(model.cfg, n=16, seed=1)
    ids = list(range(16))
    cpu = run_attack(model, data.rgb, data.skel, data.labels, PGD, seed=5, clip_ids=ids)
    gpu_model = _model().cuda()
    gpu = run_attack(gpu_model, data.rgb.cuda(), data.skel.cuda(), data.labels.cuda(), PGD, seed=5, clip_ids=ids)
    assert gpu.rgb.device.type == "cuda" and gpu.rgb.dtype == torch.float32
    with torch.no_grad():
        logits_cpu = model(data.rgb, data.skel).logits
        logits_gpu = gpu_model(data.rgb.cuda(), data.skel.cuda()).logits.cpu()
    assert torch.allclose(logits_cpu, logits_gpu, rtol=1e-4, atol=1e-5)
    for a, b in ((cpu.rgb, gpu.rgb.cpu()), (cpu.skel, gpu.skel.cpu())):
        assert ((a - b).abs() > 1e-4).float().mean().item() <= 0.01
    assert (cpu.broken != gpu.broken.cpu()).sum().item() <= 1


@cuda
def test_training_evaluation_on_cuda_and_the_checkpoint_loads_on_cpu(tmp_path):
    from robustact.models.checkpoint import load_checkpoint

    cfg = preset_config("tiny", num_classes=3)
    data = TensorClips(cfg, n=8)
    summary = train(cfg, TrainConfig(defence="at-rs", epochs=1, batch_size=4,
                                     attack=AttackConfig(name="pgd", mode="RS", steps=2)),
                    data, tmp_path / "run", preset="tiny", device="cuda")
    assert summary["epochs"] == 1
    model, meta = load_checkpoint(tmp_path / "run" / "model", device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"
    gpu_model, _ = load_checkpoint(tmp_path / "run" / "model", device=torch.device("cuda"))
    records_cpu = run_records(model, data, [PGD], batch_size=4, seed=2, device="cpu")
    records_gpu = run_records(gpu_model, data, [PGD], batch_size=4, seed=2, device="cuda")
    assert (records_cpu.clean_pred == records_gpu.clean_pred).mean() >= 7 / 8
    assert (records_cpu.outcome != records_gpu.outcome).sum() <= 1
