"""The demo's teacher: a small BN network trained on scikit-learn's digits in seconds.

The demo (configs/demo.py) uses a CIFAR ResNet-8 (one block per stage, width 16, 19k
parameters) trained here on the digits training split (dfq_jax/data/digits.py), so the whole
pipeline runs offline with no pretrained weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfq_jax.data.digits import digits_dataset, digits_normalization
from dfq_jax.data.preprocess import normalize


def train_teacher(
  model, *, seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 0.05
) -> dict:
  """Trains `model` (train-mode BN) on the digits training split; returns its variables.

  SGD with momentum 0.9, cosine learning rate, weight decay 5e-4, random shifts of up to
  one pixel as augmentation.
  """
  ds = digits_dataset("train")
  norm = digits_normalization()
  x_all = normalize(ds.images, norm.mean, norm.std)
  y_all = ds.labels
  key = jax.random.key(seed)
  variables = jax.jit(model.init, static_argnames="train")(
    key, jnp.zeros((2, *x_all.shape[1:])), train=False
  )
  params, batch_stats = variables["params"], variables["batch_stats"]
  steps_per_epoch = len(y_all) // batch_size
  tx = optax.chain(
    optax.add_decayed_weights(5e-4),
    optax.sgd(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), 0.9),
  )
  opt = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt, x, y, key):
    shift = jax.random.randint(key, (2,), -1, 2)
    x = jnp.roll(x, shift, axis=(1, 2))

    def loss_fn(p):
      logits, upd = model.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, upd["batch_stats"]

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new_bs, opt, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(y_all))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size : (i + 1) * batch_size]
      key, sub = jax.random.split(key)
      params, batch_stats, opt, _ = step(params, batch_stats, opt, x_all[idx], y_all[idx], sub)
  return {"params": params, "batch_stats": batch_stats}
