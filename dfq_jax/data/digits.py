"""The demo's data: scikit-learn's digits as a small RGB image dataset, offline.

scikit-learn ships the 1,797 UCI 8x8 handwritten digits inside the package, so the demo
needs no download. Images are upscaled to 16x16 (nearest) and replicated to RGB so that
the whole pipeline (generator, teacher, student, evaluator) runs exactly as for CIFAR.
A fixed, seeded split gives 1,438 training and 359 test images. The demo's teacher is
trained on the training split (dfq_jax/models/demo_teacher.py).
"""

from __future__ import annotations

import numpy as np

from dfq_jax.data.preprocess import ImageDataset, Normalization

CLASS_NAMES = tuple(str(i) for i in range(10))
IMAGE_SIZE = 16
TEST_FRACTION = 0.2


def _digits_arrays():
  try:
    from sklearn.datasets import load_digits  # optional: the demo only
  except ImportError as e:
    raise ImportError(
      "the demo needs scikit-learn (pip install scikit-learn), which ships the digits data set."
    ) from e
  digits = load_digits()
  images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # [N, 8, 8]
  images = images.repeat(2, axis=1).repeat(2, axis=2)  # [N, 16, 16]
  images = np.repeat(images[..., None], 3, axis=-1)  # [N, 16, 16, 3]
  return images, digits.target.astype(np.int32)


def digits_dataset(split: str) -> ImageDataset:
  """The 'train' (1,437) or 'test' (359) split of the digits, uint8 [N, 16, 16, 3]."""
  if split not in ("train", "test"):
    raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}.")
  images, labels = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(labels))
  n_test = int(round(len(labels) * TEST_FRACTION))
  idx = order[:n_test] if split == "test" else order[n_test:]
  return ImageDataset(
    images[np.sort(idx)], labels[np.sort(idx)], CLASS_NAMES, f"sklearn-digits/{split} (16x16 RGB)"
  )


def digits_normalization() -> Normalization:
  """Per-channel mean/std of the digits training split (all channels equal)."""
  x = digits_dataset("train").images.astype(np.float64) / 255.0
  mean, std = float(x.mean()), float(x.std())
  return Normalization((mean,) * 3, (std,) * 3)
