"""Synthetic calibration images by input optimisation through the frozen teacher (no generator).

ZeroQ (Cai et al., CVPR 2020, arXiv:2001.00281) and DSG-PTQ (Zhang et al., CVPR 2021,
arXiv:2103.01049; Qin et al., TPAMI, arXiv:2109.00212; methods.md §4.1-§4.5) optimise a
batch of images x [B, H, W, C] (in the model's normalised input space) so that the
teacher's BN statistics of each sample match the running statistics:

  L(x) = Σ_l SDA_l(x)                      per-sample mean / std of every BN input vs the
                                           running mean / std; hinge with per-layer
                                           margins (DSG slack) or none (ZeroQ); DSG's
                                           layerwise sample enhancement (LSE) reweights
                                           sample b on one layer
       + input prior                       per-sample image mean -> 0, std -> 1
       + w_sci · L_SCI                     DSG inter-sample decorrelation (weight 1/L)
       + w_ce · CE(P(x), y)                random labels (the DSG code adds CE twice: 2)
       + w_tv · TV_l2(x_j) + w_l2 · ‖x_j‖  image priors on x rolled by a random offset

Each term is switchable (`PtqHparams`); `config_base.PTQ_PRESETS` hold the ZeroQ and DSG
code settings.
Optimiser: Adam on the pixels with torch's ReduceLROnPlateau (factor 0.1, relative
threshold 1e-4, min lr 1e-4) inside the one jitted step, so the loop never waits on the
host. Statistics use the unbiased spatial variance, as the PTQ code does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfq_jax import losses, parallel
from dfq_jax import metrics as metrics_lib
from dfq_jax.models.layers import BN_STATS, BatchNorm

LSE_MODES = ("off", "diagonal", "modulo")
SCI_MODES = ("off", "differentiable", "logged")
INITS = ("uniform", "normal", "zeroq")
# ZeroQ's UniformDataset: (randint(0, 255) - 127.5) / 5418.75, i.e. 255 levels in
# [-0.0235, 0.0235] (5418.75 = (127 + 128)^2 / 12, the variance of U(-128, 127)).
ZEROQ_INIT_LEVELS, ZEROQ_INIT_OFFSET, ZEROQ_INIT_SCALE = 255, 127.5, 5418.75


@dataclasses.dataclass(frozen=True)
class PtqHparams:
  """Hyperparameters of the image optimisation (config.ptq, validated).

  Attributes:
    steps: optimisation steps per batch (500 in both codes).
    lr, plateau_patience, min_lr: Adam learning rate and ReduceLROnPlateau settings.
    batch_size, batches: images per optimised batch, and how many batches.
    init: 'uniform' (U[0, 1), the DSG code's torch.rand), 'zeroq' (the ZeroQ code's
      255 levels in [-0.0235, 0.0235]) or 'normal' (N(0, 1)).
    slack: DSG slack alignment with per-layer margins; False = ZeroQ (no margin).
    margin_percentile: ε of the margins (percentile of the initial batch's gaps).
    lse: 'off', 'diagonal' (code: sample b enhances layer b, for b < L: x2 on its
      residual) or 'modulo' (sample b enhances layer b mod L).
    lse_factor: the residual factor of an enhanced (sample, layer) pair (2).
    sci: 'off', 'differentiable' (eigh form, paper intent) or 'logged' (code: the
      value is added but carries no gradient).
    sci_weight: weight of L_SCI; 0 = 1/L (the code).
    ce_weight: weight of CE(P(x), y) on random labels (2 in the DSG code).
    tv_weight, l2_weight: image priors on the jittered batch (0.01 in the DSG code).
    jitter: random roll offset range [-jitter, jitter) for the priors (30).
    input_prior: per-sample image mean 0 / std 1 term (both codes).
  """

  steps: int = 500
  lr: float = 0.9
  plateau_patience: int = 260
  min_lr: float = 1e-4
  batch_size: int = 64
  batches: int = 1
  init: str = "uniform"
  slack: bool = True
  margin_percentile: float = 30.0
  lse: str = "diagonal"
  lse_factor: float = 2.0
  sci: str = "logged"
  sci_weight: float = 0.0
  ce_weight: float = 2.0
  tv_weight: float = 0.01
  l2_weight: float = 0.01
  jitter: int = 30
  input_prior: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "batches"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ptq.{name}={getattr(self, name)} must be positive.")
    if self.lr <= 0 or self.min_lr <= 0:
      raise ValueError(f"ptq.lr={self.lr} and ptq.min_lr={self.min_lr} must be positive.")
    if self.init not in INITS:
      raise ValueError(f"ptq.init={self.init!r} is unknown: use one of {INITS}.")
    if self.lse not in LSE_MODES:
      raise ValueError(f"ptq.lse={self.lse!r} is unknown: use one of {LSE_MODES}.")
    if self.sci not in SCI_MODES:
      raise ValueError(f"ptq.sci={self.sci!r} is unknown: use one of {SCI_MODES}.")
    if not 0.0 <= self.margin_percentile <= 100.0:
      raise ValueError(f"ptq.margin_percentile={self.margin_percentile} must lie in [0, 100].")
    for name in ("ce_weight", "tv_weight", "l2_weight", "sci_weight", "jitter"):
      if getattr(self, name) < 0:
        raise ValueError(f"ptq.{name}={getattr(self, name)} must be >= 0.")

  @classmethod
  def from_config(cls, config) -> "PtqHparams":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.ptq.items() if k in fields})


def initial_images(hp: PtqHparams, key: jax.Array, image_shape) -> jax.Array:
  """The starting batch [B, H, W, C]: U[0, 1) (DSG), ZeroQ's near-zero levels or N(0, 1)."""
  shape = (hp.batch_size, *image_shape)
  if hp.init == "uniform":
    return jax.random.uniform(key, shape, jnp.float32)
  if hp.init == "zeroq":
    levels = jax.random.randint(key, shape, 0, ZEROQ_INIT_LEVELS).astype(jnp.float32)
    return (levels - ZEROQ_INIT_OFFSET) / ZEROQ_INIT_SCALE
  return jax.random.normal(key, shape, jnp.float32)


def bn_positions(model: nn.Module, variables: dict, image_shape) -> dict:
  """Spatial positions H·W of every BN input, as a tree with the layer paths of bn_stats."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

  def shapes(x):
    _, state = model.apply(
      variables,
      x,
      mutable=[BN_STATS],
      capture_intermediates=(lambda mdl, _: isinstance(mdl, BatchNorm)),
    )
    return state["intermediates"]

  captured = jax.eval_shape(shapes, x)

  def walk(node):
    if "__call__" in node:
      shape = node["__call__"][0].shape
      return math.prod(shape[1:-1])
    return {k: walk(v) for k, v in node.items()}

  return walk(dict(captured))


@dataclasses.dataclass
class Synthesizer:
  """The jitted image-optimisation step and its constants for one teacher.

  Build with `make_synthesizer`; `run(key)` returns (images [N, H, W, C], labels [N]).
  """

  hp: PtqHparams
  image_shape: tuple
  num_classes: int
  step: Callable[..., Any]  # jitted (carry, teacher_vars, labels, key) -> (carry, metrics)
  teacher_vars: Any = None  # an argument of `step`, not a closure (XLA constants compile slowly)
  batch_sharding: Any = None  # images and labels split over the mesh's `data` axis

  def _place(self, a):
    return a if self.batch_sharding is None else jax.device_put(a, self.batch_sharding)

  def init_carry(self, key):
    x = self._place(initial_images(self.hp, key, self.image_shape))
    return {
      "x": x,
      "opt": optax.scale_by_adam().init(x),
      "lr": jnp.asarray(self.hp.lr, jnp.float32),
      "best": jnp.asarray(jnp.inf, jnp.float32),
      "bad": jnp.zeros((), jnp.int32),
    }

  def run_batch(self, key, log=None, log_every: int = 100):
    """Optimises one batch; returns (images, labels, last metrics as floats)."""
    k_init, k_labels, k_steps = jax.random.split(key, 3)
    carry = self.init_carry(k_init)
    labels = self._place(
      jax.random.randint(k_labels, (self.hp.batch_size,), 0, self.num_classes, jnp.int32)
    )
    metrics = {}
    for t in range(self.hp.steps):
      carry, metrics = self.step(carry, self.teacher_vars, labels, jax.random.fold_in(k_steps, t))
      if log is not None and ((t + 1) % log_every == 0 or t + 1 == self.hp.steps):
        log(t + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
    return carry["x"], labels, {k: float(v) for k, v in jax.device_get(metrics).items()}


def synthesis_loss(
  hp: PtqHparams,
  x: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  teacher_apply: Callable,
  running: Any,
  margins: Any,
  positions: Any,
  num_layers: int,
) -> tuple[jax.Array, dict]:
  """The PTQ objective L(x) of the module docstring, and its terms.

  Args:
    hp: which terms and their weights.
    x: [B, H, W, C] images being optimised. labels: [B] random labels.
    key: randomness of this step (jitter offset, SCI noise).
    teacher_apply: x -> (logits, bn_stats tree of per-sample BN-input statistics).
    running: the teacher's batch_stats. margins: `losses.sda_margins` tree, or a
      (0, 0) pair for ZeroQ. positions: H·W per BN layer (`bn_positions`).
    num_layers: L, the number of BN layers (SCI weight 1/L).
  """
  logits, bn_stats = teacher_apply(x)
  stats = losses.to_unbiased_var(bn_stats, positions)
  bn = losses.sda_loss_per_sample(
    stats,
    running,
    margins=margins,
    stat="std",
    lse=hp.lse,
    lse_scale=hp.lse_factor,
    reduction="sum",
  )
  terms = {"bn": bn}
  total = bn
  if hp.input_prior:
    terms["input_prior"] = jnp.mean(losses.input_prior_loss(x))
    total = total + terms["input_prior"]
  k_jitter, k_noise = jax.random.split(key)
  if hp.sci != "off":
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    terms["sci"] = losses.sci_loss(x, noise, differentiable=hp.sci == "differentiable")
    total = total + (hp.sci_weight or 1.0 / num_layers) * terms["sci"]
  if hp.ce_weight:
    terms["ce"] = jnp.mean(losses.cross_entropy(logits, labels))
    total = total + hp.ce_weight * terms["ce"]
  if hp.tv_weight or hp.l2_weight:
    x_j = x
    if hp.jitter:
      shift = jax.random.randint(k_jitter, (), -hp.jitter, hp.jitter)
      x_j = jnp.roll(x, (shift, shift), axis=(1, 2))
    terms["tv_l2"] = losses.total_variation_l2(x_j)
    terms["l2"] = jnp.mean(losses.l2_norm_prior(x_j))
    total = total + hp.tv_weight * terms["tv_l2"] + hp.l2_weight * terms["l2"]
  return total, terms


def plateau_update(
  lr, best, bad, loss, *, patience: int, min_lr: float, factor: float = 0.1, threshold: float = 1e-4
):
  """torch.optim.lr_scheduler.ReduceLROnPlateau (mode min, relative threshold), one call.

  Returns the new (lr, best, bad). A loss below best·(1 − threshold) is an improvement;
  more than `patience` calls without one multiply lr by `factor` (floored at min_lr).
  """
  improved = loss < best * (1.0 - threshold)
  best = jnp.where(improved, loss, best)
  bad = jnp.where(improved, 0, bad + 1)
  reduce = bad > patience
  lr = jnp.where(reduce, jnp.maximum(lr * factor, min_lr), lr)
  bad = jnp.where(reduce, 0, bad)
  return lr, best, bad


def _slack_margins(hp: PtqHparams, apply_with, teacher_vars, positions, key, image_shape):
  """DSG's per-layer margins from one initial batch; (0, 0) for ZeroQ (no slack).

  `apply_with(variables)` is the teacher forward; the weights are an argument of the jitted
  program (as closed-over constants XLA compiles slowly)."""
  if not hp.slack:
    return (0.0, 0.0)
  ref_forward = jax.jit(lambda variables, x: apply_with(variables)(x))
  _, ref_stats = ref_forward(teacher_vars, initial_images(hp, key, image_shape))
  running = teacher_vars["batch_stats"]
  return losses.sda_margins(
    losses.to_unbiased_var(ref_stats, positions),
    running,
    percentile=hp.margin_percentile,
    stat="std",
    level="sample",
  )


def make_synthesizer(
  hp: PtqHparams,
  teacher: nn.Module,
  teacher_vars: dict,
  key: jax.Array,
  image_shape,
  num_classes: int,
  devices=None,
  compiler_options: dict | None = None,
) -> Synthesizer:
  """The jitted step for `teacher`, with DSG's margins from one initial batch.

  `compiler_options` go to `jax.jit` (see `dfq_jax.xla_options`).

  The batch is split over `devices` (default: all; a `data` mesh axis as in training);
  every statistic is per sample or over the whole batch, so the result does not depend
  on the device count.
  """
  image_shape = tuple(image_shape)
  devices = devices or jax.devices()
  if hp.batch_size % len(devices):
    raise ValueError(
      f"ptq.batch_size={hp.batch_size} is not divisible by the "
      f"{len(devices)} devices: choose a multiple of the device count."
    )
  mesh = parallel.make_mesh(devices)
  batch_sharding, replicated = parallel.batch_sharded(mesh), parallel.replicated(mesh)

  def apply_with(variables):
    def teacher_apply(x):
      logits, state = teacher.apply(variables, x, mutable=[BN_STATS])
      return logits, state[BN_STATS]

    return teacher_apply

  positions = bn_positions(teacher, teacher_vars, image_shape)
  num_layers = len(jax.tree.leaves(positions))
  margins = _slack_margins(hp, apply_with, teacher_vars, positions, key, image_shape)
  tx = optax.scale_by_adam()  # torch Adam defaults: betas (0.9, 0.999), eps 1e-8

  def step(carry, variables, labels, key):
    (loss, terms), grad = jax.value_and_grad(synthesis_loss, argnums=1, has_aux=True)(
      hp,
      carry["x"],
      labels,
      key,
      teacher_apply=apply_with(variables),
      running=variables["batch_stats"],
      margins=margins,
      positions=positions,
      num_layers=num_layers,
    )
    updates, opt = tx.update(grad, carry["opt"])
    x = carry["x"] - carry["lr"] * updates
    lr, best, bad = plateau_update(
      carry["lr"], carry["best"], carry["bad"], loss, patience=hp.plateau_patience, min_lr=hp.min_lr
    )
    metrics = {"loss": loss, "lr": carry["lr"], **terms}
    return {"x": x, "opt": opt, "lr": lr, "best": best, "bad": bad}, metrics

  return Synthesizer(
    hp=hp,
    image_shape=image_shape,
    num_classes=num_classes,
    step=jax.jit(
      step,
      donate_argnums=(0,),
      out_shardings=(
        {"x": batch_sharding, "opt": None, "lr": replicated, "best": replicated, "bad": replicated},
        replicated,
      ),
      compiler_options=compiler_options,
    ),
    teacher_vars=teacher_vars,
    batch_sharding=batch_sharding,
  )


def save_samples(path: str, images: np.ndarray, labels: np.ndarray, **meta) -> None:
  """Writes a synthetic set as .npz atomically (temp file + rename)."""
  metrics_lib.write_atomic(
    path,
    lambda f: np.savez(
      f,
      images=np.asarray(images, np.float32),
      labels=np.asarray(labels, np.int32),
      **{k: np.asarray(v) for k, v in meta.items()},
    ),
    mode="wb",
  )


def load_samples(path: str, image_shape) -> tuple[np.ndarray, np.ndarray]:
  """Reads a synthetic set written by `save_samples`; checks the image shape."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"ptq.samples_path={path!r} does not exist: point it at the "
      "synthetic.npz of an earlier PTQ run, or leave it empty."
    )
  try:
    with np.load(path) as f:
      images, labels = f["images"], f["labels"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
      f"{path!r} is not a synthetic set (.npz with 'images' and 'labels'): {e}"
    ) from e
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(
      f"{path!r} holds images of shape {images.shape[1:]}, but the model "
      f"expects {tuple(image_shape)}: it was made for another model."
    )
  return images.astype(np.float32), labels.astype(np.int32)
