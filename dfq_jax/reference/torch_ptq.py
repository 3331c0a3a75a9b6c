r"""Eager PyTorch reference of one step of the data-free PTQ image synthesis (ZeroQ, DSG-PTQ).

This is the speed baseline of `python -m dfq_jax.bench synth`: what a PyTorch user of the
ZeroQ / DSG-PTQ codes runs, against our jitted step of dfq_jax/ptq/synthesis.py. Like
torch_adadfq.py it is NOT a dependency of dfq_jax: it needs torch, the standard library and
the networks of dfq_jax.reference.torch_adadfq only (run it with `python -m` from the
repository root, also from a torch-only environment). It was written from
../shared/docs/methods.md §4.2-§4.5 and our `synthesis_loss`, not from the papers' code.

One step, in torch's eager NCHW layout (the terms of our `synthesis_loss`):
  x [B, 3, H, W]  the optimised pixels (a leaf tensor); y [B] random labels, drawn once
  t = P(x)        P in eval mode, requires_grad False; a forward hook on every BatchNorm2d
                  reads the per-sample mean and UNBIASED spatial variance of its input
  bn     = Σ_l mean_b w_bl [Σ_c relu(|μ_run − μ_bc| − |δ_l|)² + relu(|s_run − s_bc| − |γ_l|)²]
           with s = sqrt(var + 1e-6) (the std). δ, γ = 0 (zeroq), or DSG's slack margins:
           the ε-th percentile (30) of the B·C per-sample gaps of one initial batch.
           w = 4 for sample b on layer b < min(B, 20) (DSG's LSE, ×2 on the residual), else 1
  + input prior   mean_b Σ_c mean_bc(x)² + (sqrt(var_bc(x) + 1e-6) − 1)²
  + SCI / L       (dsg) the similarity-spectrum loss vs fresh N(0, 1) noise, computed without
                  gradient (the code's detached eigen outputs: its value is only logged)
  + w_ce CE(t, y) + w_tv TV_l2(x_j) + w_l2 mean_b ‖x_j,b‖   (dsg: 2, 0.01, 0.01), x_j = x
                  rolled by one random offset in [−jitter, jitter) on both spatial axes
then Adam on x (torch defaults: betas (0.9, 0.999), eps 1e-8) and ReduceLROnPlateau (mode
min, factor 0.1, threshold 1e-4 relative, patience and min lr of the preset) on the loss.
Layers are enumerated in execution order (hook order), as ours inside the jitted step.
Presets (`PRESETS`, = config_base.PTQ_PRESETS over the c.ptq defaults):
  zeroq  lr 0.5, patience 100, ZeroQ init (255 levels in ±0.0235), batch 32, bn + input prior
  dsg    lr 0.9, patience 260, U[0, 1) init, batch 64, every term above

Run:
  python -m dfq_jax.reference.torch_ptq --network resnet20|resnet18|mobilenetv2 \
      --preset zeroq|dsg [--batch B] [--steps 10] [--warmup 3] [--threads T] [--seed S]
prints one JSON line: median/min/max step time (a step is timed from the teacher forward
to after the scheduler step), steps/s, images/s, torch version and threads, the step-0
loss terms. Random-init networks (the weights do not change the speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dfq_jax.reference.torch_adadfq import MobileNetV2, ResNet18, ResNet20

EPS = 1e-6  # added to variances before the square root (the std statistic)
LSE_LAYER_NUM = 20  # the DSG PTQ code's hard-coded layer count of its LSE
# ZeroQ's UniformDataset: (randint(0, 255) - 127.5) / 5418.75.
ZEROQ_LEVELS, ZEROQ_OFFSET, ZEROQ_SCALE = 255, 127.5, 5418.75

_COMMON = dict(min_lr=1e-4, margin_percentile=30.0, lse_factor=2.0, sci_weight=0.0)
_COMMON.update(input_prior=True)
PRESETS = {
  "zeroq": dict(
    _COMMON,
    lr=0.5,
    plateau_patience=100,
    batch_size=32,
    init="zeroq",
    slack=False,
    lse="off",
    sci="off",
    ce_weight=0.0,
    tv_weight=0.0,
    l2_weight=0.0,
    jitter=0,
  ),
  "dsg": dict(
    _COMMON,
    lr=0.9,
    plateau_patience=260,
    batch_size=64,
    init="uniform",
    slack=True,
    lse="diagonal",
    sci="logged",
    ce_weight=2.0,
    tv_weight=0.01,
    l2_weight=0.01,
    jitter=30,
  ),
}
# --network: (teacher class, classes, image size).
NETWORKS = {
  "resnet20": (ResNet20, 10, 32),
  "resnet18": (ResNet18, 1000, 224),
  "mobilenetv2": (MobileNetV2, 1000, 224),
}


# ----------------------------------------------------------------------------- losses
def initial_images(init: str, shape, generator=None) -> torch.Tensor:
  """The starting batch [B, C, H, W]: U[0, 1) ('uniform'), ZeroQ's levels or N(0, 1)."""
  if init == "uniform":
    return torch.rand(shape, generator=generator)
  if init == "zeroq":
    levels = torch.randint(0, ZEROQ_LEVELS, shape, generator=generator).float()
    return (levels - ZEROQ_OFFSET) / ZEROQ_SCALE
  if init == "normal":
    return torch.randn(shape, generator=generator)
  raise ValueError(f"init={init!r} is unknown: use uniform, zeroq or normal.")


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """Per-sample per-channel mean and unbiased spatial variance of x [B, C, H, W]: [B, C]."""
  var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=1)
  return mean, var


