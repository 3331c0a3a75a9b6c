"""Shared model layers: a BatchNorm that exposes the statistics of its input.

`BatchNorm` behaves like `torch.nn.BatchNorm2d` (running statistics in `batch_stats`,
`mean` and `var`; affine `scale` and `bias` in `params`). In addition, when the
`bn_stats` collection is mutable, it stores the per-sample statistics of its INPUT:

    bn_stats[<layer path>] = {'mean': [B, C], 'var': [B, C]}

(mean and biased variance over the spatial axes of each sample). The tree has the same
structure as `batch_stats`, so alignment losses are `jax.tree.map`s over the two trees.
`batch_moments` turns the per-sample tree into batch mean / biased variance ([C]),
exactly as PyTorch's BN forward hooks in GDFQ/AdaDFQ/DSG-QAT compute them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.quant.layers import QConv, QuantAct
from dfq_jax.stats import batch_normalize, combine_moments, spatial_moments

BN_STATS = "bn_stats"


def batch_moments(bn_stats):
  """Maps a per-sample `bn_stats` tree to batch statistics with the same structure."""

  def is_layer(node):
    return isinstance(node, dict) and set(node) == {"mean", "var"}

  def one(node):
    mean, var = combine_moments(node["mean"], node["var"])
    return {"mean": mean, "var": var}

  return jax.tree.map(one, bn_stats, is_leaf=is_layer)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, PyTorch semantics, exposing its input statistics.

  Attributes:
    use_running_average: normalise with the running statistics (eval mode) if True,
      else with the batch statistics (train mode).
    momentum: PyTorch momentum of the running-statistics update (0.1 = torch default).
    epsilon: added to the variance.
    use_scale, use_bias: affine parameters (PyTorch `affine`).
    track_running_stats: keep running statistics in `batch_stats` (PyTorch's flag);
      False for layers that only ever run in train mode (the generators).
    axis_name: mapped axis for cross-device batch statistics in train mode.
  """

  use_running_average: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  track_running_stats: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if self.track_running_stats:
      ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
      ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    elif self.use_running_average:
      raise ValueError("BatchNorm without running statistics must run in train mode.")
    if self.is_mutable_collection(BN_STATS) and not self.is_initializing():
      mean_b, var_b = spatial_moments(x.astype(jnp.float32))
      self.put_variable(BN_STATS, "mean", mean_b)
      self.put_variable(BN_STATS, "var", var_b)

    if self.use_running_average:
      x_hat = _normalize(x, ra_mean.value, ra_var.value, self.epsilon)
    else:
      x_hat, mean, var = self._normalize_with_batch_statistics(x)
      if (
        self.track_running_stats
        and self.is_mutable_collection("batch_stats")
        and not self.is_initializing()
      ):
        n = x.size // channels
        unbiased = var * n / max(n - 1, 1)
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * unbiased
    y = x_hat
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (channels,), jnp.float32).astype(x.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(x.dtype)
    return y

  def _normalize_with_batch_statistics(self, x: jax.Array):
    """(x_hat, batch mean [C], biased batch var [C]) in train mode.

    One device in float32: `batch_normalize` (closed-form backward). Otherwise the moments
    in float32: a centred second pass on one device, E[x^2] - E[x]^2 across devices.
    """
    if self.axis_name is None and x.dtype == jnp.float32:
      return batch_normalize(x, self.epsilon)
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    if self.axis_name is None:
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
    else:
      mean, sq = jax.lax.pmean((mean, jnp.mean(jnp.square(xf), axis=axes)), self.axis_name)
      var = jnp.maximum(sq - jnp.square(mean), 0.0)
    return _normalize(x, mean, var, self.epsilon), mean, var


def _normalize(x: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) in x's dtype; mean, var [C] float32."""
  return (x - mean.astype(x.dtype)) * jax.lax.rsqrt(var + epsilon).astype(x.dtype)


def projection_shortcut(x: jax.Array, features: int, stride: int, quant, train: bool, dtype=None):
  """Identity, or conv1x1/stride + BN where the shape changes (ResNet option B).

  Call inside a compact module: creates `shortcut_conv` and `shortcut_bn` there (and the
  deployment quantizer `shortcut_act`).
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  x = QConv(
    features,
    (1, 1),
    (stride, stride),
    padding="VALID",
    quant=quant,
    dtype=dtype,
    name="shortcut_conv",
  )(x)
  x = BatchNorm(use_running_average=not train, name="shortcut_bn")(x)
  return QuantAct(quant, deploy=True, name="shortcut_act")(x)
