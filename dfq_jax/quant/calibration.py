"""Activation ranges of a quantized student from a few batches (no training).

Used for the no-training floor of every run (`quant_top1_before`), for method 'eval' and
for data-free PTQ (calibration on the synthetic set, methods.md §4.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp


def calibrate_ranges(
  student: nn.Module,
  variables: dict,
  batches: Iterable,
  *,
  observer: str = "minmax",
  percentile: float = 99.999,
) -> dict:
  """Activation ranges of `student` over float NHWC `batches`.

  Each batch gives every QuantAct a (min, max) by `observer` (numerics.observe_range:
  minmax, sample_mean, percentile or mse), computed on its input in the same forward,
  where the earlier layers are already quantized with their new ranges (ZeroQ/DSG-PTQ);
  several batches combine by running min / max. Returns the `quant_stats` tree.
  """
  calib_model = student.clone(
    quant=dataclasses.replace(
      student.quant, range_mode="minmax", axis_name=None, observer=observer, percentile=percentile
    )
  )

  # The weights are an argument, not a closure: as constants of the program, a ResNet-50's
  # 23M weights made XLA compile for ~100 s instead of ~2 s.
  @jax.jit
  def update(fixed, quant_stats, x):
    _, upd = calib_model.apply({**fixed, "quant_stats": quant_stats}, x, mutable=["quant_stats"])
    return upd["quant_stats"]

  fixed = {k: v for k, v in variables.items() if k != "quant_stats"}
  quant_stats = variables["quant_stats"]
  for x in batches:
    quant_stats = update(fixed, quant_stats, jnp.asarray(x))
  return quant_stats


def calibrated_student(
  student: nn.Module,
  teacher_vars: dict,
  image_shape,
  batches: Iterable,
  *,
  observer: str = "minmax",
  percentile: float = 99.999,
) -> dict:
  """The student's variables with no training: the teacher's weights, calibrated ranges.

  Returns {'params', 'batch_stats', 'quant_stats'}; `image_shape` is (H, W, C).
  """
  fresh = jax.jit(student.init)(jax.random.key(0), jnp.zeros((1, *image_shape)))  # one compile
  variables = {**teacher_vars, "quant_stats": fresh.get("quant_stats", {})}
  variables["quant_stats"] = calibrate_ranges(
    student, variables, batches, observer=observer, percentile=percentile
  )
  return variables