def slack_term(stat, target, margin=0.0, weights=None) -> torch.Tensor:
  """[B] w_b Σ_c relu(|target_c − stat_bc| − |margin|)² of stat [B, C], target [C]."""
  d = F.relu(torch.abs(target - stat) - abs(margin))
  per_example = torch.sum(d * d, dim=-1)
  return per_example if weights is None else per_example * weights


def lse_weights(batch: int, num_layers: int, mode: str, scale: float = 2.0) -> torch.Tensor:
  """[B, L] DSG layerwise-sample-enhancement weights on the squared loss (scale² on a hit).

  'diagonal' (the PTQ code): sample b enhances layer b for b < min(B, 20); 'modulo':
  sample b enhances layer b mod L; 'off': all ones.
  """
  b = torch.arange(batch)[:, None]
  l = torch.arange(num_layers)[None, :]
  if mode == "off":
    return torch.ones(batch, num_layers)
  if mode == "diagonal":
    hit = (l == b) & (b < min(batch, LSE_LAYER_NUM))
  elif mode == "modulo":
    hit = l == b % num_layers
  else:
    raise ValueError(f"lse={mode!r} is unknown: use off, diagonal or modulo.")
  return torch.where(hit, scale**2, 1.0)


def sda_loss(stats, margins=None, lse: str = "off", lse_factor: float = 2.0) -> torch.Tensor:
  """DSG slack alignment on per-sample statistics, summed over layers (ZeroQ: no margins).

  Args:
    stats: per layer (mean [B, C], unbiased var [B, C], running_mean [C], running_var [C]).
    margins: per layer (δ_l, γ_l) (`slack_margins`), or None for 0 (ZeroQ).
    lse: 'off', 'diagonal' or 'modulo' (`lse_weights`); lse_factor: its residual factor.
  Returns:
    Scalar Σ_l mean_b w_bl (mean term + std term).
  """
  weights = None
  if lse != "off":
    weights = lse_weights(stats[0][0].shape[0], len(stats), lse, lse_factor)
  total = 0.0
  for index, (mean, var, run_mean, run_var) in enumerate(stats):
    d_mean, d_std = (0.0, 0.0) if margins is None else margins[index]
    w = None if weights is None else weights[:, index]
    std, run_std = torch.sqrt(var + EPS), torch.sqrt(run_var + EPS)
    per_example = slack_term(mean, run_mean, d_mean, w) + slack_term(std, run_std, d_std, w)
    total = total + per_example.mean()
  return total


