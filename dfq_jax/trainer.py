"""The one trainer shared by GDFQ, DSG and AdaDFQ (methods.md §2.1).

Each iteration, inside ONE jitted function over explicit pytrees (state donated):
  z ~ N(0, I), y ~ U{0..C-1}    drawn on device from fold_in(seed key, step)
  x = G(z, y)                   teacher logits + BN input statistics (bn_stats pytree)
  generator step                method.generator_loss -> Adam on G's parameters only
  student step                  on the SAME batch, detached: method.student_loss ->
                                SGD-Nesterov on the student (skipped during warm-up)
Activation ranges of the student update in every student forward while
step < range_freeze_step (`update_ranges`, a static argument of the step); after that the
student's forward quantizes with exactly the stored ranges, the same quantizer that
evaluation uses and that is shipped (no update is computed and thrown away).

Data parallel: the batch is split over the `data` axis of a device mesh (all devices of
all hosts). stats_scope='global' (default) computes BN statistics, losses and activation
ranges over the global batch (sync-BN semantics: the result does not depend on the device
count); 'per_device' computes them on each device's shard (the PyTorch single-GPU / pmap
semantics) with `jax.shard_map`, averaging losses and synchronising ranges (pmin/pmax). Methods differ only in their pure loss
functions (dfq_jax/methods/*).

AdaDFQ's generator loss needs the student's logits on the same images. While the ranges
update, the step runs the original code's two student forwards (two range updates per
iteration, methods.md §2.3), so every mode calibrates its ranges as the original does;
once they freeze, by default one student forward serves both steps through `jax.vjp`
(config.student_forward='shared'), which then gives the same result as two forwards
(tested). 'separate' (and parity) keep two forwards throughout.

SIGTERM (TPU preemption, SLURM) makes the loop write a checkpoint after the current step
and stop with `Preempted`; the same command resumes. The student with the best
evaluation top-1 is also kept in <workdir>/best_student.

State (checkpointed): {'step', 'rng', 'gen': {'params', 'opt'},
  'student': {'params', 'batch_stats', 'quant_stats', 'opt'}, 'best_top1', 'best_step'}.
The teacher's variables are a separate, non-donated argument and never checkpointed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dfq_jax import curves as curves_lib
from dfq_jax import schedule as schedule_lib
from dfq_jax import xla_options


@dataclasses.dataclass
class Models:
  """The three networks of a run and the teacher's (frozen) variables."""
  teacher: nn.Module
  student: nn.Module
  generator: nn.Module
  teacher_vars: dict
  num_classes: int
  image_shape: tuple[int, int, int]   # H, W, C
  latent_dim: int


def _optimizers(config):
  gen_tx = optax.scale_by_adam(b1=config.generator.b1, b2=config.generator.b2)
  stu_tx = optax.chain(
      optax.add_decayed_weights(config.student.weight_decay),
      optax.trace(decay=config.student.momentum, nesterov=config.student.nesterov))
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
  gen_tx, stu_tx = _optimizers(config)
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


def sample_latents(key: jax.Array, batch: int, latent_dim: int, num_classes: int):
  """z [B, latent] ~ N(0, I) and labels [B] ~ U{0..C-1} for one iteration."""
  kz, ky = jax.random.split(key)
  return (jax.random.normal(kz, (batch, latent_dim), jnp.float32),
          jax.random.randint(ky, (batch,), 0, num_classes, jnp.int32))


