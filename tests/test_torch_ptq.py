"""The eager PyTorch PTQ-synthesis reference computes our objective, and `bench synth` runs it."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dfq_jax import config_base, losses  # noqa: E402  (after importorskip)
from dfq_jax.ptq import synthesis  # noqa: E402
from dfq_jax.reference import torch_ptq as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
# Per-layer BN inputs [B, C, H, W] (B = 5 > L = 3: LSE 'modulo' wraps, 'diagonal' stops).
SHAPES = {"l0": (5, 3, 4, 4), "l1": (5, 4, 3, 2), "l2": (5, 2, 2, 2)}


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _jax_moments(x):
  """Per-sample mean and biased spatial variance of x [B, H, W, C], as our BatchNorm sows."""
  mean = jnp.mean(x, axis=(1, 2))
  return {"mean": mean, "var": jnp.mean(jnp.square(x - mean[:, None, None]), axis=(1, 2))}


def _layers(rng, offset=0.0):
  """Random BN inputs {name: [B, C, H, W]} (float32)."""
  return {k: (rng.normal(size=s) * 1.3 + offset).astype(np.float32) for k, s in SHAPES.items()}


def _running(rng):
  return {
    k: {
      "mean": rng.normal(size=s[1]).astype(np.float32) * 0.5,
      "var": rng.uniform(0.5, 2.0, size=s[1]).astype(np.float32),
    }
    for k, s in SHAPES.items()
  }


def _torch_stats(inputs, running):
  return [
    (*ref.per_sample_moments(torch.tensor(a)), torch.tensor(r["mean"]), torch.tensor(r["var"]))
    for a, r in zip(inputs.values(), running.values())
  ]


def _jax_stats(inputs, positions):
  tree = {k: _jax_moments(_nhwc(a)) for k, a in inputs.items()}
  return losses.to_unbiased_var(tree, positions)


def _close(actual, expected, rtol=RTOL, atol=0.0):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize("method, preset", [("zeroq_ptq", "zeroq"), ("dsg_ptq", "dsg")])
def test_presets_are_our_ptq_presets(method, preset):
  config = config_base.base_config()
  config_base.apply_ptq_preset(config, method)
  ours = dataclasses.asdict(synthesis.PtqHparams.from_config(config))
  assert {k: ours[k] for k in ref.PRESETS[preset]} == ref.PRESETS[preset]
  assert set(ours) - set(ref.PRESETS[preset]) == {"steps", "batches"}


def test_sda_margins_and_lse_equal_ours():
  rng = np.random.default_rng(0)
  inputs, reference, running = _layers(rng, 0.3), _layers(rng), _running(rng)
  positions = {k: s[2] * s[3] for k, s in SHAPES.items()}
  stats_t, stats_j = _torch_stats(inputs, running), _jax_stats(inputs, positions)
  for (mean, var, _, _), node in zip(stats_t, stats_j.values()):  # unbiased variance
    _close(mean, node["mean"], atol=1e-6)
    _close(var, node["var"])
  margins_t = ref.slack_margins(_torch_stats(reference, running), 30.0)
  margins_j = losses.sda_margins(
    _jax_stats(reference, positions), running, percentile=30.0, stat="std", level="sample"
  )
  for (d_mean, d_std), node in zip(margins_t, margins_j.values()):
    _close(d_mean, node["mean"])
    _close(d_std, node["var"])
  values = {}
  for lse in ("off", "diagonal", "modulo"):
    for name, m_t, m_j in (("none", None, (0.0, 0.0)), ("slack", margins_t, margins_j)):
      ours = losses.sda_loss_per_sample(
        stats_j, running, margins=m_j, stat="std", lse=lse, lse_scale=2.0, reduction="sum"
      )
      theirs = ref.sda_loss(stats_t, m_t, lse, 2.0)
      _close(theirs, ours)
      values[lse, name] = float(theirs)
  # Non-trivial: margins hide part of the gaps, LSE raises the loss.
  assert 0 < values["off", "slack"] < values["off", "none"] < values["diagonal", "none"]
  assert values["modulo", "none"] > values["diagonal", "none"]  # all 5 samples enhanced


@pytest.mark.parametrize("batch, layers", [(5, 3), (25, 22), (3, 19)])
def test_lse_weights_equal_ours(batch, layers):
  for mode in ("diagonal", "modulo"):
    _close(
      ref.lse_weights(batch, layers, mode, 2.0),
      losses.lse_weights(batch, layers, mode=mode, scale=2.0),
    )


def test_image_priors_ce_jitter_and_sci_equal_ours():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(4, 3, 8, 8)).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  logits = rng.normal(size=(4, 10)).astype(np.float32) * 3
  labels = np.array([0, 9, 3, 3])
  xt, xj = torch.tensor(x), _nhwc(x)
  _close(ref.input_prior_loss(xt), losses.input_prior_loss(xj))
  _close(ref.total_variation_l2(xt), losses.total_variation_l2(xj))
  _close(ref.l2_norm_prior(xt), losses.l2_norm_prior(xj))
  ce = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
  _close(ce, jnp.mean(losses.cross_entropy(logits, labels)))
  for shift in (-7, 0, 3, 29):
    _close(_nhwc(ref.jitter_images(xt, shift)), jnp.roll(xj, (shift, shift), axis=(1, 2)))
  sci = ref.sci_loss(xt, torch.tensor(noise))
  _close(sci, losses.sci_loss(xj, _nhwc(noise), differentiable=False), rtol=1e-4)
  assert sci > 0.01


def _tiny_teacher(x, w, layout):
  """logits [B, K] and two BN inputs of x: 1.5 x + 0.2 and tanh of a strided crop."""
  if layout == "nchw":
    return x.mean((2, 3)) @ w, [1.5 * x + 0.2, torch.tanh(x[:, :2, ::2, ::2])]
  bn = {"l0": _jax_moments(1.5 * x + 0.2), "l1": _jax_moments(jnp.tanh(x[:, ::2, ::2, :2]))}
  return x.mean((1, 2)) @ w, bn


@pytest.mark.parametrize("method, preset", [("zeroq_ptq", "zeroq"), ("dsg_ptq", "dsg")])
def test_objective_and_gradient_equal_synthesis_loss(method, preset):
  """The whole objective through a tiny teacher whose BN inputs we control."""
  rng = np.random.default_rng(2)
  hp = synthesis.PtqHparams(**config_base.PTQ_PRESETS[method])
  x = rng.uniform(size=(4, 3, 8, 8)).astype(np.float32)
  x_ref = rng.uniform(size=x.shape).astype(np.float32)
  w = rng.normal(size=(3, 10)).astype(np.float32) * 4
  labels = np.array([1, 2, 7, 7])
  running = {
    k: {"mean": rng.normal(size=c).astype(np.float32), "var": rng.uniform(0.5, 2, c)}
    for k, c in (("l0", 3), ("l1", 2))
  }
  running = jax.tree.map(lambda a: np.asarray(a, np.float32), running)
  positions, key = {"l0": 64, "l1": 16}, jax.random.key(5)
  teacher_apply = lambda v: _tiny_teacher(v, jnp.asarray(w), "nhwc")
  margins_j = (0.0, 0.0)
  if hp.slack:
    _, ref_bn = teacher_apply(_nhwc(x_ref))
    margins_j = losses.sda_margins(
      losses.to_unbiased_var(ref_bn, positions),
      running,
      percentile=30.0,
      stat="std",
      level="sample",
    )
  (total_j, terms_j), grad_j = jax.value_and_grad(synthesis.synthesis_loss, 1, has_aux=True)(
    hp,
    _nhwc(x),
    jnp.asarray(labels),
    key,
    teacher_apply=teacher_apply,
    running=running,
    margins=margins_j,
    positions=positions,
    num_layers=2,
  )

  def stats_of(images):
    _, inputs = _tiny_teacher(images, torch.tensor(w), "nchw")
    run = [(torch.tensor(r["mean"]), torch.tensor(r["var"])) for r in running.values()]
    return [(*ref.per_sample_moments(a), *r) for a, r in zip(inputs, run)]

  k_jitter, k_noise = jax.random.split(key)  # the draws of synthesis_loss
  shift = int(jax.random.randint(k_jitter, (), -hp.jitter, hp.jitter)) if hp.jitter else 0
  noise = torch.tensor(np.asarray(jax.random.normal(k_noise, (4, 8, 8, 3))).transpose(0, 3, 1, 2))
  xt = torch.tensor(x, requires_grad=True)
  logits, _ = _tiny_teacher(xt, torch.tensor(w), "nchw")
  total_t, terms_t = ref.synthesis_objective(
    ref.PRESETS[preset],
    xt,
    logits,
    stats_of(xt),
    torch.tensor(labels),
    margins=ref.slack_margins(stats_of(torch.tensor(x_ref))) if hp.slack else None,
    shift=shift,
    noise=noise,
    num_layers=2,
  )
  total_t.backward()
  assert set(terms_t) == set(terms_j)
  assert set(terms_t) == (
    {"bn", "input_prior"}
    if preset == "zeroq"
    else {"bn", "input_prior", "sci", "ce", "tv_l2", "l2"}
  )
  for name in terms_t:
    _close(terms_t[name].detach(), terms_j[name], rtol=1e-4 if name == "sci" else RTOL)
  _close(total_t.detach(), total_j)
  _close(_nhwc(xt.grad), grad_j, rtol=1e-4, atol=1e-6)


def test_plateau_scheduler_matches_plateau_update():
  # Improvements below the relative threshold 1e-4 do not count; patience 2; floor 1e-3.
  seq = [5.0, 4.0, 4.0, 4.0, 4.0, 3.9999, 3.9999, 3.9999, 3.0, 2.0, 2.1, 2.0, 1.99995]
  seq += [2.5] * 12 + [1.0, 1.0]
  param = torch.zeros(1, requires_grad=True)
  opt = torch.optim.Adam([param], lr=0.5)
  scheduler = ref.plateau_scheduler(opt, patience=2, min_lr=1e-3)
  lr, best, bad = jnp.float32(0.5), jnp.float32(jnp.inf), jnp.int32(0)
  lrs_t, lrs_j = [], []
  for loss in seq:
    lrs_t.append(opt.param_groups[0]["lr"])
    lrs_j.append(float(lr))
    scheduler.step(loss)
    lr, best, bad = synthesis.plateau_update(lr, best, bad, loss, patience=2, min_lr=1e-3)
  _close(lrs_t, lrs_j, rtol=1e-6)
  assert lrs_t[0] == 0.5 and math.isclose(lrs_t[-1], 1e-3) and len(set(lrs_t)) == 4


@pytest.mark.parametrize("preset", ["zeroq", "dsg"])
def test_cli_prints_one_json_line(preset):
  cmd = [sys.executable, "-m", "dfq_jax.reference.torch_ptq", "--network", "resnet20"]
  cmd += ["--preset", preset, "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  row = json.loads(lines[0])
  assert (row["impl"], row["network"], row["preset"], row["batch"]) == (
    "torch",
    "resnet20",
    preset,
    4,
  )
  assert 0 < row["min_step_s"] <= row["median_step_s"] <= row["max_step_s"]
  assert row["steps_per_s"] == pytest.approx(1 / row["median_step_s"])
  assert row["images_per_s"] == pytest.approx(4 * row["steps_per_s"])
  assert row["threads"] == 1 and row["torch_version"] and row["num_layers"] == 19
  terms = row["losses_step0"]
  assert all(math.isfinite(v) for v in terms.values())
  assert terms["lr"] == ref.PRESETS[preset]["lr"]
  others = sum(v for k, v in terms.items() if k in ("bn", "input_prior"))
  if preset == "dsg":  # SCI / 19 + 2 CE + 0.01 (TV + L2)
    others += terms["sci"] / 19 + 2 * terms["ce"] + 0.01 * (terms["tv_l2"] + terms["l2"])
    assert abs(terms["ce"] - math.log(10)) < 1.0
  assert terms["loss"] == pytest.approx(others, rel=1e-5)


def _bench_synth(config, *extra):
  cmd = [sys.executable, "-m", "dfq_jax.bench", "synth", f"--config={config}", *extra]
  return subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_bench_synth_runs_both_implementations():
  proc = _bench_synth(
    "configs/cifar10_resnet20.py:zeroq_ptq,w4a4",
    "--batch=4",
    "--steps=1",
    "--warmup=0",
    "--rounds=1",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  row = json.loads(lines[0])
  assert (row["preset"], row["network"], row["method"], row["batch"]) == (
    "zeroq",
    "resnet20",
    "zeroq_ptq",
    4,
  )
  assert row["jax_median_step_s"] > 0 and row["torch_median_step_s"] > 0
  assert row["speedup"] == pytest.approx(row["torch_median_step_s"] / row["jax_median_step_s"])
  assert len(row["jax_round_median_step_s"]) == len(row["torch_round_median_step_s"]) == 1
  assert row["flops_per_step"] > 1e7 and row["jax_compile_s"] > 0
  assert row["jax_images_per_s"] == pytest.approx(4 / row["jax_median_step_s"])
  # The same objective terms on both sides; random teachers, so only similar values.
  assert set(row["jax_losses_step0"]) == set(row["torch_losses_step0"])
  assert set(row["torch_losses_step0"]) == {"loss", "lr", "bn", "input_prior"}


@pytest.mark.parametrize(
  "config, message",
  [
    ("configs/cifar10_resnet20.py:adadfq,w4a4", "use the config argument 'zeroq_ptq'"),
    ("configs/imagenet_resnet50.py:zeroq_ptq,w4a4", "has no 'resnet50'"),
  ],
)
def test_bench_synth_refuses_what_the_reference_cannot_run(config, message):
  proc = _bench_synth(config, "--rounds=1")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
  assert sum(l.startswith("error:") for l in lines) == 1 and not proc.stdout.strip()
