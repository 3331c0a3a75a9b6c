"""TFDS source on local files: tiny array_record datasets written by test-only builders.

`fake_tfds/cifar10/` writes data under the catalog name 'cifar10' (same version, splits and
features as TFDS's own builder), which the source then reads through the real catalog class.
`fake_tfds/dfq_fake_imagenet/` is an ImageNet-like set (variable sizes, 'validation'),
read through the `builder_name` override. No test may reach the network: sockets are
blocked and download_and_prepare is made to fail while the source reads.
"""

import importlib
import importlib.util
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from dfq_jax.data import (  # noqa: E402
  TFDSDataError,
  decode_image,
  load_eval_data,
  load_tfds,
  tfds_source,  # noqa: E402
)

HERE = Path(__file__).resolve().parent
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
PER_CLASS = 5


def _builder_module(name):
  if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
  return importlib.import_module(f"fake_tfds.{name}.{name}_dataset_builder")


def _refuse(*args, **kwargs):
  raise AssertionError(f"network access attempted: {args[:2]}")


def _prepare(builder_cls, data_dir, source):
  builder_cls.SOURCE = source
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "getaddrinfo", _refuse)
    b = builder_cls(data_dir=str(data_dir), file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return b


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, cifar10_jpeg):
  """data_dir with 'cifar10' (test split) packed from 50 real JPEGs, 5 per class."""
  mod = _builder_module("cifar10")
  assert tuple(mod.CLASS_NAMES) == CIFAR10_CLASSES
  items = [
    (str(f), c)
    for c, cls in enumerate(CIFAR10_CLASSES)
    for f in sorted((cifar10_jpeg / "test" / cls).glob("*.jpg"))[:PER_CLASS]
  ]
  data_dir = tmp_path_factory.mktemp("tfds_cifar")
  _prepare(mod.Builder, data_dir, {"test": items})
  return data_dir, items


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  """data_dir with 'dfq_fake_imagenet' (validation split): 6 JPEGs of various sizes."""
  mod = _builder_module("dfq_fake_imagenet")
  mod.Builder.CLASS_NAMES = ["n01", "n02", "n03"]
  src = tmp_path_factory.mktemp("imagenet_src")
  rng = np.random.default_rng(0)
  items = []
  for i, (w, h) in enumerate(
    [(300, 400), (500, 375), (257, 257), (640, 427), (224, 300), (333, 260)]
  ):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if i == 4:
      img = img.convert("L")  # grayscale JPEG -> converted to RGB on decode
    path = src / f"img{i}.jpg"
    img.save(path, quality=90)
    items.append((str(path), i % 3))
  data_dir = tmp_path_factory.mktemp("tfds_imagenet")
  _prepare(mod.Builder, data_dir, {"validation": items})
  return data_dir, items


@pytest.fixture
def no_download(monkeypatch, no_network):
  def refuse(self, *a, **k):
    raise AssertionError(f"download_and_prepare called for {self.name}")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def _by_pixels(items, mode):
  return {decode_image(f, mode).tobytes(): label for f, label in items}


def test_cifar10_reads_back_equal_to_pil(cifar_dir, no_download):
  data_dir, items = cifar_dir
  ds = load_tfds("cifar10", data_dir)
  assert ds.images.shape == (len(items), 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.class_names == CIFAR10_CLASSES
  np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [PER_CLASS] * 10)
  # TFDS shuffles the stored order: match every example to its source file by pixels.
  expected = _by_pixels(items, "cifar")
  assert len(expected) == len(items)  # all distinct
  for img, label in zip(ds.images, ds.labels):
    assert expected[img.tobytes()] == label
  # ... and to a direct PIL decode of the file.
  f0 = next(f for f, _ in items)
  with Image.open(f0) as im:
    assert np.asarray(im.convert("RGB")).tobytes() in expected


def test_cifar10_via_load_eval_data_limit_and_slicing(cifar_dir, no_download):
  data_dir, _ = cifar_dir
  full = load_eval_data("tfds", name="cifar10", data_dir=data_dir)
  part = load_eval_data("tfds", name="cifar10", data_dir=data_dir, limit=7)
  assert len(part) == 7
  np.testing.assert_array_equal(part.images, full.images[:7])
  np.testing.assert_array_equal(part.labels, full.labels[:7])
  sliced = load_tfds("cifar10", data_dir, split="test[10:20]")
  np.testing.assert_array_equal(sliced.images, full.images[10:20])
  assert full.name == "tfds:cifar10/test (cifar32)"
  with pytest.raises(ValueError, match="cache_dir applies"):
    load_eval_data("tfds", name="cifar10", data_dir=data_dir, cache_dir="/tmp/x")


