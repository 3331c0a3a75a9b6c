"""One training iteration of the shared trainer, as one jitted function (methods.md §2.1).

    z ~ N(0, I), y ~ U{0..C-1}   drawn on device from fold_in(seed key, step)
    x = G(z, y)                  teacher logits + BN input statistics (bn_stats pytree)
    generator step               method.generator_loss -> Adam on G's parameters only
    student step                 on the SAME batch, detached: method.student_loss ->
                                 SGD-Nesterov on the student (skipped during warm-up)

Two static arguments select the phase (`Timeline.phase(step)`), so each phase compiles
once: `train_student` (False during the warm-up) and `update_ranges` (True while the
activation ranges follow the batches; afterwards the student quantizes with exactly the
stored ranges, the quantizer that evaluation uses and that is shipped).

Two ways to run the student per iteration:
  `two_student_passes`  the original code's order: the generator's loss (with its own
                        student forward where the method needs one), then a student forward
                        on the detached images for the student's loss. While the ranges
                        update this gives two range updates per iteration, as the original.
  `one_student_pass`    AdaDFQ after the range freeze (config.student_forward='shared'):
                        one student forward serves both losses through `jax.vjp`; the same
                        result as two passes (tested), one forward less.

Data parallel: the batch is split over the `data` axis. stats_scope='global' computes BN
statistics, losses and ranges over the global batch (sync-BN semantics: the result does not
depend on the device count); 'per_device' computes them on each device's shard (PyTorch's
single-GPU / pmap semantics) with `jax.shard_map`, averaging the losses.

State (checkpointed): {'step', 'rng', 'gen': {'params', 'opt'},
  'student': {'params', 'batch_stats', 'quant_stats', 'opt'}, 'best_top1', 'best_step'}.
The teacher's variables are a separate, non-donated argument and never checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from dfq_jax import parallel, xla_options
from dfq_jax import schedule as schedule_lib
from dfq_jax.interfaces import Method, Models

STUDENT_VARIABLES = ("params", "batch_stats", "quant_stats")


def optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, student) update rules without the learning rate (applied per step).

  Generator: Adam(b1, b2). Student: weight decay on every parameter, then Nesterov momentum
  (torch.optim.SGD's order).
  """
  gen_tx = optax.scale_by_adam(b1=config.generator.b1, b2=config.generator.b2)
  stu_tx = optax.chain(
    optax.add_decayed_weights(config.student.weight_decay),
    optax.trace(decay=config.student.momentum, nesterov=config.student.nesterov),
  )
  return gen_tx, stu_tx


