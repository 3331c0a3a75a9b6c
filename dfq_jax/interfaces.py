"""Types shared by every layer of a run: the models bundle, the method protocol, the errors.

Low in the import order (it imports only flax and jax) so that methods, the step, the
trainer, the run and the CLI can all name them without importing one another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax


@dataclasses.dataclass
class Models:
  """The three networks of a run and the teacher's (frozen) variables."""

  teacher: nn.Module
  student: nn.Module
  generator: nn.Module
  teacher_vars: dict
  num_classes: int
  image_shape: tuple[int, int, int]  # H, W, C
  latent_dim: int


class Method(Protocol):
  """What a training method module provides (dfq_jax/methods/gdfq.py, dsg.py, adadfq.py).

  Methods are pure loss functions; the one trainer runs them all. Every loss returns
  `(scalar loss, {term name: scalar})`; the terms are logged as `generator/<term>` and
  `student/<term>`.
  """

  # AdaDFQ's generator loss sees the quantized student's logits on the same images.
  USES_STUDENT_IN_GENERATOR_LOSS: bool

  def hparams(self, config) -> Any:
    """A namespace of the method's hyperparameters from the (resolved) config."""

  def init_constants(
    self,
    hp,
    teacher_bn_stats_fn: Callable[[jax.Array], Any],
    running_stats: Any,
    key: jax.Array,
    image_shape,
  ) -> Any:
    """Constants computed once before training (e.g. DSG's slack margins); a pytree."""

  def generator_loss(
    self,
    hp,
    *,
    images,
    labels,
    teacher_logits,
    bn_stats,
    running_stats,
    student_logits,
    constants,
    key,
  ) -> tuple[jax.Array, dict]:
    """The generator's objective on one batch."""

  def student_loss(self, hp, *, student_logits, teacher_logits, labels) -> tuple[jax.Array, dict]:
    """The quantized student's objective on the same (detached) batch."""


def no_constants(hp, teacher_bn_stats_fn, running_stats, key, image_shape) -> dict:
  """The `init_constants` of a method that needs none."""
  del hp, teacher_bn_stats_fn, running_stats, key, image_shape
  return {}


class NonFiniteError(RuntimeError):
  """A loss or parameter became NaN/Inf; the last good checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM (TPU preemption, SLURM time limit) arrived; a checkpoint was written."""


class WorkdirConflictError(RuntimeError):
  """The workdir holds a run with another config."""
