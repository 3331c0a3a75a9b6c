"""The one training loop shared by GDFQ, DSG and AdaDFQ (the step itself: step.py).

    setup_training   mesh, fresh state, the method's constants, the jitted step
    train            resume from <workdir>/checkpoints, then for every step:
                       step -> metrics (every log_every_steps, finiteness checked)
                            -> sample grid (every sample_every_steps)
                            -> evaluation on real data (every eval_every_steps; the best
                               student is kept in <workdir>/best_student)
                            -> checkpoint (every ckpt_every_steps, at the end, on SIGTERM)

SIGTERM (TPU preemption, SLURM) makes the loop write a checkpoint after the current step
and stop with `Preempted`; the same command resumes, drawing the same numbers as an
uninterrupted run (the step folds the step index into the seed key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from dfq_jax import checkpoint as checkpoint_lib
from dfq_jax import curves as curves_lib
from dfq_jax import methods, parallel
from dfq_jax import metrics as metrics_lib
from dfq_jax import schedule as schedule_lib
from dfq_jax import step as step_lib
from dfq_jax.interfaces import Models, NonFiniteError, Preempted


def all_finite(tree) -> jax.Array:
  """True iff every floating leaf of `tree` is finite (one device scalar)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_finite(step: int, metrics: dict) -> None:
  """Raises NonFiniteError naming the step and the first non-finite metric."""
  for name, value in metrics.items():
    if not np.isfinite(value):
      raise NonFiniteError(
        f"step {step}: {name} = {value}. The run stopped; the last checkpoint written "
        "before this step is intact. Resume with the same --workdir after lowering the "
        "learning rate (e.g. --config.generator.lr or --config.student.lr), or with "
        "another --config.seed."
      )


@contextlib.contextmanager
def sigterm_flag():
  """Yields a flag object whose `.received` turns True on SIGTERM (main thread only).

  The loop checks it after each step instead of dying mid-step; the previous handler is
  restored on exit.
  """
  flag = type("SigtermFlag", (), {"received": False})()

  def handle(signum, frame):
    del signum, frame
    flag.received = True

  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield flag
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


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


def top1_best(state) -> float:
  return float(parallel.to_host(state["best_top1"]))


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
  method = methods.get_method(config.method)
  timeline = schedule_lib.Timeline.from_config(config)
  mesh = parallel.make_mesh(devices)
  replicated = parallel.replicated(mesh)
  root_key = jax.random.key(config.seed)
  teacher_vars = jax.device_put(models.teacher_vars, replicated)

  # The teacher's weights are arguments of these jitted functions, not closures: XLA
  # compiles constants slowly (an ImageNet teacher's 11-25M weights: minutes).
  @jax.jit
  def teacher_bn_stats(variables, x):
    _, upd = models.teacher.apply(variables, x, mutable=["bn_stats"])
    return upd["bn_stats"]

  constants = method.init_constants(
    method.hparams(config),
    functools.partial(teacher_bn_stats, teacher_vars),
    models.teacher_vars["batch_stats"],
    jax.random.fold_in(root_key, 2),
    models.image_shape,
  )
  state = jax.jit(
    lambda tv: step_lib.init_state(config, dataclasses.replace(models, teacher_vars=tv), root_key),
    out_shardings=replicated,
  )(teacher_vars)
  return TrainingSetup(
    timeline=timeline,
    mesh=mesh,
    replicated=replicated,
    step_fn=step_lib.make_train_step(config, models, method, timeline, mesh),
    state=state,
    teacher_vars=teacher_vars,
    constants=jax.device_put(constants, replicated),
  )