def init_state(config, models: Models, key: jax.Array) -> dict:
  """Fresh training state: a new generator, the student initialised from the teacher."""
  k_gen, k_stu = jax.random.split(jax.random.fold_in(key, 1))
  z = jnp.zeros((2, models.latent_dim), jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  gen_params = models.generator.init(k_gen, z, y)["params"]
  x = jnp.zeros((2, *models.image_shape), jnp.float32)
  stu_vars = models.student.init(k_stu, x)
  student_params = jax.tree.map(jnp.copy, models.teacher_vars["params"])
  gen_tx, stu_tx = optimizers(config)
  return {
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(key),
    "gen": {"params": gen_params, "opt": gen_tx.init(gen_params)},
    "student": {
      "params": student_params,
      "batch_stats": jax.tree.map(jnp.copy, models.teacher_vars["batch_stats"]),
      "quant_stats": stu_vars.get("quant_stats", {}),
      "opt": stu_tx.init(student_params),
    },
    "best_top1": jnp.full((), -1.0, jnp.float32),
    "best_step": jnp.full((), -1, jnp.int32),
  }


def student_variables(student_state: dict) -> dict:
  """The student's {'params', 'batch_stats', 'quant_stats'} (what evaluation applies)."""
  return {k: student_state[k] for k in STUDENT_VARIABLES}


def sample_latents(key: jax.Array, batch: int, latent_dim: int, num_classes: int):
  """z [B, latent] ~ N(0, I) and labels [B] ~ U{0..C-1} for one iteration."""
  kz, ky = jax.random.split(key)
  return (
    jax.random.normal(kz, (batch, latent_dim), jnp.float32),
    jax.random.randint(ky, (batch,), 0, num_classes, jnp.int32),
  )


def generate_samples(models: Models, gen_params, key, count: int):
  """Images [count, H, W, C] from the generator for fixed z and labels 0..C-1 cycled."""
  z, _ = sample_latents(key, count, models.latent_dim, models.num_classes)
  labels = jnp.arange(count, dtype=jnp.int32) % models.num_classes
  return models.generator.apply({"params": gen_params}, z, labels)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What every piece of the step reads: the networks, the method and the mesh."""

  models: Models
  method: Method
  hp: Any
  mesh: jax.sharding.Mesh
  per_device: bool  # stats_scope == 'per_device'


@dataclasses.dataclass(frozen=True)
class Batch:
  """One iteration's inputs, the same for both steps."""

  z: jax.Array  # [B, latent]
  labels: jax.Array  # [B]
  key: jax.Array  # for the losses' own noise (DSG's SCI)
  teacher_vars: dict
  constants: Any  # method.init_constants(...)


@dataclasses.dataclass(frozen=True)
class Gradients:
  """What a student-pass strategy hands back to the optimizer updates."""

  generator: Any
  student: Any  # None when the student does not train this step
  generator_loss: jax.Array
  generator_terms: dict
  student_loss: jax.Array
  student_terms: dict
  quant_stats: Any  # the student's ranges after this iteration


def apply_student(
  models: Models, student_state: dict, params, quant_stats, images, update_ranges: bool
):
  """Student logits [B, classes] and its ranges after this forward.

  The ranges change only while `update_ranges` (methods.md §2.3); otherwise the forward
  quantizes with exactly `quant_stats`.
  """
  variables = {
    "params": params,
    "batch_stats": student_state["batch_stats"],
    "quant_stats": quant_stats,
  }
  if not update_ranges:
    return models.student.apply(variables, images), quant_stats
  logits, updated = models.student.apply(variables, images, mutable=["quant_stats"])
  return logits, updated["quant_stats"]


def generator_objective(
  spec: StepSpec,
  batch: Batch,
  student_state: dict,
  gen_params,
  student_params,
  quant_stats,
  z,
  labels,
  key,
  update_ranges: bool,
):
  """The method's generator loss on G(z, labels): `(loss, (terms, images, t_logits,
  s_logits, quant_stats))`; `s_logits` is None unless the method uses the student."""
  models = spec.models
  images = models.generator.apply({"params": gen_params}, z, labels)
  t_logits, t_vars = models.teacher.apply(batch.teacher_vars, images, mutable=["bn_stats"])
  s_logits = None
  if spec.method.USES_STUDENT_IN_GENERATOR_LOSS:
    s_logits, quant_stats = apply_student(
      models, student_state, student_params, quant_stats, images, update_ranges
    )
  loss, terms = spec.method.generator_loss(
    spec.hp,
    images=images,
    labels=labels,
    teacher_logits=t_logits,
    bn_stats=t_vars["bn_stats"],
    running_stats=batch.teacher_vars["batch_stats"],
    student_logits=s_logits,
    constants=batch.constants,
    key=key,
  )
  return loss, (terms, images, t_logits, s_logits, quant_stats)


def one_student_pass(
  spec: StepSpec, batch: Batch, state: dict, train_student: bool, update_ranges: bool
) -> Gradients:
  """One student forward serves both losses (AdaDFQ, frozen ranges, global statistics).

  The vjp of (G's params, Q's params) -> (generator loss, student logits) gives G's
  gradient from the generator loss alone and Q's from the student loss on the same logits.
  """
  student_state = state["student"]

  def forward(gen_params, student_params):
    loss, (terms, _, t_logits, s_logits, quant_stats) = generator_objective(
      spec,
      batch,
      student_state,
      gen_params,
      student_params,
      student_state["quant_stats"],
      batch.z,
      batch.labels,
      batch.key,
      update_ranges,
    )
    return (loss, s_logits), (terms, t_logits, quant_stats)

  (g_loss, s_logits), vjp_fn, (g_terms, t_logits, quant_stats) = jax.vjp(
    forward, state["gen"]["params"], student_state["params"], has_aux=True
  )
  g_grads, _ = vjp_fn((jnp.ones_like(g_loss), jnp.zeros_like(s_logits)))
  t_logits = jax.lax.stop_gradient(t_logits)

  def student_loss_of_logits(logits):
    return spec.method.student_loss(
      spec.hp, student_logits=logits, teacher_logits=t_logits, labels=batch.labels
    )

  (s_loss, s_terms), logits_cotangent = jax.value_and_grad(student_loss_of_logits, has_aux=True)(
    s_logits
  )
  s_grads = None
  if train_student:
    _, s_grads = vjp_fn((jnp.zeros_like(g_loss), logits_cotangent))
  return Gradients(g_grads, s_grads, g_loss, g_terms, s_loss, s_terms, quant_stats)


def two_student_passes(
  spec: StepSpec, batch: Batch, state: dict, train_student: bool, update_ranges: bool
) -> Gradients:
  """The generator's loss and gradient, then the student's on the detached images."""
  student_state = state["student"]
  reduce = parallel.mean_over_devices if spec.per_device else (lambda tree: tree)

  def generator_loss(gen_params, student_params, quant_stats, z, labels, key):
    if spec.per_device:  # independent SCI noise per device
      key = jax.random.fold_in(key, jax.lax.axis_index(parallel.DATA_AXIS))
    loss, (terms, images, t_logits, _, quant_stats) = generator_objective(
      spec,
      batch,
      student_state,
      gen_params,
      student_params,
      quant_stats,
      z,
      labels,
      key,
      update_ranges,
    )
    loss, terms = reduce((loss, terms))
    return loss, (terms, images, t_logits, quant_stats)

  def student_loss(params, quant_stats, images, t_logits, labels):
    s_logits, quant_stats = apply_student(
      spec.models, student_state, params, quant_stats, images, update_ranges
    )
    loss, terms = spec.method.student_loss(
      spec.hp, student_logits=s_logits, teacher_logits=t_logits, labels=labels
    )
    loss, terms = reduce((loss, terms))
    return loss, (terms, quant_stats)

  if spec.per_device:
    generator_loss = parallel.per_device_map(
      generator_loss,
      spec.mesh,
      in_specs=(P(), P(), P(), P("data"), P("data"), P()),
      out_specs=(P(), (P(), P("data"), P("data"), P())),
    )
    student_loss = parallel.per_device_map(
      student_loss,
      spec.mesh,
      in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P(), (P(), P())),
    )

  (g_loss, (g_terms, images, t_logits, quant_stats)), g_grads = jax.value_and_grad(
    generator_loss, has_aux=True
  )(
    state["gen"]["params"],
    student_state["params"],
    student_state["quant_stats"],
    batch.z,
    batch.labels,
    batch.key,
  )
  images = jax.lax.stop_gradient(images)
  t_logits = jax.lax.stop_gradient(t_logits)
  student_args = (quant_stats, images, t_logits, batch.labels)
  s_grads = None
  if train_student:
    (s_loss, (s_terms, quant_stats)), s_grads = jax.value_and_grad(student_loss, has_aux=True)(
      student_state["params"], *student_args
    )
  else:
    s_loss, (s_terms, quant_stats) = student_loss(student_state["params"], *student_args)
  return Gradients(g_grads, s_grads, g_loss, g_terms, s_loss, s_terms, quant_stats)


