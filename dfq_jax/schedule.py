"""The run's timeline: total steps, and the paper's epoch boundaries scaled onto it.

The papers count in epochs of 200 iterations (400 x 200). `--config.total_steps=N`
shortens (or lengthens) a run: every epoch boundary (warm-up end, range freeze, learning
rate milestones) is scaled by N / (epochs * iters_per_epoch) and rounded, so a short run
keeps the shape of the paper's schedule. One exception: the two opening phases, the
generator-only warm-up and the activation-range updates, always last at least
`min_phase_steps` iterations (default 200; never more than the paper's own length):
the original bias-corrected range EMA overshoots by up to ~3900x in its first updates and
settles only after ~100-200 of them (methods.md §2.3), and a student trained on the
samples of a generator that has had a handful of steps is pulled towards their (wrong)
labels. The paper schedule gives 800 iterations to each phase.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timeline:
  """Step boundaries of one run (all in optimizer iterations)."""

  total_steps: int
  warmup_steps: int  # student frozen while step < warmup_steps
  range_freeze_step: int  # activation ranges update while step < range_freeze_step
  generator_milestones: tuple[int, ...]
  student_milestones: tuple[int, ...]
  eval_every_steps: int  # evaluation cadence (config 0: every epoch, as the original)

  def phase(self, step: int) -> tuple[bool, bool]:
    """(train_student, update_ranges) of iteration `step` (0-based), the step's static args."""
    return step >= self.warmup_steps, step < self.range_freeze_step

  @classmethod
  def from_config(cls, config) -> "Timeline":
    paper_steps = config.epochs * config.iters_per_epoch
    total = config.total_steps or paper_steps
    scale = total / paper_steps

    def at(epoch):
      return int(round(epoch * config.iters_per_epoch * scale))

    def phase(epochs):
      paper = epochs * config.iters_per_epoch
      return min(int(total), max(at(epochs), min(config.min_phase_steps, paper)))

    return cls(
      total_steps=int(total),
      warmup_steps=phase(config.warmup_epochs),
      range_freeze_step=phase(config.range_update_epochs),
      generator_milestones=tuple(at(e) for e in config.generator.milestones),
      student_milestones=tuple(at(e) for e in config.student.milestones),
      # 0: after every epoch (iters_per_epoch iterations), as the original,
      # which reports the best epoch (parity sets it).
      eval_every_steps=int(config.eval_every_steps or config.iters_per_epoch),
    )


def multistep_lr(base: float, step, milestones, factor: float = 0.1):
  """base * factor^(number of milestones m with step >= m), as GDFQ's per-epoch policy.

  With milestones given in epochs and `step` an epoch index e (0-based), this is the
  original `lr = base * 0.1 ** #{m : e + 1 > m}`.
  """
  if not milestones:
    return jnp.asarray(base, jnp.float32)
  passed = jnp.sum(jnp.asarray(step) >= jnp.asarray(milestones))
  return jnp.asarray(base, jnp.float32) * jnp.asarray(factor, jnp.float32) ** passed


def check_schedule_config(config) -> None:
  """Raises ValueError for a schedule that cannot run."""
  for name in ("batch_size", "epochs", "iters_per_epoch"):
    if int(config[name]) <= 0:
      raise ValueError(f"{name}={config[name]} must be positive.")
  if config.total_steps < 0:
    raise ValueError(f"total_steps={config.total_steps} must be >= 0 (0 = paper schedule).")
  if config.eval_every_steps < 0:
    raise ValueError(f"eval_every_steps={config.eval_every_steps} must be >= 0 (0 = every epoch).")
