"""The student a finished run left in its workdir, read without changing anything there.

training runs   'final': the student of the last checkpoint; 'best': <workdir>/best_student
eval / PTQ runs <workdir>/student (the teacher's weights with the calibrated ranges)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from dfq_jax import checkpoint as checkpoint_lib
from dfq_jax import config_base, networks
from dfq_jax import step as step_lib
from dfq_jax.models import convert
from dfq_jax.quant import mixed as mixed_lib


def read_config(workdir: str):
  """The config of the finished run in `workdir` (ValueError/FileNotFoundError otherwise)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{workdir!r} holds no run (no config.json): pass the --workdir of a finished dfq_jax run."
    )
  if not os.path.exists(os.path.join(workdir, "results.json")):
    raise ValueError(
      f"the run in {workdir!r} has not finished (no results.json): resume it "
      "with the same command first."
    )
  with open(path) as f:
    config = config_base.from_saved(json.load(f))
  return mixed_lib.resolved_config(config, workdir)  # a mixed run's per-layer bits


def _abstract_student(config, models, teacher) -> dict:
  shape = (1, config.image_size, config.image_size, config.channels)
  quant = jax.eval_shape(lambda: models.student.init(jax.random.key(0), jnp.zeros(shape)))
  return {
    "params": teacher["params"],
    "batch_stats": teacher["batch_stats"],
    "quant_stats": quant.get("quant_stats", {}),
  }


def _on_default_device(abstract):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def _restore(directory: str, abstract):
  abstract = _on_default_device(abstract)
  ckpt = checkpoint_lib.Checkpointer(
    os.path.dirname(directory), keep=1, subdir=os.path.basename(directory)
  )
  try:
    return ckpt.restore(abstract)
  finally:
    ckpt.close()


def load_student(workdir: str, which: str = "final"):
  """(config, student module, its variables as numpy) of the finished run in `workdir`."""
  if which not in ("final", "best"):
    raise ValueError(f"which={which!r}: use final or best.")
  config = read_config(workdir)
  models = networks.build_models(config, teacher_vars={})
  teacher_shape = convert.abstract_variables(
    models.teacher, (1, config.image_size, config.image_size, config.channels)
  )
  abstract = _abstract_student(config, models, teacher_shape)
  if config.method in ("eval", *config_base.PTQ_METHODS):
    directory = os.path.join(workdir, checkpoint_lib.STUDENT_DIR)
    if not os.path.isdir(directory):
      raise FileNotFoundError(
        f"the {config.method} run in {workdir!r} kept no student (it "
        "predates <workdir>/student): rerun it in a new workdir."
      )
    if which == "best":
      raise ValueError(f"a {config.method} run has one student: use --which final.")
    variables = _restore(directory, abstract)
  elif which == "best":
    directory = os.path.join(workdir, "best_student")
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"{workdir!r} has no best_student/: use --which final.")
    variables = _restore(directory, abstract)
  else:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"{workdir!r} has no checkpoints/.")
    state = jax.eval_shape(
      lambda tv: step_lib.init_state(config, networks.build_models(config, tv), jax.random.key(0)),
      teacher_shape,
    )
    variables = step_lib.student_variables(_restore(directory, state)["student"])
  return config, models.student, jax.device_get(variables)
