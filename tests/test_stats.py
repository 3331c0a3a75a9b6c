"""The closed-form backward passes of dfq_jax.stats equal autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax import stats
from dfq_jax.models.layers import BatchNorm


def _two_pass_spatial(x):
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)


def _two_pass_batch(x, eps):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return (x - mean) * jax.lax.rsqrt(var + eps), mean, var


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (3, 7, 2), (2, 4, 4, 2, 5)])
def test_spatial_moments_values_and_gradient(x64, shape):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape, jnp.float64) * 2.0 + 1.0
  w_mean = jax.random.normal(keys[1], (shape[0], shape[-1]), jnp.float64)
  w_var = jax.random.normal(keys[2], (shape[0], shape[-1]), jnp.float64)

  def loss(fn):
    def f(x):
      mean, var = fn(x)
      return jnp.sum(jnp.sin(mean) * w_mean) + jnp.sum(jnp.square(var) * w_var)

    return f

  np.testing.assert_allclose(stats.spatial_moments(x), _two_pass_spatial(x), rtol=1e-14)
  ours = jax.jit(jax.grad(loss(stats.spatial_moments)))(x)
  autodiff = jax.grad(loss(_two_pass_spatial))(x)
  np.testing.assert_allclose(ours, autodiff, rtol=1e-12, atol=1e-14)
  # Only the mean's path, then only the variance's: each term of the closed form.
  for which in (0, 1):
    ours = jax.grad(lambda x, k=which: jnp.sum(stats.spatial_moments(x)[k] * w_mean))(x)
    ref = jax.grad(lambda x, k=which: jnp.sum(_two_pass_spatial(x)[k] * w_mean))(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (16, 8)])
def test_batch_normalize_values_and_gradient(x64, shape):
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], shape, jnp.float64) * 3.0 - 2.0
  w_y = jax.random.normal(keys[1], shape, jnp.float64)
  w_mean = jax.random.normal(keys[2], shape[-1:], jnp.float64)
  w_var = jax.random.normal(keys[3], shape[-1:], jnp.float64)

  def loss(fn, with_moments):
    def f(x):
      y, mean, var = fn(x, 1e-5)
      out = jnp.sum(jnp.tanh(y) * w_y)
      if with_moments:  # the running statistics' path, normally outside the loss
        out = out + jnp.sum(mean * w_mean) + jnp.sum(jnp.square(var) * w_var)
      return out

    return f

  for a, b in zip(stats.batch_normalize(x, 1e-5), _two_pass_batch(x, 1e-5)):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
  for with_moments in (False, True):
    ours = jax.jit(jax.grad(loss(stats.batch_normalize, with_moments)))(x)
    autodiff = jax.grad(loss(_two_pass_batch, with_moments))(x)
    np.testing.assert_allclose(ours, autodiff, rtol=1e-11, atol=1e-13)


def test_batchnorm_train_mode_float32_matches_the_plain_formula():
  """The module (train mode, float32, one device) against the plain two-pass formula:
  output, input gradient, scale/bias gradients and the running-statistics update."""
  x = jax.random.normal(jax.random.key(2), (8, 6, 6, 4)) * 1.5 + 0.5
  g = jax.random.normal(jax.random.key(3), x.shape)
  bn = BatchNorm(use_running_average=False, momentum=0.1)
  variables = bn.init(jax.random.key(4), x)
  params = {
    "scale": jnp.array([1.0, 0.5, 2.0, -1.0]),
    "bias": jnp.array([0.0, 0.1, -0.2, 0.3]),
  }

  def module_loss(params, x):
    y, updates = bn.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
    )
    return jnp.sum(y * g), updates["batch_stats"]

  def plain_loss(params, x):
    y, mean, var = _two_pass_batch(x, 1e-5)
    n = x.size // x.shape[-1]
    running = {"mean": 0.1 * mean, "var": 0.9 + 0.1 * var * n / (n - 1)}
    return jnp.sum((y * params["scale"] + params["bias"]) * g), running

  (loss_a, stats_a), grads_a = jax.value_and_grad(module_loss, (0, 1), has_aux=True)(params, x)
  (loss_b, stats_b), grads_b = jax.value_and_grad(plain_loss, (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