def make_train_step(config, models: Models, method, timeline: schedule_lib.Timeline,
                    mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """Returns `step(state, teacher_vars, constants, train_student, update_ranges)`.

  `train_student` and `update_ranges` are static (`timeline.phase(step)` gives both), so
  each phase of a run compiles once and a frozen-range step contains no range update.
  The step returns `(new_state, metrics)`.
  """
  gen_tx, stu_tx = _optimizers(config)
  batch = config.batch_size
  data_sharding = NamedSharding(mesh, P("data"))
  hp = method.hparams(config)

  def student_vars(st, params, quant_stats):
    return {"params": params, "batch_stats": st["batch_stats"], "quant_stats": quant_stats}

  per_device = config.stats_scope == "per_device"
  shared_forward_allowed = (method.USES_STUDENT_IN_GENERATOR_LOSS and not per_device
                            and not config.parity and config.student_forward == "shared")

  def per_device_map(fn, in_specs, out_specs):
    """Runs `fn` on each device's shard of the batch (stats_scope='per_device').

    Losses and their terms are averaged over devices inside `fn`, so the gradient taken
    outside is that of the mean of the per-device losses, as with PyTorch DDP.
    """
    if not per_device:
      return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

  def mean_over_devices(tree):
    return jax.tree.map(lambda v: jax.lax.pmean(v, "data"), tree) if per_device else tree

  def step_fn(state, teacher_vars, constants, train_student, update_ranges):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_latent, k_loss = jax.random.split(key)
    z, labels = sample_latents(k_latent, batch, models.latent_dim, models.num_classes)
    z = jax.lax.with_sharding_constraint(z, data_sharding)
    labels = jax.lax.with_sharding_constraint(labels, data_sharding)
    st = state["student"]
    shared_student_forward = shared_forward_allowed and not update_ranges

    def student_forward(params, quant_stats, images):
      """Student logits and its ranges after this forward (updated only in the range phase)."""
      variables = student_vars(st, params, quant_stats)
      if not update_ranges:
        return models.student.apply(variables, images), quant_stats
      logits, upd = models.student.apply(variables, images, mutable=["quant_stats"])
      return logits, upd["quant_stats"]

    lr_g = schedule_lib.multistep_lr(config.generator.lr, step, timeline.generator_milestones)
    lr_q = schedule_lib.multistep_lr(config.student.lr, step, timeline.student_milestones)

    def apply_generator_update(g_grads):
      g_updates, g_opt = gen_tx.update(g_grads, state["gen"]["opt"], state["gen"]["params"])
      params = jax.tree.map(lambda p, u: p - lr_g * u, state["gen"]["params"], g_updates)
      return params, g_opt

    def apply_student_update(s_grads):
      s_updates, s_opt = stu_tx.update(s_grads, st["opt"], st["params"])
      return jax.tree.map(lambda p, u: p - lr_q * u, st["params"], s_updates), s_opt

    if shared_student_forward:
      # One student forward serves both steps (AdaDFQ): its vjp gives the gradient w.r.t.
      # the images for the generator loss and w.r.t. the parameters for the student loss.
      # The generator step only takes grads w.r.t. G; the student step only w.r.t. Q.
      def forward(gen_params, s_params):
        images = models.generator.apply({"params": gen_params}, z, labels)
        t_logits, t_vars = models.teacher.apply(teacher_vars, images, mutable=["bn_stats"])
        s_logits, new_qs = student_forward(s_params, st["quant_stats"], images)
        loss, terms = method.generator_loss(
            hp, images=images, labels=labels, teacher_logits=t_logits,
            bn_stats=t_vars["bn_stats"], running_stats=teacher_vars["batch_stats"],
            student_logits=s_logits, constants=constants, key=k_loss)
        return (loss, s_logits), (terms, t_logits, new_qs)

      (g_loss, s_logits), vjp_fn, (g_terms, t_logits, new_qs) = jax.vjp(
          forward, state["gen"]["params"], st["params"], has_aux=True)
      g_grads, _ = vjp_fn((jnp.ones_like(g_loss), jnp.zeros_like(s_logits)))
      gen_params, g_opt = apply_generator_update(g_grads)
      t_logits = jax.lax.stop_gradient(t_logits)

      def stu_loss_of_logits(logits):
        return method.student_loss(hp, student_logits=logits, teacher_logits=t_logits,
                                   labels=labels)

      (s_loss, s_terms), ct_logits = jax.value_and_grad(stu_loss_of_logits, has_aux=True)(
          s_logits)
      if train_student:
        _, s_grads = vjp_fn((jnp.zeros_like(g_loss), ct_logits))
        s_params, s_opt = apply_student_update(s_grads)
      else:
        s_params, s_opt = st["params"], st["opt"]
    else:
      # ---- generator step -------------------------------------------------------
      def gen_forward(gen_params, student_params, quant_stats, z, labels, k_loss):
        if per_device:  # independent SCI noise per device
          k_loss = jax.random.fold_in(k_loss, jax.lax.axis_index("data"))
        images = models.generator.apply({"params": gen_params}, z, labels)
        t_logits, t_vars = models.teacher.apply(teacher_vars, images, mutable=["bn_stats"])
        s_logits = None
        if method.USES_STUDENT_IN_GENERATOR_LOSS:
          s_logits, quant_stats = student_forward(student_params, quant_stats, images)
        loss, terms = method.generator_loss(
            hp, images=images, labels=labels, teacher_logits=t_logits,
            bn_stats=t_vars["bn_stats"], running_stats=teacher_vars["batch_stats"],
            student_logits=s_logits, constants=constants, key=k_loss)
        loss, terms = mean_over_devices((loss, terms))
        return loss, (terms, images, t_logits, quant_stats)

      gen_forward = per_device_map(
          gen_forward, in_specs=(P(), P(), P(), P("data"), P("data"), P()),
          out_specs=(P(), (P(), P("data"), P("data"), P())))

      def gen_loss_fn(gen_params):
        return gen_forward(gen_params, st["params"], st["quant_stats"], z, labels, k_loss)

      (g_loss, (g_terms, images, t_logits, quant_stats)), g_grads = jax.value_and_grad(
          gen_loss_fn, has_aux=True)(state["gen"]["params"])
      gen_params, g_opt = apply_generator_update(g_grads)

      # ---- student step on the same, detached batch -----------------------------
      images = jax.lax.stop_gradient(images)
      t_logits = jax.lax.stop_gradient(t_logits)

      def stu_forward(params, quant_stats, images, t_logits, labels):
        s_logits, new_qs = student_forward(params, quant_stats, images)
        loss, terms = method.student_loss(hp, student_logits=s_logits, teacher_logits=t_logits,
                                          labels=labels)
        loss, terms = mean_over_devices((loss, terms))
        return loss, (terms, new_qs)

      stu_forward = per_device_map(
          stu_forward, in_specs=(P(), P(), P("data"), P("data"), P("data")),
          out_specs=(P(), (P(), P())))

      def stu_loss_fn(params):
        return stu_forward(params, quant_stats, images, t_logits, labels)

      if train_student:
        (s_loss, (s_terms, new_qs)), s_grads = jax.value_and_grad(
            stu_loss_fn, has_aux=True)(st["params"])
        s_params, s_opt = apply_student_update(s_grads)
      else:
        s_loss, (s_terms, new_qs) = stu_loss_fn(st["params"])
        s_params, s_opt = st["params"], st["opt"]

    new_state = dict(state)
    new_state["step"] = step + 1
    new_state["gen"] = {"params": gen_params, "opt": g_opt}
    new_state["student"] = {**st, "params": s_params, "opt": s_opt, "quant_stats": new_qs}
    metrics = {"generator/loss": g_loss, "student/loss": s_loss, "lr/generator": lr_g,
               "lr/student": lr_q * train_student}
    metrics.update({f"generator/{k}": v for k, v in g_terms.items()})
    metrics.update({f"student/{k}": v for k, v in s_terms.items()})
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, static_argnums=(3, 4), donate_argnums=(0,),
                 out_shardings=(replicated, replicated),
                 compiler_options=xla_options.compiler_options(config.cpu_conv_kernels))


