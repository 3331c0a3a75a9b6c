"""A run's real images, read from its config: evaluation and the optional real calibration.

config.data  -> `load_eval_set` (uint8 NHWC; evaluation only, never for training)
             -> `normalization` (the model's input mean/std)
config.calib -> `calibration_batches` (N(0, 1) noise, or real images of calib.split)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax.data import digits, load_eval_data
from dfq_jax.data.preprocess import ImageDataset, Normalization, get_normalization, normalize

SOURCES = ("imagefolder", "tfds", "digits")


def check_data_config(config) -> None:
  """Raises ValueError/FileNotFoundError for a config.data that cannot be read."""
  d = config.data
  if d.source == "imagefolder":
    if not d.root:
      raise ValueError(
        "data.root is empty: pass --config.data.root=PATH (layout <root>/<split>/<class>/*.jpg)."
      )
    if not os.path.isdir(d.root):
      raise FileNotFoundError(f"data.root={d.root!r} is not a directory.")
  elif d.source == "tfds":
    if not d.data_dir:
      raise ValueError("data.data_dir is empty: pass --config.data.data_dir=PATH.")
  elif d.source not in SOURCES:
    raise ValueError(f"data.source={d.source!r} is unknown: use one of {', '.join(SOURCES)}.")


def normalization(config) -> Normalization:
  """The model's input normalisation (config.data.normalization, or the digits' own)."""
  if config.data.source == "digits":
    return digits.digits_normalization()
  return get_normalization(config.data.normalization)


def load_eval_set(config, split: str | None = None, limit: int | None = None) -> ImageDataset:
  """Real images of `split` (default data.split; evaluation only, never for training)."""
  d = config.data
  split = split or d.split
  limit = limit or d.limit or None
  if d.source == "digits":
    ds = digits.digits_dataset(split)
    if limit:
      ds = ds.take(limit)
  elif d.source == "imagefolder":
    ds = load_eval_data(
      "imagefolder",
      root=d.root,
      split=split,
      preprocessing=d.preprocessing,
      limit=limit,
      cache_dir=d.cache_dir or None,
    )
  else:
    ds = load_eval_data(
      "tfds",
      data_dir=d.data_dir,
      name=d.name,
      split=split or None,
      preprocessing=d.preprocessing,
      limit=limit,
      download=d.download,
    )
  if ds.num_classes != config.num_classes:
    raise ValueError(
      f"the eval data has {ds.num_classes} classes but num_classes="
      f"{config.num_classes}: check data.root / data.name."
    )
  if ds.images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(
      f"eval images are {ds.images.shape[1]}x{ds.images.shape[2]} but the "
      f"model expects {config.image_size}x{config.image_size}: check "
      "data.preprocessing or image_size."
    )
  return ds


def real_images(config, norm: Normalization, split: str, count: int) -> np.ndarray:
  """The first `count` images of `split`, normalised: float32 [count, H, W, C]."""
  real = load_eval_set(config, split=split, limit=count)
  return normalize(real.images[:count], norm.mean, norm.std)


def calibration_batches(config, norm: Normalization, key: jax.Array) -> Iterator:
  """Float NHWC batches for range calibration (config.calib).

  source='noise': N(0, 1) images in the model's normalised input space (data-free).
  source='real': the first calib.batches * calib.batch_size images of the real
  calib.split (default 'train', never the evaluation split), a real-data reference point.
  """
  c = config.calib
  shape = (c.batch_size, config.image_size, config.image_size, config.channels)
  if c.source == "noise":
    for i in range(c.batches):
      yield jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return
  images = real_images(config, norm, c.split, c.batches * c.batch_size)
  for i in range(c.batches):
    x = images[i * c.batch_size : (i + 1) * c.batch_size]
    if len(x):
      yield x