class _Loop:
  """The I/O around the jitted step: logging, samples, evaluation, checkpoints."""

  def __init__(
    self, config, workdir, models, setup, evaluate_student, normalization, log, reference_top1
  ):
    self.config, self.workdir, self.models, self.setup = config, workdir, models, setup
    self.evaluate_student, self.normalization, self.log = evaluate_student, normalization, log
    self.reference_top1 = reference_top1 or {}
    self.state = setup.state
    self.ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    self.best_ckpt = checkpoint_lib.Checkpointer(workdir, keep=1, subdir="best_student")
    self.sample_key = jax.random.fold_in(jax.random.key(config.seed), 3)
    self.throughput = Throughput()
    self.last_eval = None  # (step, top1)

  def restore(self) -> int:
    """Resumes from the latest good checkpoint; returns the step to start at."""
    if self.ckpt.latest_step() is None:
      return 0
    self.state, _ = self.ckpt.restore_latest_good(
      checkpoint_lib.abstract_like(self.state), log=self.log
    )
    start = int(self.state["step"])
    self.log(f"Resumed from {self.ckpt.directory} at step {start}.")
    return start

  def log_metrics(self, done: int, metrics, writer, bar) -> None:
    scalars = {k: float(v) for k, v in parallel.to_host(metrics).items()}
    check_finite(done - 1, scalars)
    scalars["images_per_s"] = self.throughput.rate(done, self.config.batch_size)
    writer.write(done, scalars)
    postfix = {"G": f"{scalars['generator/loss']:.3g}", "Q": f"{scalars['student/loss']:.3g}"}
    if self.last_eval is not None:
      postfix["top1"] = f"{self.last_eval[1]:.2f}"
    bar.set_postfix(postfix, refresh=False)

  def write_samples(self, done: int) -> None:
    """A PNG grid of generated samples (computed by every process, written by process 0)."""
    models = self.models
    imgs = parallel.to_host(
      step_lib.generate_samples(
        models, self.state["gen"]["params"], self.sample_key, min(64, 4 * models.num_classes)
      )
    )
    if metrics_lib.is_writer():
      samples_dir = os.path.join(self.workdir, "samples")
      os.makedirs(samples_dir, exist_ok=True)
      grid = metrics_lib.image_grid(
        imgs, self.normalization.mean, self.normalization.std, columns=models.num_classes
      )
      metrics_lib.save_png(
        os.path.join(samples_dir, f"step_{done:07d}.png"),
        grid,
        upscale=max(1, 64 // models.image_shape[0]),
      )

  def evaluate(self, done: int, writer, bar) -> None:
    """Top-1 on the real eval set; keeps the best student; updates curves.png."""
    student_vars = step_lib.student_variables(self.state["student"])
    top1 = self.evaluate_student(student_vars)
    self.last_eval = (done, top1)
    if top1 > top1_best(self.state):
      self.state["best_top1"] = jax.device_put(jnp.float32(top1), self.setup.replicated)
      self.state["best_step"] = jax.device_put(jnp.int32(done), self.setup.replicated)
      self.best_ckpt.save(done, student_vars)
    levels = {
      f"eval/{name}": self.reference_top1[key]
      for name, key in (("fp_top1", "fp_top1"), ("floor_top1", "quant_top1_before"))
      if self.reference_top1.get(key) is not None
    }  # so `bench curves` draws a running run's levels too
    writer.write(done, {"eval/top1": top1, **levels})
    if metrics_lib.is_writer():
      curves_lib.write_run_plot(
        self.workdir,
        self.reference_top1.get("fp_top1"),
        self.reference_top1.get("quant_top1_before"),
      )
      bar.write(f"step {done}: student top-1 {top1:.2f} % (best {top1_best(self.state):.2f})")

  def save(self, done: int) -> None:
    state = self.state
    if not bool(all_finite((state["gen"]["params"], state["student"]["params"]))):
      raise NonFiniteError(
        f"step {done}: non-finite parameters; the checkpoint was not "
        "written and the last good one is intact. Resume after lowering "
        "the learning rate."
      )
    self.ckpt.save(done, state)

  def close(self) -> None:
    self.best_ckpt.close()
    self.ckpt.close()


def train(
  config,
  workdir: str,
  models: Models,
  evaluate_student: Callable[[dict], float],
  normalization,
  log=print,
  reference_top1: dict | None = None,
) -> dict:
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
  setup = setup_training(config, models)
  timeline = setup.timeline
  loop = _Loop(config, workdir, models, setup, evaluate_student, normalization, log, reference_top1)
  start = loop.restore()
  log(
    f"{config.method} {models.student.quant.describe()}: {timeline.total_steps} steps "
    f"(warm-up {timeline.warmup_steps}, ranges frozen at {timeline.range_freeze_step}, "
    f"batch {config.batch_size}, {jax.device_count()} device(s))."
  )
  t_start = time.perf_counter()
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if start else None)
  bar = tqdm(
    total=timeline.total_steps,
    initial=start,
    unit="it",
    dynamic_ncols=True,
    disable=not metrics_lib.is_writer(),
    mininterval=2.0,
  )
  with contextlib.ExitStack() as cleanup:
    for close in (loop.close, writer.close, bar.close):
      cleanup.callback(close)
    sigterm = cleanup.enter_context(sigterm_flag())
    for step in range(start, timeline.total_steps):
      loop.state, metrics = setup.step_fn(
        loop.state, setup.teacher_vars, setup.constants, *timeline.phase(step)
      )
      done = step + 1
      last = done == timeline.total_steps
      if done % config.log_every_steps == 0 or last:
        loop.log_metrics(done, metrics, writer, bar)
      if config.sample_every_steps and done % config.sample_every_steps == 0:
        loop.write_samples(done)
      if done % timeline.eval_every_steps == 0 or last:
        loop.evaluate(done, writer, bar)
      if done % config.ckpt_every_steps == 0 or last or sigterm.received:
        loop.save(done)
      bar.update(1)
      if sigterm.received and not last:
        loop.ckpt.wait()
        raise Preempted(
          f"SIGTERM received: checkpoint written at step {done} in "
          f"{loop.ckpt.directory}. Run the same command to resume."
        )
  state = loop.state
  if loop.last_eval is not None and loop.last_eval[0] == timeline.total_steps:
    final_top1 = loop.last_eval[1]
  else:  # resumed after the last step: evaluate the restored state
    final_top1 = evaluate_student(step_lib.student_variables(state["student"]))
  return {
    "final_top1": final_top1,
    "best_top1": round(float(state["best_top1"]), 4),  # stored as float32
    "best_step": int(state["best_step"]),
    "steps": timeline.total_steps,
    "train_wall_s": time.perf_counter() - t_start,
    "best_is_test_selected": True,
  }
