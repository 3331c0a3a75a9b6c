"""Evaluation images from a class-per-folder tree: `<root>/<split>/<class>/*.{jpg,jpeg,png}`.

Classes are the sorted names of the (non-hidden) subfolders of `<root>/<split>` and get
labels 0..C-1 in that order (torchvision ImageFolder's convention; for the CIFAR-10 JPEG
export this is the standard order airplane..truck). Files are sorted by name inside each
class; extensions match case-insensitively; other files are ignored.

Images are decoded with PIL (see preprocess.decode_image) into one uint8 [N, H, W, 3]
array. Optionally the decoded arrays are cached as an .npz under a caller-given directory
(never inside the data root); the cache is keyed by root/split/preprocessing/limit and
invalidated when the file list, sizes or mtimes change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from dfq_jax.data.preprocess import ImageDataset, Preprocessing, as_preprocessing, decode_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "<root>/<split>/<class>/*.jpg (or .jpeg/.png)"
_CACHE_FORMAT = 1


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(
  root: "str | os.PathLike", split: str
) -> tuple[tuple[str, ...], list[str], np.ndarray]:
  """Lists `<root>/<split>/<class>/*` images.

  Returns:
    (class_names, files, labels): sorted class names; the image paths (class by class,
    sorted by file name); int32 labels of the files.
  Raises:
    FileNotFoundError: root or split folder missing.
    ValueError: no class folders, or a class folder without images.
  """
  root = Path(root)
  if not root.is_dir():
    what = "is not a directory" if root.exists() else "does not exist"
    raise FileNotFoundError(f"Image folder root {str(root)!r} {what}. Expected layout {LAYOUT}.")
  split_dir = root / split
  if not split_dir.is_dir():
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    raise FileNotFoundError(
      f"Split folder {str(split_dir)!r} does not exist (split={split!r}). Expected layout "
      f"{LAYOUT}; folders found in the root: {subdirs or 'none'}."
    )
  class_names = tuple(
    sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
  )
  if not class_names:
    loose = [e.name for e in os.scandir(split_dir) if e.is_file() and _is_image(e.name)]
    hint = (
      f" It holds {len(loose)} image files directly; put them in one folder per class."
      if loose
      else ""
    )
    raise ValueError(
      f"Split folder {str(split_dir)!r} has no class folders. Expected layout {LAYOUT}.{hint}"
    )
  files: list[str] = []
  labels: list[int] = []
  empty: list[str] = []
  for label, cls in enumerate(class_names):
    cdir = split_dir / cls
    names = sorted(e.name for e in os.scandir(cdir) if e.is_file() and _is_image(e.name))
    if not names:
      empty.append(str(cdir))
    files.extend(str(cdir / n) for n in names)
    labels.extend([label] * len(names))
  if empty:
    shown = ", ".join(repr(e) for e in empty[:5]) + (" ..." if len(empty) > 5 else "")
    raise ValueError(
      f"{len(empty)} of {len(class_names)} class folders under {str(split_dir)!r} contain "
      f"no images ({'/'.join(IMAGE_EXTENSIONS)}): {shown}. Expected layout {LAYOUT}; "
      "remove stray folders or add their images."
    )
  return class_names, files, np.asarray(labels, dtype=np.int32)


def select_balanced(labels: np.ndarray, limit: int | None) -> np.ndarray:
  """Indices of at most `limit` items taken round-robin over classes (the first files of
  every class), returned in increasing (class-major) order. None: all."""
  n = len(labels)
  if limit is None or limit >= n:
    return np.arange(n)
  if limit < 0:
    raise ValueError(f"limit must be >= 0 or None; got {limit}.")
  # rank of each item inside its class (labels are grouped and sorted).
  starts = np.searchsorted(labels, labels, side="left")
  rank = np.arange(n) - starts
  order = np.lexsort((labels, rank))  # by rank, then class
  return np.sort(order[:limit])


def _fingerprint(files: list[str], class_names: tuple[str, ...], root: Path) -> str:
  h = hashlib.sha256()
  h.update(("\n".join(class_names) + "\n\n").encode())
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.relpath(f, root)}\t{st.st_mtime_ns}\t{st.st_size}\n".encode())
  return h.hexdigest()


def _cache_path(
  cache_dir: Path, root: Path, split: str, p: Preprocessing, limit: int | None
) -> Path:
  key = f"{root.resolve()}\n{split}\n{p.key()}\n{limit}\n{_CACHE_FORMAT}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
  return cache_dir / f"imagefolder-{root.resolve().name}-{safe_split}-{p.key()}-{digest}.npz"


def _check_cache_dir(cache_dir: Path, root: Path) -> None:
  c, r = cache_dir.resolve(), root.resolve()
  if c == r or r in c.parents:
    raise ValueError(
      f"cache_dir {str(cache_dir)!r} is inside the data root {str(root)!r}; "
      "the data root is never written to. Choose a cache directory elsewhere."
    )


def _load_cache(path: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["fingerprint"]) != fingerprint:
        logger.info("Image cache %s is stale (files changed); rebuilding.", path)
        return None
      return z["images"], z["labels"]
  except Exception as e:
    logger.warning("Ignoring unreadable image cache %s (%s: %s).", path, type(e).__name__, e)
    return None


def _save_cache(
  path: Path, images: np.ndarray, labels: np.ndarray, fingerprint: str, class_names: tuple[str, ...]
) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(
        f,
        images=images,
        labels=labels,
        fingerprint=np.str_(fingerprint),
        class_names=np.asarray(class_names, dtype=np.str_),
      )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def decode_files(files: list[str], preprocessing: "str | Preprocessing") -> np.ndarray:
  """Decodes image files into one uint8 [N, H, W, 3] array (sequential; PIL releases the GIL
  little for these tiny files, and threads were measured slower on 2 cores)."""
  p = as_preprocessing(preprocessing)
  out = np.empty((len(files),) + p.output_shape, dtype=np.uint8)
  for i, f in enumerate(files):
    out[i] = decode_image(f, p)
  return out


def load_image_folder(
  root: "str | os.PathLike",
  split: str = "test",
  preprocessing: "str | Preprocessing" = "cifar",
  limit: int | None = None,
  cache_dir: "str | os.PathLike | None" = None,
) -> ImageDataset:
  """Loads `<root>/<split>/<class>/*.{jpg,jpeg,png}` into memory.

  Args:
    root: dataset root folder.
    split: subfolder of root, e.g. 'test', 'val'.
    preprocessing: 'cifar' (images must be 32x32, see Preprocessing.image_size),
      'imagenet' (Resize(256) + CenterCrop(224)), or a Preprocessing.
    limit: keep at most this many images, taken round-robin over the classes (the first
      files of each class), so small limits stay class-balanced. None: all.
    cache_dir: if given, the decoded arrays are cached in an .npz there.
  Returns:
    ImageDataset with images uint8 [N, H, W, 3] (class-major order), labels int32 [N].
  """
  p = as_preprocessing(preprocessing)
  root = Path(root)
  class_names, files, labels = list_image_folder(root, split)
  idx = select_balanced(labels, limit)
  files = [files[i] for i in idx]
  labels = labels[idx]
  name = f"imagefolder:{root}/{split} ({p.key()})"

  cache_path = fingerprint = None
  if cache_dir is not None:
    cache_dir = Path(cache_dir)
    _check_cache_dir(cache_dir, root)
    cache_path = _cache_path(cache_dir, root, split, p, limit)
    fingerprint = _fingerprint(files, class_names, root)
    cached = _load_cache(cache_path, fingerprint)
    if cached is not None and cached[0].shape == (len(files),) + p.output_shape:
      return ImageDataset(cached[0], cached[1], class_names, name, tuple(files))

  images = decode_files(files, p)
  if cache_path is not None:
    _save_cache(cache_path, images, labels, fingerprint, class_names)
  return ImageDataset(images, labels, class_names, name, tuple(files))
