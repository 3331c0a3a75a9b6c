"""Image-folder source: layout, decoding, errors, limit, cache; and the real CIFAR-10 JPEGs."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfq_jax.data import imagefolder, load_eval_data, load_image_folder

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


def _rgb(seed, size=(32, 32)):
  return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _write(path: Path, arr: np.ndarray, mode=None, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
  img.save(path, **kw)
  return path


@pytest.fixture
def tiny_root(tmp_path):
  """root/test/{cat,dog,emu}: PNGs, JPEGs (two extensions, upper case), grayscale, RGBA."""
  root = tmp_path / "root"
  t = root / "test"
  _write(t / "cat" / "b.png", _rgb(1))
  _write(t / "cat" / "a.png", _rgb(2))
  _write(t / "cat" / "c.JPG", _rgb(3), quality=90)
  _write(t / "dog" / "x.jpeg", _rgb(4))
  _write(t / "dog" / "gray.png", _rgb(5)[..., 0], mode="L")
  _write(t / "emu" / "rgba.png", np.dstack([_rgb(6), np.full((32, 32), 7, np.uint8)]))
  (t / "emu" / "notes.txt").write_text("not an image")
  (t / "emu" / ".hidden.png").write_bytes(b"junk")
  (t / ".ipynb_checkpoints").mkdir()
  return root


def _pil(path):
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def test_layout_order_and_decode(tiny_root):
  ds = load_image_folder(tiny_root, "test")
  assert ds.class_names == ("cat", "dog", "emu")
  assert ds.num_classes == 3
  names = [Path(f).relative_to(tiny_root / "test").as_posix() for f in ds.files]
  assert names == [
    "cat/a.png",
    "cat/b.png",
    "cat/c.JPG",
    "dog/gray.png",
    "dog/x.jpeg",
    "emu/rgba.png",
  ]
  np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 2])
  assert ds.images.dtype == np.uint8 and ds.images.shape == (6, 32, 32, 3)
  assert ds.labels.dtype == np.int32
  for img, f in zip(ds.images, ds.files):
    np.testing.assert_array_equal(img, _pil(f))
  # PNG is lossless: exact pixels.
  np.testing.assert_array_equal(ds.images[0], _rgb(2))
  # Grayscale -> RGB replicates the channel; RGBA -> RGB drops alpha.
  gray = _rgb(5)[..., 0]
  np.testing.assert_array_equal(ds.images[3], np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(ds.images[5], _rgb(6))


def test_wrong_size_names_the_file(tiny_root):
  _write(tiny_root / "test" / "dog" / "wide.png", _rgb(9, size=(33, 32)))
  with pytest.raises(ValueError, match=r"wide\.png.*33x32.*32x32"):
    load_image_folder(tiny_root, "test", "cifar")


def test_unreadable_file_names_the_file(tiny_root):
  (tiny_root / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  with pytest.raises(ValueError, match=r"Cannot decode image .*broken\.jpg"):
    load_image_folder(tiny_root, "test")


def test_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*<root>/<split>/<class>"):
    load_image_folder(tmp_path / "nope", "test")


def test_missing_split(tiny_root):
  with pytest.raises(FileNotFoundError, match=r"root/val.*split='val'.*\['test'\]"):
    load_image_folder(tiny_root, "val")


def test_no_class_folders(tmp_path):
  _write(tmp_path / "r" / "test" / "loose.png", _rgb(0))
  with pytest.raises(ValueError, match=r"r/test.*no class folders.*1 image files directly"):
    load_image_folder(tmp_path / "r", "test")


def test_empty_class_folder(tiny_root):
  (tiny_root / "test" / "fox").mkdir()
  (tiny_root / "test" / "fox" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match=r"1 of 4 class folders.*no images.*test/fox"):
    load_image_folder(tiny_root, "test")


def test_bad_mode(tiny_root):
  with pytest.raises(ValueError, match="preprocessing mode"):
    load_image_folder(tiny_root, "test", "resnet")


def test_limit_is_class_balanced(tiny_root):
  ds = load_image_folder(tiny_root, "test", limit=4)
  names = [Path(f).name for f in ds.files]
  assert names == ["a.png", "b.png", "gray.png", "rgba.png"]  # ranks 0 of all, then rank 1
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 2])
  assert len(load_image_folder(tiny_root, "test", limit=0)) == 0


def test_imagenet_mode_on_folder(tmp_path):
  _write(tmp_path / "r" / "val" / "a" / "big.jpg", _rgb(1, size=(300, 260)), quality=95)
  _write(tmp_path / "r" / "val" / "b" / "tall.png", _rgb(2, size=(250, 400)))
  ds = load_image_folder(tmp_path / "r", "val", "imagenet")
  assert ds.images.shape == (2, 224, 224, 3)


def test_cache_roundtrip_and_invalidation(tiny_root, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  before = sorted(p for p in tiny_root.rglob("*"))
  ds1 = load_image_folder(tiny_root, "test", cache_dir=cache)
  npz = list(cache.glob("*.npz"))
  assert len(npz) == 1 and "test" in npz[0].name and "cifar32" in npz[0].name
  assert sorted(p for p in tiny_root.rglob("*")) == before  # nothing written in the root

  calls = []
  real_decode = imagefolder.decode_files
  monkeypatch.setattr(
    imagefolder, "decode_files", lambda files, p: calls.append(len(files)) or real_decode(files, p)
  )
  ds2 = load_image_folder(tiny_root, "test", cache_dir=cache)
  assert calls == []  # served from the cache
  np.testing.assert_array_equal(ds2.images, ds1.images)
  np.testing.assert_array_equal(ds2.labels, ds1.labels)
  assert ds2.class_names == ds1.class_names and ds2.files == ds1.files

  # Changing a file's mtime invalidates.
  f = tiny_root / "test" / "cat" / "a.png"
  st = f.stat()
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
  load_image_folder(tiny_root, "test", cache_dir=cache)
  assert calls == [6]
  # A new file invalidates too (and is included).
  _write(tiny_root / "test" / "emu" / "new.png", _rgb(11))
  ds3 = load_image_folder(tiny_root, "test", cache_dir=cache)
  assert calls == [6, 7] and len(ds3) == 7
  load_image_folder(tiny_root, "test", cache_dir=cache)
  assert calls == [6, 7]
  # Another mode / limit gets its own cache file.
  load_image_folder(tiny_root, "test", limit=3, cache_dir=cache)
  assert len(list(cache.glob("*.npz"))) == 2


def test_corrupt_cache_is_rebuilt(tiny_root, tmp_path):
  cache = tmp_path / "cache"
  ds1 = load_image_folder(tiny_root, "test", cache_dir=cache)
  (npz,) = cache.glob("*.npz")
  npz.write_bytes(b"garbage")
  ds2 = load_image_folder(tiny_root, "test", cache_dir=cache)
  np.testing.assert_array_equal(ds2.images, ds1.images)


def test_cache_inside_root_is_refused(tiny_root):
  with pytest.raises(ValueError, match="inside the data root"):
    load_image_folder(tiny_root, "test", cache_dir=tiny_root / "test" / "cache")
  assert not (tiny_root / "test" / "cache").exists()


def test_load_eval_data_imagefolder(tiny_root):
  ds = load_eval_data("imagefolder", root=tiny_root)
  assert len(ds) == 6 and ds.name.startswith("imagefolder:")
  with pytest.raises(ValueError, match="needs root"):
    load_eval_data("imagefolder")
  with pytest.raises(ValueError, match="source must be"):
    load_eval_data("folder", root=tiny_root)


# ---------------------------------------------------------------- real shared CIFAR-10 JPEGs


def test_real_cifar10_subset_matches_pil(cifar10_jpeg):
  ds = load_image_folder(cifar10_jpeg, "test", "cifar", limit=200)
  assert ds.class_names == CIFAR10_CLASSES
  assert ds.images.shape == (200, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.labels), [20] * 10)
  for img, label, f in zip(ds.images, ds.labels, ds.files):
    assert Path(f).parent.name == CIFAR10_CLASSES[label]
    np.testing.assert_array_equal(img, _pil(f))
  assert Path(ds.files[0]).name == "0000.jpg"


def test_real_cifar10_full_test_set(cifar10_jpeg, tmp_path):
  t0 = time.perf_counter()
  ds = load_eval_data("imagefolder", root=cifar10_jpeg, split="test", cache_dir=tmp_path)
  dt = time.perf_counter() - t0
  print(f"decoded 10k CIFAR-10 test JPEGs in {dt:.2f} s")
  assert ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [1000] * 10)
  assert ds.class_names == CIFAR10_CLASSES
  # Sanity: per-channel mean/std of the JPEG test set (stack-notes §2).
  x = ds.images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(x.mean(0), [0.4941, 0.4851, 0.4504], atol=2e-4)
  t0 = time.perf_counter()
  ds2 = load_eval_data("imagefolder", root=cifar10_jpeg, split="test", cache_dir=tmp_path)
  print(f"reloaded from the .npz cache in {time.perf_counter() - t0:.2f} s")
  np.testing.assert_array_equal(ds2.images, ds.images)