def generate_samples(models: Models, gen_params, key, count: int):
  """Images [count, H, W, C] from the generator for fixed z and labels 0..C-1 cycled."""
  z, _ = sample_latents(key, count, models.latent_dim, models.num_classes)
  labels = jnp.arange(count, dtype=jnp.int32) % models.num_classes
  return models.generator.apply({"params": gen_params}, z, labels)


def to_host(tree):
  """numpy copies of a tree of replicated arrays, also when they span other processes.

  `jax.device_get` refuses arrays with devices of other processes; a replicated array
  holds the whole value on each of this process's devices.
  """
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if not a.sharding.is_fully_replicated:
        raise ValueError(f"to_host needs a replicated array; got sharding {a.sharding}.")
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree.map(one, tree)


def top1_best(state) -> float:
  return float(to_host(state["best_top1"]))


def all_finite(tree) -> jax.Array:
  """True iff every floating leaf of `tree` is finite (one device scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class NonFiniteError(RuntimeError):
  """A loss or parameter became NaN/Inf; the last good checkpoint is kept."""


def check_finite(step: int, metrics: dict) -> None:
  """Raises NonFiniteError naming the step and the first non-finite metric."""
  for name, value in metrics.items():
    if not np.isfinite(value):
      raise NonFiniteError(
          f"step {step}: {name} = {value}. The run stopped; the last checkpoint written "
          "before this step is intact. Resume with the same --workdir after lowering the "
          "learning rate (e.g. --config.generator.lr or --config.student.lr), or with "
          "another --config.seed.")


class Preempted(RuntimeError):
  """SIGTERM (TPU preemption, SLURM time limit) arrived; a checkpoint was written."""


class _SigtermFlag:
  """Records SIGTERM while installed (main thread only) instead of dying mid-step."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    import signal  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    import signal  # pylint: disable=g-import-not-at-top
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


