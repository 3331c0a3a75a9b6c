"""Run outputs: metrics.jsonl, TensorBoard events, PNG sample grids, JSON files.

Only process 0 writes (multi-host runs). Every file that is rewritten is written to a
temporary name and renamed, so a crash never leaves a half-written results.json.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import jax
import numpy as np


def is_writer() -> bool:
  return jax.process_index() == 0


def write_atomic(path: str, write, mode: str = "w") -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`.

  A crash or a full disk leaves the previous `path` intact (never a half-written file).
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` atomically (temp file + rename)."""

  def write(f):
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")

  write_atomic(path, write)


def _json_default(o):
  if isinstance(o, (np.generic,)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


class MetricWriter:
  """Appends one JSON row per logged step to metrics.jsonl; mirrors scalars to TensorBoard.

  On resume from step S, rows with step > S (logged after the checkpoint that is being
  resumed) are dropped first, so the file matches an uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
    self.enabled = is_writer()
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      self._truncate_after(resume_step if resume_step is not None else -1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # imported on use

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def _truncate_after(self, step: int) -> None:
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
      try:
        if json.loads(line).get("step", -1) <= step:
          keep.append(line)
      except json.JSONDecodeError:
        break  # a torn last line from a kill mid-write
    if len(keep) != len(rows):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def image_grid(images: np.ndarray, mean, std, columns: int | None = None) -> np.ndarray:
  """Tiles normalised NHWC float images into one uint8 RGB (or gray) grid.

  Images are de-normalised with the model's mean/std and clipped to [0, 1].
  """
  images = np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)
  images = np.clip(images, 0.0, 1.0)
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = images[
      i
    ]
  grid = (grid * 255.0 + 0.5).astype(np.uint8)
  return grid[..., 0] if c == 1 else grid


def save_png(path: str, array: np.ndarray, upscale: int = 1) -> None:
  """Saves a uint8 image array as PNG (nearest upscaling for tiny images)."""
  from PIL import Image  # imported on use

  img = Image.fromarray(array)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)
