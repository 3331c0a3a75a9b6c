"""Orbax checkpoints of the training state (never the teacher).

Only complete checkpoints are restored: orbax writes each step to a temporary directory
and renames it when complete, so a run killed during a write leaves the previous
checkpoints intact and the partial one is ignored.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dfq_jax import parallel

STUDENT_DIR = "student"  # where eval and PTQ runs keep their calibrated student


def save_student(workdir: str, variables: dict) -> None:
  """Keeps an eval / PTQ run's student ({'params', 'batch_stats', 'quant_stats'}) in
  <workdir>/student, for export (collective: every process calls it)."""
  ckpt = Checkpointer(workdir, keep=1, subdir=STUDENT_DIR)
  # As numpy: a process-local array cannot be saved from a multi-process run.
  ckpt.save(0, parallel.to_host(variables), wait=True)
  ckpt.close()


class Checkpointer:
  """Latest-N checkpoints of a state pytree in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, subdir: str = "checkpoints"):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self.manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True)
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, wait: bool = False) -> None:
    """Saves `state` as `step`; a step that is already on disk is left as it is (a run
    resumed before it replays the same, deterministic, state)."""
    if int(step) in self.manager.all_steps():
      return
    self.manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: latest) into the structure/shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest_good(self, abstract_state, log=print):
    """Restores the newest checkpoint that reads back; returns (state, step) or (None, None).

    A checkpoint that fails to restore (a file truncated or corrupted after it was
    committed) is moved to `<directory>.unreadable/` (nothing is deleted) and the one
    before it is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step), step
      except Exception as e:
        aside = os.path.join(self.directory + ".unreadable", str(step))
        log(
          f"warning: checkpoint {step} in {self.directory} cannot be restored "
          f"({type(e).__name__}: {str(e)[:200]}); moved to {aside}, trying the previous one."
        )
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src) and jax.process_index() == 0:
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          os.replace(src, aside if not os.path.exists(aside) else f"{aside}.{os.getpid()}")
        self.manager.reload()
    if self.manager.all_steps():
      raise RuntimeError(
        f"no checkpoint in {self.directory} can be restored; move the "
        "directory aside (or use --restart) to start afresh."
      )
    return None, None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for `restore`."""
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree
  )