@torch.no_grad()
def slack_margins(stats, percentile: float = 30.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
  """DSG margins per layer: the percentile (linear) of the B·C per-sample gaps |μ − μ_run|
  and |s − s_run| of a reference batch (stats as `sda_loss`'s)."""
  q = percentile / 100.0
  out = []
  for mean, var, run_mean, run_var in stats:
    d_mean = torch.abs(mean - run_mean).flatten()
    d_std = torch.abs(torch.sqrt(var + EPS) - torch.sqrt(run_var + EPS)).flatten()
    out.append((torch.quantile(d_mean, q), torch.quantile(d_std, q)))
  return out


def input_prior_loss(x: torch.Tensor) -> torch.Tensor:
  """[B] Σ_c mean_bc(x)² + (sqrt(unbiased var_bc(x) + 1e-6) − 1)² of x [B, C, H, W]."""
  mean, var = per_sample_moments(x)
  return slack_term(mean, 0.0) + slack_term(torch.sqrt(var + EPS), 1.0)


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
  """Scalar: sum of the whole-batch l2 norms of the 4 directional differences of x [B, C, H, W]."""
  diffs = (
    x[:, :, :, :-1] - x[:, :, :, 1:],  # horizontal
    x[:, :, :-1] - x[:, :, 1:],  # vertical
    x[:, :, 1:, :-1] - x[:, :, :-1, 1:],  # anti-diagonal
    x[:, :, :-1, :-1] - x[:, :, 1:, 1:],  # diagonal
  )
  return sum(torch.linalg.vector_norm(d) for d in diffs)


def l2_norm_prior(x: torch.Tensor) -> torch.Tensor:
  """[B] l2 norm of every image of x [B, ...]."""
  return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def jitter_images(x: torch.Tensor, shift: int) -> torch.Tensor:
  """x [B, C, H, W] rolled by `shift` on both spatial axes."""
  return torch.roll(x, (shift, shift), dims=(2, 3))


def similarity_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """(eigenvalues [B] descending, eigenvectors [B, B] sign-fixed) of the cosine Gram of x."""
  phi = x.reshape(x.shape[0], -1).float()
  phi = phi / torch.clamp(torch.linalg.vector_norm(phi, dim=1), min=1e-12)[:, None]
  s = phi @ phi.T
  w, v = torch.linalg.eigh(0.5 * (s + s.T))
  w, v = w.flip(0), v.flip(1)
  pivot = torch.argmax(torch.abs(v), dim=0)
  signs = torch.sign(v[pivot, torch.arange(v.shape[1])])
  return w, v * torch.where(signs == 0, 1.0, signs)[None, :]


@torch.no_grad()
def sci_loss(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
  """DSG's SCI, 1e-4 mean_k (λ_k − λ_r,k)² + |Σ_k λ̃_r,k (−Σ_i V_ik V_r,ik)|, no gradient."""
  w, v = similarity_spectrum(x)
  w_r, v_r = similarity_spectrum(noise)
  magnitude = 1e-4 * torch.mean(torch.square(w - w_r))
  w_r_norm = (w_r - w_r.min()) / torch.clamp(w_r.max() - w_r.min(), min=1e-12)
  return magnitude + torch.abs(torch.sum(w_r_norm * -torch.sum(v * v_r, dim=0)))


def synthesis_objective(hp: dict, x, logits, stats, labels, *, margins, shift, noise, num_layers):
  """(total, terms) of one step: our `synthesis_loss` term by term.

  Args:
    hp: a `PRESETS` entry. x: [B, C, H, W] images; logits: [B, K] teacher outputs on x.
    stats: per BN layer (mean, unbiased var, running mean, running var) of x's forward.
    labels: [B]. margins: `slack_margins` or None. shift: the jitter offset (int).
    noise: N(0, 1) of x's shape (SCI) or None. num_layers: L (SCI weight 1/L).
  """
  bn = sda_loss(stats, margins if hp["slack"] else None, hp["lse"], hp["lse_factor"])
  terms, total = {"bn": bn}, bn
  if hp["input_prior"]:
    terms["input_prior"] = input_prior_loss(x).mean()
    total = total + terms["input_prior"]
  if hp["sci"] != "off":
    terms["sci"] = sci_loss(x, noise)
    total = total + (hp["sci_weight"] or 1.0 / num_layers) * terms["sci"]
  if hp["ce_weight"]:
    terms["ce"] = F.cross_entropy(logits.float(), labels)
    total = total + hp["ce_weight"] * terms["ce"]
  if hp["tv_weight"] or hp["l2_weight"]:
    x_j = jitter_images(x, shift) if hp["jitter"] else x
    terms["tv_l2"] = total_variation_l2(x_j)
    terms["l2"] = l2_norm_prior(x_j).mean()
    total = total + hp["tv_weight"] * terms["tv_l2"] + hp["l2_weight"] * terms["l2"]
  return total, terms


def plateau_scheduler(optimizer, patience: int, min_lr: float):
  """torch's ReduceLROnPlateau as ours: mode min, factor 0.1, threshold 1e-4 relative."""
  return torch.optim.lr_scheduler.ReduceLROnPlateau(
    optimizer,
    mode="min",
    factor=0.1,
    patience=patience,
    threshold=1e-4,
    threshold_mode="rel",
    min_lr=min_lr,
  )


# ----------------------------------------------------------------------------- step
class PtqSynthesisStep:
  """Teacher, hooks, margins, images, Adam and scheduler; `step()` runs one iteration."""

  def __init__(self, network: str = "resnet20", preset: str = "zeroq", batch=None, seed=0):
    if network not in NETWORKS:
      raise ValueError(f"unknown --network {network!r}: use one of {', '.join(NETWORKS)}.")
    if preset not in PRESETS:
      raise ValueError(f"unknown --preset {preset!r}: use one of {', '.join(PRESETS)}.")
    torch.manual_seed(seed)
    self.hp = dict(PRESETS[preset], batch_size=batch or PRESETS[preset]["batch_size"])
    cls, self.num_classes, size = NETWORKS[network]
    self.teacher = cls(self.num_classes).eval().requires_grad_(False)
    self._stats = []
    bns = [m for m in self.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
      m.register_forward_hook(self._bn_hook)
    self.num_layers = len(bns)
    shape = (self.hp["batch_size"], 3, size, size)
    self.margins = None
    if self.hp["slack"]:  # from one initial batch, as ours
      with torch.no_grad():
        self.teacher(initial_images(self.hp["init"], shape))
      self.margins = slack_margins(self._take_stats(), self.hp["margin_percentile"])
    self.x = initial_images(self.hp["init"], shape).requires_grad_(True)
    self.labels = torch.randint(0, self.num_classes, (shape[0],))
    self.opt = torch.optim.Adam([self.x], lr=self.hp["lr"])
    self.scheduler = plateau_scheduler(self.opt, self.hp["plateau_patience"], self.hp["min_lr"])

  def _bn_hook(self, module, inputs, output):
    del output
    mean, var = per_sample_moments(inputs[0])
    self._stats.append((mean, var, module.running_mean, module.running_var))

  def _take_stats(self) -> list:
    stats, self._stats = self._stats, []
    return stats

  def step(self) -> dict:
    hp = self.hp
    lr = self.opt.param_groups[0]["lr"]
    logits = self.teacher(self.x)
    shift = int(torch.randint(-hp["jitter"], hp["jitter"], ())) if hp["jitter"] else 0
    noise = torch.randn_like(self.x) if hp["sci"] != "off" else None
    total, terms = synthesis_objective(
      hp,
      self.x,
      logits,
      self._take_stats(),
      self.labels,
      margins=self.margins,
      shift=shift,
      noise=noise,
      num_layers=self.num_layers,
    )
    self.opt.zero_grad(set_to_none=True)
    total.backward()
    self.opt.step()
    loss = float(total.detach())
    self.scheduler.step(loss)
    return {"loss": loss, "lr": lr, **{k: float(v) for k, v in terms.items()}}


def benchmark(network: str, preset: str, batch=None, steps=10, warmup=3, threads=None, seed=0):
  """Times `steps` steps after `warmup` untimed ones; returns the JSON row."""
  if steps < 1 or warmup < 0 or (batch is not None and batch < 2):
    raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 2; got {steps}, {warmup}, {batch}")
  if threads:
    torch.set_num_threads(threads)
  runner = PtqSynthesisStep(network, preset, batch, seed)
  terms0, times = None, []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    terms = runner.step()
    elapsed = time.perf_counter() - t0
    terms0 = terms if i == 0 else terms0
    if i >= warmup:
      times.append(elapsed)
  median = statistics.median(times)
  batch = runner.hp["batch_size"]
  return {
    "impl": "torch",
    "network": network,
    "preset": preset,
    "batch": batch,
    "median_step_s": median,
    "min_step_s": min(times),
    "max_step_s": max(times),
    "steps_per_s": 1.0 / median,
    "images_per_s": batch / median,
    "timed_steps": steps,
    "warmup": warmup,
    "num_layers": runner.num_layers,
    "torch_version": torch.__version__,
    "threads": torch.get_num_threads(),
    "losses_step0": terms0,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--network", choices=tuple(NETWORKS), default="resnet20")
  p.add_argument("--preset", choices=tuple(PRESETS), default="zeroq")
  p.add_argument("--batch", type=int, default=None, help="images (default: the preset's)")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument(
    "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  row = benchmark(
    args.network, args.preset, args.batch, args.steps, args.warmup, args.threads, args.seed
  )
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
