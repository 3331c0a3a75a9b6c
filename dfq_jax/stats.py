"""Batch statistics shared by the models and the losses (imports only jax).

The lowest layer both `dfq_jax.models` and `dfq_jax.losses` may import: neither of those
imports the other, so helpers they share live here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def combine_moments(mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance [C] from per-sample mean and biased var [B, C].

  Law of total variance: Var = E_b[var_b] + E_b[(mean_b - mean)^2]. Exact when every
  sample has the same number of spatial positions.
  """
  batch_mean = jnp.mean(mean, axis=0)
  batch_var = jnp.mean(var, axis=0) + jnp.mean(jnp.square(mean - batch_mean), axis=0)
  return batch_mean, batch_var


@jax.custom_vjp
def spatial_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample mean and biased variance [B, C] over the spatial axes of x [B, ..., C].

  Two-pass (centred) variance. The backward is the closed form
  dx = (g_mean + 2 g_var (x - mean)) / n, n = spatial size: autodiff of the two-pass form
  adds a full-size reduction for the variance's path through the mean, whose exact value
  is zero (sum(x - mean) = 0), and XLA:CPU materialises its broadcasts.
  """
  return _spatial_moments(x)


def _spatial_moments(x):
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)
  return mean, var


def _spatial_moments_fwd(x):
  mean, var = _spatial_moments(x)
  return (mean, var), (x, mean)


def _spatial_moments_bwd(residuals, grads):
  x, mean = residuals
  g_mean, g_var = grads
  axes = tuple(range(1, x.ndim - 1))
  n = x.size // (x.shape[0] * x.shape[-1])
  centred = x - jnp.expand_dims(mean, axes)
  g_x = jnp.expand_dims(g_mean, axes) + 2.0 * jnp.expand_dims(g_var, axes) * centred
  return (g_x / n,)


spatial_moments.defvjp(_spatial_moments_fwd, _spatial_moments_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_normalize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BN normalisation over all axes but the last: (x - mean) / sqrt(var + eps).

  x [..., C] float32; returns (x_hat [..., C], mean [C], biased var [C]). The backward is
  the textbook fused form dx = rstd (g - mean(g) - x_hat mean(g x_hat)) (plus the terms of
  mean's and var's own cotangents): two reductions and one element-wise pass, where
  autodiff of the two-pass variance takes more.
  """
  return _batch_normalize(x, epsilon)[:3]


def _batch_normalize(x, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  rstd = jax.lax.rsqrt(var + epsilon)
  return (x - mean) * rstd, mean, var, rstd


def _batch_normalize_fwd(x, epsilon):
  x_hat, mean, var, rstd = _batch_normalize(x, epsilon)
  return (x_hat, mean, var), (x_hat, rstd)


def _batch_normalize_bwd(epsilon, residuals, grads):
  del epsilon
  x_hat, rstd = residuals
  g, g_mean, g_var = grads
  axes = tuple(range(x_hat.ndim - 1))
  n = x_hat.size // x_hat.shape[-1]
  g_x = rstd * (g - jnp.mean(g, axis=axes) - x_hat * jnp.mean(g * x_hat, axis=axes))
  # mean and var as outputs (the running statistics): d mean / dx = 1/n, d var / dx =
  # 2 (x - mean) / n = 2 x_hat / (rstd n).
  return (g_x + (g_mean + 2.0 * g_var * x_hat / rstd) / n,)


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)
