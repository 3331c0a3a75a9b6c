"""One data-free PTQ run: synthesise -> calibrate -> evaluate -> diagnose (methods.md §4.1).

synthetic set    optimised images (synthesis.py), saved to <workdir>/synthetic.npz after
                 every batch (a rerun resumes at the next batch), or read from
                 ptq.samples_path
calibration      the student (teacher weights, per-channel weight ranges) gets its
                 activation ranges from the synthetic set with calib.method
evaluation       top-1 of the calibrated student on the real evaluation set
diagnostics      diversity of the synthetic set (and of as many real images):
                 diversity.json, diversity.png, samples/synthetic.png
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import numpy as np

from dfq_jax import checkpoint as checkpoint_lib
from dfq_jax import metrics as metrics_lib
from dfq_jax import parallel, xla_options
from dfq_jax.data import eval_set as eval_set_lib
from dfq_jax.ptq import diagnostics, synthesis
from dfq_jax.quant import calibration

SAMPLES_FILE = "synthetic.npz"


def synthesize(config, models, workdir: str, log=print) -> tuple[np.ndarray, np.ndarray, dict]:
  """The synthetic set of this run: (images [N, H, W, C], labels [N], info).

  Resumable per batch: completed batches are kept in <workdir>/synthetic.npz.
  """
  if config.ptq.samples_path:
    images, labels = synthesis.load_samples(config.ptq.samples_path, models.image_shape)
    log(f"Synthetic set: {len(images)} images from {config.ptq.samples_path}.")
    return images, labels, {"synthesis_s": 0.0, "samples_path": config.ptq.samples_path}
  hp = synthesis.PtqHparams.from_config(config)
  path = os.path.join(workdir, SAMPLES_FILE)
  images, labels, seconds = [], [], 0.0
  if os.path.exists(path):
    with np.load(path) as f:
      done = int(f["batches_done"])
      images = list(np.split(f["images"], done))
      labels = list(np.split(f["labels"], done))
      seconds = float(f["synthesis_s"])
    log(f"Resumed the synthetic set: {done}/{hp.batches} batches in {path}.")
  key = jax.random.fold_in(jax.random.key(config.seed), 11)
  synth = synthesis.make_synthesizer(
    hp,
    models.teacher,
    models.teacher_vars,
    jax.random.fold_in(key, 0),
    models.image_shape,
    models.num_classes,
    compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
  )
  writer = metrics_lib.MetricWriter(workdir, resume_step=len(images) * hp.steps, tensorboard=False)
  try:
    for b in range(len(images), hp.batches):
      t0 = time.perf_counter()

      def log_step(t, values, b=b):
        writer.write(b * hp.steps + t, {f"synthesis/{k}": v for k, v in values.items()})

      x, y, last = synth.run_batch(
        jax.random.fold_in(key, b + 1), log=log_step, log_every=config.ptq.log_every_steps
      )
      images.append(parallel.global_to_host(x))
      labels.append(parallel.global_to_host(y))
      seconds += time.perf_counter() - t0
      log(
        f"Synthetic batch {b + 1}/{hp.batches}: {hp.steps} steps in "
        f"{time.perf_counter() - t0:.1f} s, final loss {last['loss']:.4g} "
        f"(bn {last['bn']:.4g})."
      )
      if metrics_lib.is_writer():
        synthesis.save_samples(
          path,
          np.concatenate(images),
          np.concatenate(labels),
          batches_done=len(images),
          synthesis_s=seconds,
        )
  finally:
    writer.close()
  return np.concatenate(images), np.concatenate(labels), {"synthesis_s": seconds}


def calibrate(config, models, images: np.ndarray) -> tuple[dict, float]:
  """The student's variables with activation ranges from `images`; and the seconds taken."""
  t0 = time.perf_counter()
  batch = config.ptq.batch_size
  batches = (images[i : i + batch] for i in range(0, len(images), batch))
  variables = calibration.calibrated_student(
    models.student,
    models.teacher_vars,
    models.image_shape,
    batches,
    observer=config.calib.method,
    percentile=config.calib.percentile,
  )
  jax.block_until_ready(variables["quant_stats"])
  return variables, time.perf_counter() - t0


def run_ptq(
  config, workdir: str, models, evaluate_student: Callable[[dict], float], norm, log=print
) -> dict:
  """Synthesis, calibration, evaluation and diagnostics; returns the PTQ part of results."""
  images, labels, info = synthesize(config, models, workdir, log=log)
  student_vars, calibration_s = calibrate(config, models, images)
  checkpoint_lib.save_student(workdir, student_vars)
  top1 = evaluate_student(student_vars)
  log(
    f"{config.method} {models.student.quant.describe()}, calibration "
    f"{config.calib.method} on {len(images)} synthetic images: top-1 {top1:.2f} %."
  )
  out = {
    "final_top1": top1,
    "best_top1": top1,
    "best_step": -1,
    "best_is_test_selected": False,
    "steps": int(config.ptq.steps),
    "synthetic_images": int(len(images)),
    "calibration_method": config.calib.method,
    "calibration_s": calibration_s,
    **info,
  }
  if not metrics_lib.is_writer():
    return out
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  order = np.argsort(labels, kind="stable")[: min(len(images), 8 * models.num_classes)]
  grid = metrics_lib.image_grid(
    images[order], norm.mean, norm.std, columns=min(models.num_classes, 16)
  )
  metrics_lib.save_png(
    os.path.join(workdir, "samples", "synthetic.png"),
    grid,
    upscale=max(1, 64 // models.image_shape[0]),
  )
  named = {config.method: diagnostics.diversity_stats(models.teacher, models.teacher_vars, images)}
  if config.ptq.diagnose_real:
    try:
      named["real"] = diagnostics.diversity_stats(
        models.teacher,
        models.teacher_vars,
        eval_set_lib.real_images(config, norm, config.calib.split, len(images)),
      )
    except (FileNotFoundError, ValueError, KeyError) as e:
      log(
        f"Diversity of real images skipped ({e}); set --config.ptq.diagnose_real=False "
        "to silence this."
      )
  metrics_lib.write_json_atomic(os.path.join(workdir, "diversity.json"), named)
  try:
    diagnostics.plot_diversity(named, os.path.join(workdir, "diversity.png"))
  except ImportError as e:
    log(f"diversity.png not written: {e}")
  out["diversity"] = {
    name: {k: v for k, v in stats.items() if k != "per_layer"} for name, stats in named.items()
  }
  return out
