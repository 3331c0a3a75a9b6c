"""Real evaluation data: image folders and prepared TFDS datasets -> uint8 NHWC in memory.

Entry point: `load_eval_data(source='imagefolder'|'tfds', ...)` returns an `ImageDataset`
(images uint8 [N, H, W, 3], labels int32 [N], class_names, name). Normalisation happens
later, on device, in `dfq_jax.evaluate` (constants: `NORMALIZATION_PRESETS`).
TensorFlow Datasets is imported only when the 'tfds' source is used.
"""

from __future__ import annotations

import os

from dfq_jax.data.imagefolder import IMAGE_EXTENSIONS, list_image_folder, load_image_folder
from dfq_jax.data.preprocess import (
  CIFAR10_NORM,
  CIFAR100_NORM,
  IMAGENET_NORM,
  NORMALIZATION_PRESETS,
  PREPROCESSING_MODES,
  ImageDataset,
  Normalization,
  Preprocessing,
  decode_image,
  get_normalization,
  imagenet_transform,
  normalize,
)
from dfq_jax.data.tfds_source import TFDS_DATASETS, TFDSDataError, load_tfds

__all__ = [
  "CIFAR100_NORM",
  "CIFAR10_NORM",
  "IMAGENET_NORM",
  "IMAGE_EXTENSIONS",
  "NORMALIZATION_PRESETS",
  "PREPROCESSING_MODES",
  "TFDS_DATASETS",
  "ImageDataset",
  "Normalization",
  "Preprocessing",
  "TFDSDataError",
  "decode_image",
  "get_normalization",
  "imagenet_transform",
  "list_image_folder",
  "load_eval_data",
  "load_image_folder",
  "load_tfds",
  "normalize",
]


def load_eval_data(
  source: str = "imagefolder",
  *,
  root: "str | os.PathLike | None" = None,
  data_dir: "str | os.PathLike | None" = None,
  name: str | None = None,
  split: str | None = None,
  preprocessing: "str | Preprocessing | None" = None,
  limit: int | None = None,
  cache_dir: "str | os.PathLike | None" = None,
  download: bool = False,
  builder_name: str | None = None,
) -> ImageDataset:
  """Loads an evaluation set into memory.

  Args:
    source: 'imagefolder' (`<root>/<split>/<class>/*.jpg`) or 'tfds'.
    root: image-folder root (source='imagefolder').
    data_dir: TFDS data directory (source='tfds').
    name: TFDS dataset: 'cifar10', 'cifar100', 'imagenet2012' (source='tfds').
    split: default 'test' for image folders and CIFAR, 'validation' for ImageNet.
    preprocessing: 'cifar' (32x32 as is) or 'imagenet' (Resize 256 + CenterCrop 224);
      default 'cifar' for image folders, by dataset for TFDS.
    limit: at most this many images (image folders: class-balanced round-robin;
      TFDS: the first ones in the stored, already shuffled order).
    cache_dir: image folders only: cache the decoded arrays as .npz there.
    download: TFDS only: allow download_and_prepare when the data is missing.
    builder_name: TFDS only: read data prepared under this builder name.
  """
  if source == "imagefolder":
    if root is None:
      raise ValueError("source='imagefolder' needs root= (layout <root>/<split>/<class>/*.jpg).")
    return load_image_folder(
      root, split or "test", preprocessing or "cifar", limit=limit, cache_dir=cache_dir
    )
  if source == "tfds":
    if name is None:
      raise ValueError(f"source='tfds' needs name= (one of {sorted(TFDS_DATASETS)}).")
    if cache_dir is not None:
      raise ValueError(
        "cache_dir applies to source='imagefolder' only (TFDS data is already prepared on disk)."
      )
    return load_tfds(
      name, data_dir, split, preprocessing, limit, download=download, builder_name=builder_name
    )
  raise ValueError(f"source must be 'imagefolder' or 'tfds'; got {source!r}.")
