"""The eager PyTorch AdaDFQ reference is the spec's algorithm, and `bench compare` runs it."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dfq_jax.reference import torch_adadfq as ref  # noqa: E402  (after importorskip)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "x, k, lo, hi, expected",
  [
    ([0, 0.1, 0.2, 0.3], 2, 0.0, 0.3, [0, 0.1, 0.2, 0.3]),
    ([-1, -0.3, 0, 0.26, 0.5, 1], 2, -1.0, 1.0, [-1.3333333, 0, 0, 0, 0.6666667, 0.6666667]),
    ([0, 0.4, 1, 2, 3.5, 4], 3, 0.0, 4.0, [0, 0.5714286, 1.1428571, 2.2857143, 3.4285714, 4.0]),
  ],
)
def test_asym_fake_quant_known_values(x, k, lo, hi, expected):
  # methods.md §0 (a)(b)(c): half-to-even rounding of the zero point and of s*x - zp.
  out = ref.asym_fake_quant(torch.tensor(x), k, lo, hi)
  np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_quant_act_bias_corrected_ema_sequence():
  act = ref.QuantAct(bits=4)
  seen = []
  for value in (1.0, 1.0, 1.0, 2.0):
    act(torch.full((2, 3), value))
    seen.append(float(act.x_max))
  np.testing.assert_allclose(seen, [1.0, 5.263158, 17.848126, 47.290821], rtol=5e-6)
  np.testing.assert_allclose(float(act.x_min), float(act.x_max), rtol=1e-6)


def test_ste_gradient_is_all_ones_outside_the_range():
  x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0], requires_grad=True)
  ref.fake_quant_ste(x, 2, torch.tensor(-0.5), torch.tensor(0.5)).sum().backward()
  np.testing.assert_array_equal(x.grad.numpy(), np.ones(6))
  # Weights: the same STE; per output channel ranges, no gradient through them.
  conv = ref.QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3), bits=2)
  conv(torch.randn(1, 2, 5, 5)).sum().backward()
  assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_adadfq_losses_known_values():
  # methods.md §0: adadfq_generator_losses and adadfq_q_loss.
  t = torch.tensor([[2.0, 0, 0], [0, 1, 0], [1, 1, 1], [3, -1, 0]])
  q = torch.tensor([[1.0, 0, 0], [0, 0, 0.5], [0, 0, 1], [0, 2, 0]])
  y = torch.tensor([0, 1, 2, 0])
  terms = ref.adadfq_generator_terms(t, q, y, lambda_l=0.1, lambda_u=0.8)
  np.testing.assert_allclose(
    terms["entropy"].numpy(), [0.975328, 0.905959, 1.017357, 0.207022], atol=1e-6
  )
  np.testing.assert_allclose(
    terms["entropy_norm"].numpy(), [0.861725, 0.783922, 0.908865, 0], atol=1e-6
  )
  np.testing.assert_allclose(float(terms["margin"]), 0.0676476, atol=1e-6)
  np.testing.assert_allclose(float(terms["ds"]), 0.7321885, atol=1e-6)
  np.testing.assert_allclose(float(terms["as"]), 0.3741208, atol=1e-6)
  np.testing.assert_allclose(float(ref.adadfq_q_loss(t, q, 20.0)), -438.59459, rtol=1e-6)
  np.testing.assert_allclose(float(ref.adadfq_q_loss(t, q, 5.0)), -26.672192, rtol=1e-6)
  # BN-statistics loss, one layer (§0): 0.75.
  stats = [(torch.tensor([0.5, -0.5]), torch.tensor([2.0, 1.0]), torch.zeros(2), torch.ones(2))]
  np.testing.assert_allclose(float(ref.bn_stat_loss(stats)), 0.75, rtol=1e-6)


def test_student_structure():
  step = ref.AdaDFQStep(batch=2)
  mods = list(step.student.modules())
  assert sum(isinstance(m, ref.QuantAct) for m in mods) == 19  # after every ReLU
  assert sum(isinstance(m, (ref.QuantConv2d, ref.QuantLinear)) for m in mods) == 20
  assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in mods)
  assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in step.teacher.modules()) == 19
  assert step.generator(torch.randn(2, 100), torch.tensor([0, 1])).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
  "network, parameters, acts, quantized, bns",
  [("resnet18", 11_689_512, 17, 21, 20), ("mobilenetv2", 3_504_960, 36, 54, 53)],
)
def test_imagenet_networks_are_the_pytorchcv_architectures(
  network, parameters, acts, quantized, bns
):
  generator, teacher, classes, temperature = ref.build_networks(network)
  # pytorchcv resnet18 / mobilenetv2_w1 parameter counts; the ImageNet generator of §2.2.
  assert sum(p.numel() for p in teacher.parameters()) == parameters
  assert (classes, temperature) == (1000, 5.0)
  assert generator.fc.out_features == 128 * 56 * 56
  images = generator.train()(torch.randn(2, 100), torch.tensor([3, 999]))
  assert images.shape == (2, 3, 224, 224)
  assert teacher.eval()(images).shape == (2, 1000)
  student = ref.quantize_model(copy.deepcopy(teacher), 4, 4)
  mods = list(student.modules())
  assert sum(isinstance(m, ref.QuantAct) for m in mods) == acts  # after every ReLU(6)
  assert sum(isinstance(m, (ref.QuantConv2d, ref.QuantLinear)) for m in mods) == quantized
  assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()) == bns
  with pytest.raises(ValueError, match="unknown --network"):
    ref.build_networks("vgg16")


def test_imagenet_step_losses_at_initialisation():
  losses = ref.AdaDFQStep(batch=2, network="resnet18").step()
  # Q = 4-bit copy of P: t - q is nearly constant, H ~ log 1000, so L_Q ~ -5^2 log 1000.
  assert abs(float(losses["loss_Q"]) + 25 * math.log(1000)) < 0.5
  assert abs(float(losses["ce_ds"]) - math.log(1000)) < 0.5
  assert all(math.isfinite(float(v)) for v in losses.values())


def test_teacher_gradients_as_in_the_original_code_unless_frozen():
  """The original only calls model_teacher.eval(): its weight gradients are computed."""
  original = ref.AdaDFQStep(batch=2)
  original.step()
  assert all(
    p.grad is not None and torch.any(p.grad != 0)
    for p in original.teacher.parameters()
    if p.ndim == 4
  )
  frozen = ref.AdaDFQStep(batch=2, frozen_teacher=True)
  frozen.step()
  assert not any(p.requires_grad for p in frozen.teacher.parameters())
  assert all(p.grad is None for p in frozen.teacher.parameters())


def test_reference_cli_prints_one_json_line_with_step0_losses():
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.reference.torch_adadfq",
      "--batch",
      "4",
      "--steps",
      "2",
      "--warmup",
      "1",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  row = json.loads(lines[0])
  assert row["impl"] == "torch" and row["batch"] == 4 and row["timed_steps"] == 2
  assert 0 < row["min_step_s"] <= row["median_step_s"] <= row["max_step_s"]
  assert row["images_per_s"] > 0 and row["threads"] >= 1 and row["torch_version"]
  loss = row["losses_step0"]
  assert all(math.isfinite(v) for v in loss.values())
  # Q starts as a 4-bit copy of P with the first batch's exact range: t - q is nearly
  # constant, so H(softmax((t - q)/20)) ~ log 10 (speed-notes.md: -921.03).
  assert abs(loss["loss_Q"] + 400 * math.log(10)) < 0.5
  assert abs(loss["ce_ds"] - math.log(10)) < 0.3 and 1.0 < loss["ce_as"] < 4.0
  assert 0.1 / 4 - 1e-6 <= loss["margin"] < 0.3  # the batch-min sample alone gives 0.1/B
  assert 0.2 < loss["bns"] < 3.0
  expected_g = loss["margin"] + 0.2 * loss["ce_ds"] + 0.1 * loss["ce_as"] + loss["bns"]
  assert abs(loss["loss_G"] - expected_g) < 1e-4


def _compare(*extra):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.bench",
      "compare",
      "--config=configs/cifar10_resnet20.py:adadfq,w4a4",
      "--batch=4",
      "--steps=1",
      "--warmup=0",
      "--rounds=1",
      *extra,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_bench_compare_runs_both_implementations():
  proc = _compare("--config.seed=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["jax_median_step_s"] > 0 and row["torch_median_step_s"] > 0
  assert row["speedup"] > 0
  assert len(row["jax_round_median_step_s"]) == len(row["torch_round_median_step_s"]) == 1
  assert row["overrides"] == ["--config.seed=1"] and row["batch"] == 4
  assert row["flops_per_step"] > 1e8 and row["jax_compile_s"] > 0
  assert 0 < row["jax_peak_fraction"] < 1


def test_bench_compare_without_torch_says_how_to_install():
  proc = _compare("--torch_python=/bin/false")
  assert proc.returncode != 0
  assert "pip install torch==2.13.0" in proc.stderr and "--torch_python" in proc.stderr


@pytest.mark.parametrize(
  "config, message",
  [
    ("configs/cifar10_resnet20.py:gdfq,w4a4", "times the AdaDFQ loop"),
    ("configs/imagenet_resnet50.py:adadfq,w4a4", "has no 'resnet50'"),
  ],
)
def test_bench_compare_refuses_what_the_reference_cannot_run(config, message):
  proc = subprocess.run(
    [sys.executable, "-m", "dfq_jax.bench", "compare", f"--config={config}", "--rounds=1"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]


def test_bf16_autocast_step_matches_float32_up_to_bf16_rounding():
  f32 = ref.AdaDFQStep(batch=4, seed=3).step()
  bf16 = ref.AdaDFQStep(batch=4, seed=3, bf16=True).step()
  for key in ("loss_Q", "ce_ds", "ce_as", "bns", "loss_G"):
    assert float(bf16[key]) == pytest.approx(float(f32[key]), rel=3e-2), key
  assert float(bf16["bns"]) != float(f32["bns"])  # really ran in bfloat16
