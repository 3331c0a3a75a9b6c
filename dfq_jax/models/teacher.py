"""The run's teacher from its config: the model definition and its pretrained weights.

    config.teacher -> `teacher_model` (FP, or the quantized student with a QuantPolicy)
                   -> `load_teacher` ({'params', 'batch_stats'}: converted PyTorch weights,
                      a converted orbax directory, or the demo's digits teacher)
A converted teacher is kept in <workdir>/teacher, so a rerun needs no torch.
"""

from __future__ import annotations

import os

from dfq_jax import parallel
from dfq_jax.models import MODELS, convert, get_model
from dfq_jax.models.demo_teacher import train_teacher
from dfq_jax.quant.layers import COMPUTE_DTYPES


def check_teacher_config(config) -> None:
  """Raises ValueError/FileNotFoundError for a config.teacher that cannot be loaded."""
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
      f"compute_dtype={config.compute_dtype!r} is unknown: use one of {list(COMPUTE_DTYPES)}."
    )
  t = config.teacher
  if t.model not in MODELS:
    raise ValueError(f"teacher.model={t.model!r} is unknown: choose one of {sorted(MODELS)}.")
  if t.layout == "demo":
    return
  if not t.weights:
    raise ValueError(
      "teacher.weights is empty: pass --config.teacher.weights=PATH (a "
      "PyTorch checkpoint or a converted orbax directory)."
    )
  if not os.path.exists(t.weights):
    raise FileNotFoundError(f"teacher.weights={t.weights!r} does not exist.")


def teacher_model(config, quant=None):
  """The teacher's definition; with a QuantPolicy, the student (the same definition).

  Convs and matmuls run in config.compute_dtype (float32 accumulation).
  """
  kwargs = {"shortcut": config.teacher.shortcut} if config.teacher.model.endswith("_cifar") else {}
  return get_model(
    config.teacher.model,
    num_classes=config.num_classes,
    quant=quant,
    dtype=COMPUTE_DTYPES[config.compute_dtype],
    **kwargs,
  )


def load_teacher(config, workdir: str | None = None) -> dict:
  """The teacher's {'params', 'batch_stats'}: converted/restored weights, or the demo's.

  Every process calls it (orbax saves are collective).
  """
  model = teacher_model(config)
  shape = (1, config.image_size, config.image_size, config.channels)
  cache = os.path.join(workdir, "teacher") if workdir else None
  if config.teacher.layout == "demo":
    if cache and parallel.exists_on_all_processes(cache):
      return convert.load_variables(cache, convert.abstract_variables(model, shape))
    variables = train_teacher(model, seed=config.seed)
    if cache:
      convert.save_variables(variables, cache)
    return variables
  variables = convert.load_teacher_variables(
    config.teacher.weights, model, layout=config.teacher.layout, input_shape=shape
  )
  # Keep the converted weights: `--config.teacher.weights=<workdir>/teacher` needs no torch.
  if cache and not os.path.isdir(config.teacher.weights):
    if not parallel.exists_on_all_processes(cache):
      convert.save_variables(variables, cache)
  return variables