def test_missing_dataset_does_not_download(cifar_dir, no_download, tmp_path):
  data_dir, _ = cifar_dir
  with pytest.raises(FileNotFoundError) as e:
    load_tfds("cifar100", data_dir)
  msg = str(e.value)
  assert "'cifar100'" in msg and str(data_dir) in msg and "Nothing was downloaded" in msg
  assert "download=True" in msg
  with pytest.raises(FileNotFoundError, match=r"'imagenet2012'.*nowhere.*does not exist"):
    load_tfds("imagenet2012", tmp_path / "nowhere")
  # An unknown builder name: concise error, not TFDS's whole catalog.
  with pytest.raises(FileNotFoundError, match=r"'no_such_ds'") as e:
    load_tfds("no_such_ds", data_dir, split="test", preprocessing="cifar")
  assert len(str(e.value)) < 1000


def test_unknown_split_and_defaults(cifar_dir, no_download):
  data_dir, _ = cifar_dir
  with pytest.raises(ValueError, match=r"no split 'train'.*\['test'\]"):
    load_tfds("cifar10", data_dir, split="train")
  with pytest.raises(ValueError, match="pass split= and preprocessing="):
    load_tfds("something", data_dir)


def test_tfrecord_without_tensorflow_says_what_to_do(cifar_dir, no_download, tmp_path, monkeypatch):
  data_dir, _ = cifar_dir
  # Same data, but its dataset_info.json claims tfrecord (what a TF-prepared dir has).
  copy = tmp_path / "tfrecord_dir"
  shutil.copytree(data_dir / "cifar10", copy / "cifar10")
  info_path = copy / "cifar10" / "3.0.2" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  monkeypatch.setattr(tfds_source, "_tensorflow_available", lambda: False)
  with pytest.raises(TFDSDataError, match=r"tensorflow-cpu.*array_record"):
    load_tfds("cifar10", copy)


def test_imagenet_like_with_builder_name(imagenet_dir, no_download):
  data_dir, items = imagenet_dir
  ds = load_eval_data(
    "tfds", name="imagenet2012", builder_name="dfq_fake_imagenet", data_dir=data_dir
  )  # defaults: split 'validation', 'imagenet'
  assert ds.images.shape == (6, 224, 224, 3)
  assert ds.class_names == ("n01", "n02", "n03")
  expected = _by_pixels(items, "imagenet")
  for img, label in zip(ds.images, ds.labels):
    assert expected[img.tobytes()] == label


def test_tfds_own_decode_equals_ours(cifar_dir, no_download):
  """TFDS's numpy decode (PIL when OpenCV is absent) gives the same pixels as ours."""
  if importlib.util.find_spec("cv2") is not None:
    pytest.skip("OpenCV installed: TFDS decodes with it, not PIL (we never use that path)")
  data_dir, _ = cifar_dir
  builder = tfds.builder("cifar10", data_dir=str(data_dir))
  decoded = builder.as_data_source(split="test")
  raw = builder.as_data_source(split="test", decoders={"image": tfds.decode.SkipDecoding()})
  for i in range(len(raw)):
    np.testing.assert_array_equal(decoded[i]["image"], decode_image(raw[i]["image"], "cifar"))


def test_other_prepared_version_is_used(cifar_dir, no_download, tmp_path):
  """Data prepared at another version than the installed catalog code (3.0.2) is read."""
  data_dir, _ = cifar_dir
  copy = tmp_path / "old"
  shutil.copytree(data_dir / "cifar10" / "3.0.2", copy / "cifar10" / "3.0.1")
  info_path = copy / "cifar10" / "3.0.1" / "dataset_info.json"
  info_path.write_text(info_path.read_text().replace('"3.0.2"', '"3.0.1"'))
  ds = load_tfds("cifar10", copy)
  np.testing.assert_array_equal(ds.images, load_tfds("cifar10", data_dir).images)
