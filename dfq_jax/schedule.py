"""The run's timeline: total steps, and the paper's epoch boundaries scaled onto it.

The papers count in epochs of 200 iterations (400 x 200). `--config.total_steps=N`
shortens (or lengthens) a run: every epoch boundary (warm-up end, range freeze, learning
rate milestones) is scaled by N / (epochs * iters_per_epoch) and rounded, so a short run
keeps the shape of the paper's schedule. One exception: the activation ranges always get
at least `min_range_updates` iterations (default 200) before they freeze, because the
original bias-corrected EMA overshoots by up to ~3900x in its first updates and only
settles after ~100-200 of them (methods.md §2.3); the paper schedule gives 800.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timeline:
  """Step boundaries of one run (all in optimizer iterations)."""
  total_steps: int
  warmup_steps: int          # student frozen while step < warmup_steps
  range_freeze_step: int     # activation ranges update while step < range_freeze_step
  generator_milestones: tuple[int, ...]
  student_milestones: tuple[int, ...]

  @classmethod
  def from_config(cls, config) -> "Timeline":
    paper_steps = config.epochs * config.iters_per_epoch
    total = config.total_steps or paper_steps
    scale = total / paper_steps

    def at(epoch):
      return int(round(epoch * config.iters_per_epoch * scale))

    return cls(total_steps=int(total),
               warmup_steps=at(config.warmup_epochs),
               range_freeze_step=min(int(total), max(at(config.range_update_epochs), min(
                   config.min_range_updates, config.range_update_epochs *
                   config.iters_per_epoch))),
               generator_milestones=tuple(at(e) for e in config.generator.milestones),
               student_milestones=tuple(at(e) for e in config.student.milestones))


def multistep_lr(base: float, step, milestones, factor: float = 0.1):
  """base * factor^(number of milestones m with step >= m), as GDFQ's per-epoch policy.

  With milestones given in epochs and `step` an epoch index e (0-based), this is the
  original `lr = base * 0.1 ** #{m : e + 1 > m}`.
  """
  if not milestones:
    return jnp.asarray(base, jnp.float32)
  passed = jnp.sum(jnp.asarray(step) >= jnp.asarray(milestones))
  return jnp.asarray(base, jnp.float32) * jnp.asarray(factor, jnp.float32)**passed
