"""The embedded default: a small BN teacher trained on scikit-learn's digits, offline.

scikit-learn ships the 1,797 UCI 8x8 handwritten digits inside the package, so the demo
needs no download. Images are upscaled to 16x16 (nearest) and replicated to RGB so that
the whole pipeline (generator, teacher, student, evaluator) runs exactly as for CIFAR.
A fixed, seeded split gives 1,438 training and 359 test images. The teacher is a CIFAR
ResNet-8 (one block per stage, width 16, 19k parameters) trained for a few seconds.
"""

from __future__ import annotations

import numpy as np
import optax
import jax
import jax.numpy as jnp

from dfq_jax.data.preprocess import ImageDataset, Normalization

CLASS_NAMES = tuple(str(i) for i in range(10))
IMAGE_SIZE = 16
TEST_FRACTION = 0.2


def _digits_arrays():
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the demo needs scikit-learn (pip install scikit-learn), which ships "
                      "the digits data set.") from e
  digits = load_digits()
  images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)       # [N, 8, 8]
  images = images.repeat(2, axis=1).repeat(2, axis=2)                      # [N, 16, 16]
  images = np.repeat(images[..., None], 3, axis=-1)                        # [N, 16, 16, 3]
  return images, digits.target.astype(np.int32)


def digits_dataset(split: str) -> ImageDataset:
  """The 'train' (1,437) or 'test' (359) split of the digits, uint8 [N, 16, 16, 3]."""
  if split not in ("train", "test"):
    raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}.")
  images, labels = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(labels))
  n_test = int(round(len(labels) * TEST_FRACTION))
  idx = order[:n_test] if split == "test" else order[n_test:]
  return ImageDataset(images[np.sort(idx)], labels[np.sort(idx)], CLASS_NAMES,
                      f"sklearn-digits/{split} (16x16 RGB)")


def digits_normalization() -> Normalization:
  """Per-channel mean/std of the digits training split (all channels equal)."""
  x = digits_dataset("train").images.astype(np.float64) / 255.0
  mean, std = float(x.mean()), float(x.std())
  return Normalization((mean,) * 3, (std,) * 3)


def train_teacher(model, *, seed: int = 0, epochs: int = 30, batch_size: int = 64,
                  lr: float = 0.05) -> dict:
  """Trains `model` (train-mode BN) on the digits training split; returns its variables.

  SGD with momentum 0.9, cosine learning rate, weight decay 5e-4, random shifts of up to
  one pixel as augmentation. About 10 s on 2 CPU cores.
  """
  ds = digits_dataset("train")
  norm = digits_normalization()
  x_all = (ds.images.astype(np.float32) / 255.0 - np.asarray(norm.mean, np.float32)) / \
      np.asarray(norm.std, np.float32)
  y_all = ds.labels
  key = jax.random.key(seed)
  variables = model.init(key, jnp.zeros((2, *x_all.shape[1:])), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  steps_per_epoch = len(y_all) // batch_size
  tx = optax.chain(optax.add_decayed_weights(5e-4),
                   optax.sgd(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), 0.9))
  opt = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt, x, y, key):
    shift = jax.random.randint(key, (2,), -1, 2)
    x = jnp.roll(x, shift, axis=(1, 2))

    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, upd["batch_stats"]

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new_bs, opt, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(y_all))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      key, sub = jax.random.split(key)
      params, batch_stats, opt, _ = step(params, batch_stats, opt, x_all[idx], y_all[idx], sub)
  return {"params": params, "batch_stats": batch_stats}
