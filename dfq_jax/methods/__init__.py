"""Generative DFQ methods as pure loss functions over one shared trainer.

Each method module exposes:
  USES_STUDENT_IN_GENERATOR_LOSS: bool (AdaDFQ's generator sees the quantized student)
  hparams(config) -> a frozen namespace of its hyperparameters (parity resolved)
  init_constants(hp, teacher_bn_stats_fn, running_stats, key, image_shape) -> pytree
  generator_loss(hp, *, images, labels, teacher_logits, bn_stats, running_stats,
                 student_logits, constants, key) -> (loss, {term: value})
  student_loss(hp, *, student_logits, teacher_logits, labels) -> (loss, {term: value})
"""

from __future__ import annotations

import importlib

TRAINING_METHODS = ("gdfq", "dsg", "adadfq")


def get_method(name: str):
  """The method module `name` (gdfq | dsg | adadfq)."""
  if name not in TRAINING_METHODS:
    raise ValueError(f"method {name!r} is not a training method: use one of {TRAINING_METHODS}.")
  return importlib.import_module(f"dfq_jax.methods.{name}")