def uses_one_student_pass(config, method: Method, update_ranges: bool) -> bool:
  """Whether this phase may share one student forward (see the module docstring)."""
  return (
    method.USES_STUDENT_IN_GENERATOR_LOSS
    and config.student_forward == "shared"
    and config.stats_scope != "per_device"
    and not update_ranges
  )


def make_train_step(
  config, models: Models, method: Method, timeline: schedule_lib.Timeline, mesh: jax.sharding.Mesh
) -> Callable[..., Any]:
  """Returns the jitted `step(state, teacher_vars, constants, train_student, update_ranges)`.

  `train_student` and `update_ranges` are static (`timeline.phase(step)` gives both); the
  state is donated. The step returns `(new_state, metrics)`.
  """
  gen_tx, stu_tx = optimizers(config)
  spec = StepSpec(
    models=models,
    method=method,
    hp=method.hparams(config),
    mesh=mesh,
    per_device=config.stats_scope == "per_device",
  )
  data_sharding = parallel.batch_sharded(mesh)

  def step_fn(state, teacher_vars, constants, train_student, update_ranges):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_latent, k_loss = jax.random.split(key)
    z, labels = sample_latents(k_latent, config.batch_size, models.latent_dim, models.num_classes)
    batch = Batch(
      z=jax.lax.with_sharding_constraint(z, data_sharding),
      labels=jax.lax.with_sharding_constraint(labels, data_sharding),
      key=k_loss,
      teacher_vars=teacher_vars,
      constants=constants,
    )
    strategy = (
      one_student_pass
      if uses_one_student_pass(config, method, update_ranges)
      else two_student_passes
    )
    grads = strategy(spec, batch, state, train_student, update_ranges)

    lr_g = schedule_lib.multistep_lr(config.generator.lr, step, timeline.generator_milestones)
    lr_q = schedule_lib.multistep_lr(config.student.lr, step, timeline.student_milestones)
    gen, student = state["gen"], state["student"]
    g_updates, g_opt = gen_tx.update(grads.generator, gen["opt"], gen["params"])
    gen_params = jax.tree.map(lambda p, u: p - lr_g * u, gen["params"], g_updates)
    s_params, s_opt = student["params"], student["opt"]
    if train_student:
      s_updates, s_opt = stu_tx.update(grads.student, student["opt"], student["params"])
      s_params = jax.tree.map(lambda p, u: p - lr_q * u, student["params"], s_updates)

    new_state = dict(state, step=step + 1, gen={"params": gen_params, "opt": g_opt})
    new_state["student"] = {
      **student,
      "params": s_params,
      "opt": s_opt,
      "quant_stats": grads.quant_stats,
    }
    metrics = {
      "generator/loss": grads.generator_loss,
      "student/loss": grads.student_loss,
      "lr/generator": lr_g,
      "lr/student": lr_q * train_student,
    }
    metrics.update({f"generator/{k}": v for k, v in grads.generator_terms.items()})
    metrics.update({f"student/{k}": v for k, v in grads.student_terms.items()})
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(
    step_fn,
    static_argnums=(3, 4),
    donate_argnums=(0,),
    out_shardings=(replicated, replicated),
    compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
  )


def check_step_config(config) -> None:
  """Raises ValueError for an unknown student_forward or stats_scope."""
  if config.student_forward not in ("shared", "separate"):
    raise ValueError(f"student_forward={config.student_forward!r}: use shared or separate.")
  if config.stats_scope not in ("global", "per_device"):
    raise ValueError(f"stats_scope={config.stats_scope!r}: use global or per_device.")
