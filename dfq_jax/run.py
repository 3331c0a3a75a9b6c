"""One run, end to end: config -> teacher -> (training) -> evaluation -> results.json.

validate the config (before any work; each value by the module that owns it)
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
from flax import traverse_util

from dfq_jax import checkpoint as checkpoint_lib
from dfq_jax import (
  config_base,
  generators,
  methods,
  networks,
  parallel,
  schedule,
  trainer,
  xla_options,
)
from dfq_jax import metrics as metrics_lib
from dfq_jax import step as step_lib
from dfq_jax.data import eval_set as eval_set_lib
from dfq_jax.evaluate import evaluate_across_hosts
from dfq_jax.interfaces import WorkdirConflictError
from dfq_jax.models import teacher as teacher_lib
from dfq_jax.ptq import pipeline as ptq_pipeline
from dfq_jax.ptq import synthesis
from dfq_jax.quant import calibration
from dfq_jax.quant import config as quant_config
from dfq_jax.quant import mixed as mixed_lib

# Keys that may change between a run and its resumption without changing the result.
_RESUMABLE_KEYS = (
  "log_every_steps",
  "eval_every_steps",
  "ckpt_every_steps",
  "sample_every_steps",
  "keep_checkpoints",
  "data.cache_dir",
  "data.eval_batch_size",
)


__all__ = ["WorkdirConflictError", "is_bad_input", "prepare_workdir", "run", "validate_config"]


def validate_config(config) -> None:
  """Raises ValueError/FileNotFoundError for a config that cannot run, before any work.

  Each part is checked by the module that reads it.
  """
  if config.method not in config_base.METHODS:
    raise ValueError(f"method={config.method!r} is unknown: use one of {config_base.METHODS}.")
  config_base.check_config_keys(config)
  quant_config.policy_from_config(config)
  quant_config.check_calibration_config(config)
  mixed_lib.check_mixed_config(config)
  teacher_lib.check_teacher_config(config)
  eval_set_lib.check_data_config(config)
  generators.check_generator_config(config)
  step_lib.check_step_config(config)
  schedule.check_schedule_config(config)
  xla_options.check_cpu_conv_kernels(config.cpu_conv_kernels)
  if config.method in methods.TRAINING_METHODS:
    methods.get_method(config.method).hparams(config)
  devices = jax.device_count()
  if config.method in methods.TRAINING_METHODS and config.batch_size % devices:
    raise ValueError(
      f"batch_size={config.batch_size} is not divisible by the {devices} "
      "devices: choose a multiple of the device count."
    )
  if config.method in config_base.PTQ_METHODS:
    if config.ptq.objective != config.method:
      raise ValueError(
        f"method={config.method!r} was set without its defaults: select a PTQ method "
        f"with the config argument (e.g. configs/cifar10_resnet20.py:{config.method},w4a4)"
        ", not with --config.method."
      )
    synthesis.PtqHparams.from_config(config)
    if config.ptq.batch_size % devices:
      raise ValueError(
        f"ptq.batch_size={config.ptq.batch_size} is not divisible by the "
        f"{devices} devices: choose a multiple of the device count."
      )


# What a run writes once it has started working; a workdir with none of them holds no run.
RUN_OUTPUTS = (
  "checkpoints",
  "best_student",
  "student",
  "metrics.jsonl",
  "results.json",
  "synthetic.npz",
)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, restart: bool) -> None:
  """Creates `workdir` and writes config.json; refuses to mix two different configs.

  With `restart`, an existing run is moved to `<workdir>/previous-<time>/` (nothing is
  deleted) and a fresh run starts.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(
      f"cannot create workdir {workdir!r}: {e.strerror}. Choose a writable --workdir."
    ) from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir!r} is not writable: choose another --workdir.")
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      # In today's schema, so a run saved by an earlier version resumes unless a value
      # really differs.
      old = json.loads(config_base.from_saved(json.load(f)).to_json())
    a, b = (traverse_util.flatten_dict(d, sep=".") for d in (old, new))
    changed = sorted(
      k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _RESUMABLE_KEYS
    )
    # A run that stopped before writing any output (e.g. on a wrong teacher path) has
    # nothing to protect: the corrected command takes the workdir over (its leftovers,
    # such as a converted teacher, are archived, not deleted).
    started = any(os.path.exists(os.path.join(workdir, name)) for name in RUN_OUTPUTS)
    if changed and not restart and started:
      raise WorkdirConflictError(
        f"workdir {workdir!r} holds a run with a different config ({', '.join(changed)} "
        "differ). Use another --workdir, or pass --restart to move the old run to "
        f"{workdir}/previous-<time>/ and start afresh."
      )
    leftovers = [
      n for n in os.listdir(workdir) if n != "config.json" and not n.startswith("previous-")
    ]
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