class Throughput:
  """Images/s between two calls (wall clock)."""

  def __init__(self):
    self._t, self._step = time.perf_counter(), None

  def rate(self, step: int, batch: int) -> float:
    now = time.perf_counter()
    rate = 0.0
    if self._step is not None and step > self._step:
      rate = (step - self._step) * batch / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    return rate



@dataclasses.dataclass
class TrainingSetup:
  """Everything the loop needs besides I/O: the jitted step and its placed inputs."""
  timeline: schedule_lib.Timeline
  mesh: jax.sharding.Mesh
  replicated: NamedSharding
  step_fn: Callable[..., Any]
  state: dict
  teacher_vars: dict
  constants: Any


def setup_training(config, models: Models, devices=None) -> TrainingSetup:
  """Mesh over `devices` (default: all), fresh state, method constants, jitted step."""
  from dfq_jax import methods  # pylint: disable=g-import-not-at-top
  method = methods.get_method(config.method)
  timeline = schedule_lib.Timeline.from_config(config)
  mesh = jax.sharding.Mesh(np.array(devices or jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  root_key = jax.random.key(config.seed)

  def teacher_bn_stats(x):
    _, upd = models.teacher.apply(models.teacher_vars, x, mutable=["bn_stats"])
    return upd["bn_stats"]

  constants = method.init_constants(method.hparams(config), jax.jit(teacher_bn_stats),
                                    models.teacher_vars["batch_stats"],
                                    jax.random.fold_in(root_key, 2), models.image_shape)
  state = jax.jit(lambda: init_state(config, models, root_key), out_shardings=replicated)()
  return TrainingSetup(
      timeline=timeline, mesh=mesh, replicated=replicated,
      step_fn=make_train_step(config, models, method, timeline, mesh), state=state,
      teacher_vars=jax.device_put(models.teacher_vars, replicated),
      constants=jax.device_put(constants, replicated))


def train(config, workdir: str, models: Models, evaluate_student: Callable[[dict], float],
          normalization, log=print, reference_top1: dict | None = None) -> dict:
  """Runs (or resumes) the training loop; returns the training part of results.json.

  Args:
    config: the run's ConfigDict (validated).
    workdir: checkpoints/, metrics.jsonl, tensorboard/, samples/ are written here.
    models: teacher/student/generator and the teacher's variables.
    evaluate_student: student variables {'params', 'batch_stats', 'quant_stats'} -> top-1 %.
    normalization: the model's input Normalization (to de-normalise sample grids).
    log: a print-like function for progress lines.
    reference_top1: {'fp_top1', 'quant_top1_before'} levels marked in curves.png.
  """
  import os  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from dfq_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dfq_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  setup = setup_training(config, models)
  timeline, state, replicated = setup.timeline, setup.state, setup.replicated
  teacher_vars, constants, step_fn = setup.teacher_vars, setup.constants, setup.step_fn
  root_key = jax.random.key(config.seed)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  best_ckpt = checkpoint_lib.Checkpointer(workdir, keep=1, subdir="best_student")
  start = 0
  if ckpt.latest_step() is not None:
    restored, _ = ckpt.restore_latest_good(checkpoint_lib.abstract_like(state), log=log)
    state = restored
    start = int(state["step"])
    log(f"Resumed from {ckpt.directory} at step {start}.")
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if start else None)
  sample_key = jax.random.fold_in(root_key, 3)
  samples_dir = os.path.join(workdir, "samples")

  def student_vars(st):
    return {k: st[k] for k in ("params", "batch_stats", "quant_stats")}

  def save(step):
    if not bool(all_finite((state["gen"]["params"], state["student"]["params"]))):
      raise NonFiniteError(f"step {step}: non-finite parameters; the checkpoint was not "
                           "written and the last good one is intact. Resume after lowering "
                           "the learning rate.")
    ckpt.save(step, state)

  log(f"{config.method} {models.student.quant.describe()}: {timeline.total_steps} steps "
      f"(warm-up {timeline.warmup_steps}, ranges frozen at {timeline.range_freeze_step}, "
      f"batch {config.batch_size}, {jax.device_count()} device(s)).")
  throughput = Throughput()
  t_start = time.perf_counter()
  last_eval = None
  bar = tqdm(total=timeline.total_steps, initial=start, unit="it", dynamic_ncols=True,
             disable=not metrics_lib.is_writer(), mininterval=2.0)
  sigterm = _SigtermFlag().__enter__()
  try:
    for step in range(start, timeline.total_steps):
      state, metrics = step_fn(state, teacher_vars, constants, *timeline.phase(step))
      done = step + 1
      if done % config.log_every_steps == 0 or done == timeline.total_steps:
        scalars = {k: float(v) for k, v in to_host(metrics).items()}
        check_finite(step, scalars)
        scalars["images_per_s"] = throughput.rate(done, config.batch_size)
        writer.write(done, scalars)
        postfix = {"G": f"{scalars['generator/loss']:.3g}",
                   "Q": f"{scalars['student/loss']:.3g}"}
        if last_eval is not None:
          postfix["top1"] = f"{last_eval[1]:.2f}"
        bar.set_postfix(postfix, refresh=False)
      if config.sample_every_steps and done % config.sample_every_steps == 0:
        # Every process computes the grid (a computation on global arrays is collective);
        # process 0 writes it.
        imgs = to_host(generate_samples(models, state["gen"]["params"], sample_key,
                                        min(64, 4 * models.num_classes)))
        if metrics_lib.is_writer():
          os.makedirs(samples_dir, exist_ok=True)
          grid = metrics_lib.image_grid(imgs, normalization.mean, normalization.std,
                                        columns=models.num_classes)
          metrics_lib.save_png(os.path.join(samples_dir, f"step_{done:07d}.png"), grid,
                               upscale=max(1, 64 // models.image_shape[0]))
      if done % timeline.eval_every_steps == 0 or done == timeline.total_steps:
        top1 = evaluate_student(student_vars(state["student"]))
        last_eval = (done, top1)
        if top1 > top1_best(state):
          state["best_top1"] = jax.device_put(jnp.float32(top1), replicated)
          state["best_step"] = jax.device_put(jnp.int32(done), replicated)
          best_ckpt.save(done, student_vars(state["student"]))
        writer.write(done, {"eval/top1": top1})
        if metrics_lib.is_writer():
          levels = reference_top1 or {}
          curves_lib.write_run_plot(workdir, levels.get("fp_top1"),
                                    levels.get("quant_top1_before"))
        if metrics_lib.is_writer():
          bar.write(f"step {done}: student top-1 {top1:.2f} % (best {top1_best(state):.2f})")
      if (done % config.ckpt_every_steps == 0 or done == timeline.total_steps
          or sigterm.received):
        save(done)
      bar.update(1)
      if sigterm.received and done < timeline.total_steps:
        ckpt.wait()
        raise Preempted(f"SIGTERM received: checkpoint written at step {done} in "
                        f"{ckpt.directory}. Run the same command to resume.")
  finally:
    sigterm.__exit__()
    bar.close()
    writer.close()
    best_ckpt.close()
    ckpt.close()
  if last_eval is not None and last_eval[0] == timeline.total_steps:
    final_top1 = last_eval[1]
  else:  # resumed after the last step: evaluate the restored state
    final_top1 = evaluate_student(student_vars(state["student"]))
  return {
      "final_top1": final_top1,
      "best_top1": round(float(state["best_top1"]), 4),  # stored as float32
      "best_step": int(state["best_step"]),
      "steps": timeline.total_steps,
      "train_wall_s": time.perf_counter() - t_start,
      "best_is_test_selected": True,
  }
