"""One run, end to end: config -> teacher -> (training) -> evaluation -> results.json.

    validate the config (before any work)
    workdir: config.json (a different config never silently reuses a workdir)
    teacher weights, student policy, generator; the real eval set
    FP top-1; the no-training floor (student ranges calibrated on noise or real images)
    method 'eval': stop here | gdfq/dsg/adadfq: the shared trainer (resumable)
                            | dsg_ptq/zeroq_ptq: synthesis + calibration (ptq/pipeline.py)
    results.json (atomic)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import jax
import ml_collections

from dfq_jax import config_base
from dfq_jax import experiment
from dfq_jax import metrics as metrics_lib
from dfq_jax import trainer
from dfq_jax import xla_options
from dfq_jax.evaluate import evaluate_across_hosts
from dfq_jax.ptq import pipeline as ptq_pipeline

# Keys that may change between a run and its resumption without changing the result.
_RESUMABLE_KEYS = ("log_every_steps", "eval_every_steps", "ckpt_every_steps",
                   "sample_every_steps", "keep_checkpoints", "data.cache_dir",
                   "data.eval_batch_size")


class WorkdirConflictError(RuntimeError):
  """The workdir holds a run with another config."""


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


# What a run writes once it has started working; a workdir with none of them holds no run.
RUN_OUTPUTS = ("checkpoints", "best_student", "metrics.jsonl", "results.json", "synthetic.npz")


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, restart: bool) -> None:
  """Creates `workdir` and writes config.json; refuses to mix two different configs.

  With `restart`, an existing run is moved to `<workdir>/previous-<time>/` (nothing is
  deleted) and a fresh run starts.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create workdir {workdir!r}: {e.strerror}. Choose a writable "
                  "--workdir.") from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir!r} is not writable: choose another --workdir.")
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b)
                     if a.get(k) != b.get(k) and k not in _RESUMABLE_KEYS)
    # A run that stopped before writing any output (e.g. on a wrong teacher path) has
    # nothing to protect: the corrected command takes the workdir over (its leftovers,
    # such as a converted teacher, are archived, not deleted).
    started = any(os.path.exists(os.path.join(workdir, name)) for name in RUN_OUTPUTS)
    if changed and not restart and started:
      raise WorkdirConflictError(
          f"workdir {workdir!r} holds a run with a different config ({', '.join(changed)} "
          "differ). Use another --workdir, or pass --restart to move the old run to "
          f"{workdir}/previous-<time>/ and start afresh.")
    leftovers = [n for n in os.listdir(workdir)
                 if n != "config.json" and not n.startswith("previous-")]
    if restart or (changed and leftovers):
      archive = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
      os.makedirs(archive)
      for name in os.listdir(workdir):
        if not name.startswith("previous-"):
          shutil.move(os.path.join(workdir, name), os.path.join(archive, name))
  if metrics_lib.is_writer():
    metrics_lib.write_json_atomic(path, new)


BAD_INPUT_ATTR = "dfq_bad_input"


@contextlib.contextmanager
def _input_stage():
  """Marks an error raised while reading the inputs (config, workdir, data, teacher).

  The exception is re-raised unchanged (library callers catch it by its type); the mark
  lets the CLI answer it with one `error:` line and exit code 2 instead of a traceback.
  """
  try:
    yield
  except (ValueError, OSError, KeyError, RuntimeError) as e:
    setattr(e, BAD_INPUT_ATTR, True)
    raise


def is_bad_input(error: BaseException) -> bool:
  """True for an error of the input stage of `run` (see `_input_stage`)."""
  return bool(getattr(error, BAD_INPUT_ATTR, False))


def run(config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False,
        log=print) -> dict:
  """Runs `config` in `workdir` and returns the results (also written to results.json)."""
  t0 = time.perf_counter()
  with _input_stage():
    experiment.validate_config(config)
    prepare_workdir(workdir, config, restart)
    norm = experiment.normalization(config)
    eval_set = experiment.load_eval_set(config)
    log(f"Eval data: {eval_set.name}, {len(eval_set)} images.")
    teacher_vars = experiment.load_teacher(config, workdir)
    models = experiment.build_models(config, teacher_vars)
  batch = config.data.eval_batch_size
  eval_options = xla_options.compiler_options(config.cpu_conv_kernels)

  def eval_models(specs, names):
    return evaluate_across_hosts(specs, eval_set.images, eval_set.labels, norm.mean, norm.std,
                                 batch, num_classes=config.num_classes, names=names,
                                 compiler_options=eval_options)

  # The no-training floor: student with the teacher's weights, ranges calibrated.
  student_init = models.student.init(
      jax.random.key(0), jax.numpy.zeros((1, *models.image_shape)))
  calib_vars = {**teacher_vars, "quant_stats": student_init.get("quant_stats", {})}
  calib_vars["quant_stats"] = experiment.calibrate_ranges(
      models.student, calib_vars,
      experiment.calibration_batches(config, norm, jax.random.key(config.seed + 7)),
      observer=config.calib.method, percentile=config.calib.percentile)
  before = eval_models([(models.teacher.apply, teacher_vars), (models.student.apply, calib_vars)],
                       ["fp", "quantized"])
  log(before.summary())
  policy = models.student.quant
  results = {
      "method": config.method,
      "bits": f"W{policy.w_bits}A{policy.a_bits}",
      "quant_policy": policy.describe(),
      "teacher": config.teacher.model,
      "eval_data": eval_set.name,
      "eval_images": len(eval_set),
      "fp_top1": 100 * float(before.top1[0]),
      "fp_top5": 100 * float(before.top5[0]),
      "calibration": (f"{config.calib.batches}x{config.calib.batch_size} "
                      + ("N(0,1) noise" if config.calib.source == "noise"
                         else f"real images ({config.calib.split})")
                      + f", {config.calib.method}"),
      "seed": config.seed,
      "parity": bool(config.parity),
  }
  if config.method == "eval":
    results.update({"quant_top1": 100 * float(before.top1[1]),
                    "quant_top5": 100 * float(before.top5[1]),
                    "agreement": 100 * float(before.agreement[1])})
  else:
    results["quant_top1_before"] = 100 * float(before.top1[1])

    def evaluate_student(student_vars):
      r = eval_models([(models.student.apply, student_vars)], ["student"])
      return 100 * float(r.top1[0])

    if config.method in config_base.PTQ_METHODS:
      results.update(ptq_pipeline.run_ptq(config, workdir, models, evaluate_student, norm,
                                          log=log))
    else:
      results.update(trainer.train(config, workdir, models, evaluate_student, norm, log=log,
                                   reference_top1=results))
  results["wall_s"] = time.perf_counter() - t0
  if metrics_lib.is_writer():
    metrics_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results