def _results_header(config, models, eval_set, before) -> dict:
  """What results.json says about the run before training: setting, FP top-1, floor."""
  policy = models.student.quant
  return {
    "method": config.method,
    "bits": f"W{policy.w_bits}A{policy.a_bits}",
    "quant_policy": policy.describe(),
    "teacher": config.teacher.model,
    "eval_data": eval_set.name,
    "eval_images": len(eval_set),
    "fp_top1": 100 * float(before.top1[0]),
    "fp_top5": 100 * float(before.top5[0]),
    "calibration": (
      f"{config.calib.batches}x{config.calib.batch_size} "
      + (
        "N(0,1) noise" if config.calib.source == "noise" else f"real images ({config.calib.split})"
      )
      + f", {config.calib.method}"
    ),
    "seed": config.seed,
    "parity": bool(config.parity),
  }


def _mixed_precision(config, workdir, planned, teacher_vars, norm, log):
  """(config, report): with a mixed-precision budget, the allocation as the config's
  quant.rules and its report; else (config, None)."""
  if planned is None:
    return config, None
  image_shape = (config.image_size, config.image_size, config.channels)
  return mixed_lib.resolve(config, workdir, planned, teacher_vars, image_shape, norm, log=log)


def run(
  config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False, log=print
) -> dict:
  """Runs `config` in `workdir` and returns the results (also written to results.json)."""
  t0 = time.perf_counter()
  with _input_stage():
    validate_config(config)
    settings = {"config": json.loads(config.to_json()), "workdir": workdir, "restart": restart}
    parallel.check_same_on_all_processes(settings)
    prepare_workdir(workdir, config, restart)
    norm = eval_set_lib.normalization(config)
    eval_set = eval_set_lib.load_eval_set(config)
    log(f"Eval data: {eval_set.name}, {len(eval_set)} images.")
    teacher_vars = teacher_lib.load_teacher(config, workdir)
    image_shape = (config.image_size, config.image_size, config.channels)
    planned = mixed_lib.plan(config, image_shape) if mixed_lib.enabled(config) else None
  config, mixed = _mixed_precision(config, workdir, planned, teacher_vars, norm, log)
  models = networks.build_models(config, teacher_vars)
  batch = config.data.eval_batch_size
  eval_options = xla_options.compiler_options(config.cpu_conv_kernels)

  def eval_models(specs, names):
    return evaluate_across_hosts(
      specs,
      eval_set.images,
      eval_set.labels,
      norm.mean,
      norm.std,
      batch,
      num_classes=config.num_classes,
      names=names,
      compiler_options=eval_options,
    )

  # The no-training floor: student with the teacher's weights, ranges calibrated.
  calib_vars = calibration.calibrated_student(
    models.student,
    teacher_vars,
    models.image_shape,
    eval_set_lib.calibration_batches(config, norm, jax.random.key(config.seed + 7)),
    observer=config.calib.method,
    percentile=config.calib.percentile,
  )
  before = eval_models(
    [(models.teacher.apply, teacher_vars), (models.student.apply, calib_vars)], ["fp", "quantized"]
  )
  log(before.summary())
  results = _results_header(config, models, eval_set, before)
  if mixed is not None:
    results["mixed_precision"] = mixed_lib.summary(mixed)
    results["bits"] = f"W{mixed['avg_w_bits']:.2f}A{mixed['avg_a_bits']:.2f} (mixed)"
  if config.method == "eval":
    checkpoint_lib.save_student(workdir, calib_vars)
    results.update(
      {
        "quant_top1": 100 * float(before.top1[1]),
        "quant_top5": 100 * float(before.top5[1]),
        "agreement": 100 * float(before.agreement[1]),
      }
    )
  else:
    results["quant_top1_before"] = 100 * float(before.top1[1])

    def evaluate_student(student_vars):
      r = eval_models([(models.student.apply, student_vars)], ["student"])
      return 100 * float(r.top1[0])

    if config.method in config_base.PTQ_METHODS:
      results.update(ptq_pipeline.run_ptq(config, workdir, models, evaluate_student, norm, log=log))
    else:
      results.update(
        trainer.train(
          config, workdir, models, evaluate_student, norm, log=log, reference_top1=results
        )
      )
  results["wall_s"] = time.perf_counter() - t0
  if metrics_lib.is_writer():
    metrics_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results
