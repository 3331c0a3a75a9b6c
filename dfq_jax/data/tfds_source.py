"""Evaluation images from a prepared TensorFlow Datasets (TFDS) directory.

Supported: 'cifar10', 'cifar100' (split 'test', preprocessing 'cifar') and 'imagenet2012'
(split 'validation', preprocessing 'imagenet'); any other prepared image-classification
builder works when split and preprocessing are given (`builder_name` reads data prepared
under another builder name).

How it reads (tensorflow-datasets 4.9, no TensorFlow needed):
  * data prepared as array_record -> `builder.as_data_source` (random access, no TF).
  * data prepared only as tfrecord -> needs TensorFlow (`builder.as_dataset`, what
    `tfds.load(..., download=False)` does); without TF a clear error says to
    `pip install tensorflow-cpu` or re-prepare with file_format='array_record'.
  * data missing -> FileNotFoundError naming data_dir and the dataset. Nothing is ever
    downloaded unless download=True (TFDS's downloader retries for minutes offline).
Images are read as their encoded bytes (tfds.decode.SkipDecoding) and decoded here with PIL
(`convert('RGB')`), through the same preprocessing as the image-folder source. So the
decode never depends on whether OpenCV or TensorFlow happen to be installed (TFDS decodes
with OpenCV when present, and TF's default JPEG decoder differs from PIL's).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dfq_jax.data.preprocess import ImageDataset, Preprocessing, as_preprocessing, decode_image

logger = logging.getLogger(__name__)

# name -> (default split, default preprocessing)
TFDS_DATASETS: dict[str, tuple[str, str]] = {
  "cifar10": ("test", "cifar"),
  "cifar100": ("test", "cifar"),
  "imagenet2012": ("validation", "imagenet"),
}

_READ_CHUNK = 1000


class TFDSDataError(RuntimeError):
  """The prepared TFDS data cannot be read in this environment."""


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _resolve_data_dir(data_dir: "str | os.PathLike | None") -> Path:
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
  return Path(os.path.expanduser(os.fspath(data_dir)))


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def _prepared_versions(data_dir: Path, name: str) -> list[str]:
  """Versions with a dataset_info.json under <data_dir>/<name>/[<config>/]<version>/."""
  base = data_dir / name
  found = set()
  if base.is_dir():
    for info in list(base.glob("*/dataset_info.json")) + list(base.glob("*/*/dataset_info.json")):
      v = info.parent.name
      if re.fullmatch(r"\d+\.\d+\.\d+", v):
        found.add(v)
  return sorted(found, key=_version_key)


def _missing_message(name: str, builder_name: str, data_dir: Path, expected: str) -> str:
  found = _prepared_versions(data_dir, builder_name)
  if data_dir.is_dir():
    present = sorted(
      p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    contents = f"data_dir holds: {present[:20] or 'nothing'}"
  else:
    contents = "data_dir does not exist"
  alias = f" (builder {builder_name!r})" if builder_name != name else ""
  return (
    f"TFDS dataset {name!r}{alias} is not prepared in data_dir {str(data_dir)!r}: expected "
    f"{expected} ({contents}; prepared versions of {builder_name!r}: {found or 'none'}). "
    "Nothing was downloaded. Prepare it there first, e.g. `tfds build "
    f"{builder_name} --data_dir {data_dir} --file_format array_record` on a machine with "
    "network access (imagenet2012 needs the manually downloaded archives), or pass "
    "download=True."
  )


def get_builder(
  name: str,
  data_dir: "str | os.PathLike | None" = None,
  *,
  builder_name: str | None = None,
  download: bool = False,
) -> Any:
  """Returns a prepared TFDS builder for `builder_name or name` in data_dir.

  Never downloads unless download=True; then it runs download_and_prepare with
  file_format='array_record' (needs network, and importlib_resources).
  """
  import tensorflow_datasets as tfds  # imported on use
  from tensorflow_datasets.core import registered  # imported on use

  bname = builder_name or name
  data_dir = _resolve_data_dir(data_dir)
  if not data_dir.is_dir() and not download:
    raise FileNotFoundError(
      _missing_message(name, bname, data_dir, f"{data_dir}/{bname}/<version>/")
    )

  def make(**kwargs):
    try:
      return tfds.builder(bname, data_dir=os.fspath(data_dir), **kwargs)
    except registered.DatasetNotFoundError as e:
      # Neither builder code nor prepared files (its message lists the whole catalog).
      raise FileNotFoundError(
        _missing_message(name, bname, data_dir, f"{data_dir}/{bname}/<version>/dataset_info.json")
      ) from e

  if download:
    builder = make(file_format="array_record")
    if not builder.is_prepared():
      logger.warning("Downloading and preparing TFDS %s into %s (array_record).", bname, data_dir)
      builder.download_and_prepare(file_format="array_record")
    return builder

  builder = make()
  if builder.is_prepared():
    return builder
  # The code's version is not on disk; read another prepared version from its files.
  versions = _prepared_versions(data_dir, bname)
  if versions:
    builder = make(version=versions[-1])
    if builder.is_prepared():
      logger.info("TFDS %s: using prepared version %s from %s.", bname, versions[-1], data_dir)
      return builder
  raise FileNotFoundError(
    _missing_message(name, bname, data_dir, f"{builder.data_dir}/dataset_info.json")
  )


def _check_split(builder: Any, split: str, name: str) -> None:
  base = re.split(r"[\[+]", split, maxsplit=1)[0].strip()
  splits = sorted(builder.info.splits.keys())
  if base not in splits:
    raise ValueError(
      f"TFDS dataset {name!r} in {builder.data_dir} has no split {split!r}; "
      f"available splits: {splits}."
    )


def _random_access_formats(builder: Any) -> set:
  from tensorflow_datasets.core import file_adapters  # imported on use

  return set(builder.info.available_file_formats()) & set(
    file_adapters.FileFormat.with_random_access()
  )


def _iter_examples(builder: Any, split: str, image_key: str, limit: int | None):
  """Yields (encoded image bytes, label) in the stored order."""
  import tensorflow_datasets as tfds  # imported on use

  decoders = {image_key: tfds.decode.SkipDecoding()}
  if _random_access_formats(builder):
    source = builder.as_data_source(split=split, decoders=decoders)
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(0, n, _READ_CHUNK):
      yield from source.__getitems__(list(range(start, min(start + _READ_CHUNK, n))))
    return
  formats = sorted(str(f.value) for f in builder.info.available_file_formats())
  if not _tensorflow_available():
    raise TFDSDataError(
      f"TFDS data in {builder.data_dir} is stored as {formats}, which only TensorFlow can "
      "read (random access without TF needs array_record). Either `pip install "
      "tensorflow-cpu`, or re-prepare the dataset with file_format='array_record' (e.g. "
      f"`tfds build {builder.name} --data_dir <dir> --file_format array_record`, or "
      "`tfds.builder(name, data_dir=..., file_format='array_record')"
      ".download_and_prepare()`)."
    )
  # TensorFlow path, as tfds.load(..., download=False) would read it; images stay encoded.
  read_split = split if limit is None or "[" in split else f"{split}[:{int(limit)}]"
  ds = builder.as_dataset(split=read_split, decoders=decoders, shuffle_files=False)
  yield from tfds.as_numpy(ds)


def load_tfds(
  name: str,
  data_dir: "str | os.PathLike | None" = None,
  split: str | None = None,
  preprocessing: "str | Preprocessing | None" = None,
  limit: int | None = None,
  *,
  download: bool = False,
  builder_name: str | None = None,
  image_key: str = "image",
  label_key: str = "label",
) -> ImageDataset:
  """Loads a prepared TFDS image-classification split into memory.

  Args:
    name: 'cifar10', 'cifar100', 'imagenet2012' (sets the default split and
      preprocessing), or any builder name when split and preprocessing are given.
    data_dir: the TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    split: default 'test' for CIFAR, 'validation' for ImageNet; TFDS slicing such as
      'test[:1000]' is accepted.
    preprocessing: 'cifar' / 'imagenet' / Preprocessing (default by dataset).
    limit: read only the first `limit` examples (TFDS stores examples shuffled).
    download: allow TFDS to download and prepare (array_record) when missing.
    builder_name: TFDS builder to read instead of `name` (data prepared under another name).
    image_key, label_key: feature names.
  Returns:
    ImageDataset in the stored order; class_names from the label feature.
  """
  default_split, default_pre = TFDS_DATASETS.get(name, (None, None))
  split = split or default_split
  preprocessing = preprocessing or default_pre
  if split is None or preprocessing is None:
    raise ValueError(
      f"TFDS dataset {name!r} has no defaults (known: {sorted(TFDS_DATASETS)}); "
      "pass split= and preprocessing=."
    )
  p = as_preprocessing(preprocessing)
  builder = get_builder(name, data_dir, builder_name=builder_name, download=download)
  _check_split(builder, split, name)
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(
        f"TFDS dataset {name!r} has no feature {key!r}; features: {sorted(features.keys())}."
      )
  class_names = tuple(features[label_key].names)

  n = builder.info.splits[split].num_examples
  if limit is not None:
    n = min(n, int(limit))
  if n == 0:
    raise ValueError(
      f"TFDS dataset {name!r} split {split!r} in {builder.data_dir} gives no "
      f"examples (limit={limit})."
    )
  images = np.empty((n,) + p.output_shape, np.uint8)  # preallocated: ImageNet val is 7.5 GB
  labels = np.empty((n,), np.int32)
  count = 0
  for i, ex in enumerate(_iter_examples(builder, split, image_key, n)):
    if i >= n:
      break
    images[i] = decode_image(
      bytes(ex[image_key]), p, what=f"TFDS {builder.name}/{split} example {i}"
    )
    labels[i] = int(ex[label_key])
    count = i + 1
  if count != n:
    raise TFDSDataError(
      f"TFDS {builder.name}/{split} in {builder.data_dir} yielded {count} "
      f"examples; its dataset_info.json says {n}."
    )
  return ImageDataset(images, labels, class_names, f"tfds:{builder.name}/{split} ({p.key()})")
