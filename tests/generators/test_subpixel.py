"""The sub-pixel upsample+conv (generators/subpixel.py) equals upsample then 3x3 conv."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dfq_test_utils import assert_close_to_scale, conv_inputs

from dfq_jax.generators import get_generator
from dfq_jax.generators.gdfq import GeneratorCifar, upsample_nearest_2x
from dfq_jax.generators.subpixel import upsample2x_conv3x3

RTOL = 1e-5


def _reference(x, kernel, bias):
  y = jax.lax.conv_general_dilated(
    upsample_nearest_2x(x),
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return y + bias


_close = assert_close_to_scale
_inputs = functools.partial(conv_inputs, out_scale=2)  # dy at twice the input's side


SHAPES = [  # (batch, H, W, cin, cout)
  (2, 4, 4, 8, 16),
  (3, 5, 3, 7, 5),  # H != W, channels not multiples of 8
  (1, 1, 1, 3, 2),  # H = W = 1, batch 1
  (1, 1, 6, 5, 9),  # H = 1
  (2, 8, 8, 64, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape):
  x, kernel, bias, dy = _inputs(*shape)
  y, vjp = jax.vjp(upsample2x_conv3x3, x, kernel, bias)
  y_ref, vjp_ref = jax.vjp(_reference, x, kernel, bias)
  _close(y, y_ref)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):  # dx, dkernel, dbias
    _close(g, g_ref)


def test_jit_and_no_bias():
  x, kernel, bias, dy = _inputs(2, 3, 5, 6, 4, seed=1)
  f = jax.jit(lambda x, k: upsample2x_conv3x3(x, k))
  _close(f(x, kernel), _reference(x, kernel, 0.0))
  g = jax.jit(jax.grad(lambda x, k: jnp.sum(upsample2x_conv3x3(x, k) * dy), argnums=(0, 1)))
  g_ref = jax.grad(lambda x, k: jnp.sum(_reference(x, k, 0.0) * dy), argnums=(0, 1))
  for a, b in zip(g(x, kernel), g_ref(x, kernel)):
    _close(a, b)


def test_bfloat16_compute_is_close_and_returns_float32():
  x, kernel, bias, dy = _inputs(2, 4, 4, 16, 8, seed=2)
  f = lambda x, k, b: upsample2x_conv3x3(x, k, b, compute_dtype=jnp.bfloat16)
  y, vjp = jax.vjp(f, x, kernel, bias)
  assert y.dtype == jnp.float32
  y_ref, vjp_ref = jax.vjp(_reference, x, kernel, bias)
  _close(y, y_ref, rtol=2e-2)  # bf16 inputs: ~3 significant digits
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    assert g.dtype == jnp.float32
    _close(g, g_ref, rtol=2e-2)


def _generator_case(name, **kw):
  batch = 4
  z = jax.random.normal(jax.random.key(0), (batch, 100))
  labels = jnp.arange(batch) % 10
  gens = {
    impl: get_generator(name, num_classes=10, conv_impl=impl, **kw)
    for impl in ("standard", "subpixel")
  }
  params = gens["standard"].init(jax.random.key(1), z, labels)["params"]
  # Same parameter tree (names, shapes, init values) from both implementations.
  params_sub = gens["subpixel"].init(jax.random.key(1), z, labels)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(params_sub)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, params_sub)
  assert params["conv2"]["kernel"].shape == (3, 3, kw["width"], kw["width"] // 2)
  target = jax.random.normal(jax.random.key(2), (batch,) + (kw["image_size"],) * 2 + (3,))
  out = {}
  for impl, gen in gens.items():

    def loss(p, gen=gen):
      images = gen.apply({"params": p}, z, labels)
      return jnp.mean((images - target) ** 2), images

    out[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
  (g_std, x_std), (g_sub, x_sub) = out["standard"], out["subpixel"]
  _close(x_sub, x_std, rtol=1e-5)
  # Per leaf, relative to the largest gradient entry of the whole tree: the conv biases
  # feed a BN, so their own gradients are ~0 (pure rounding noise). (A leaky-ReLU input
  # within rounding of 0 could flip its slope; these seeds have none.)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_std))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale), g_sub, g_std
  )


def test_cifar_generator_same_images_and_grads():
  _generator_case("cifar", image_size=32, width=16)


def test_imagenet_generator_same_images_and_grads():
  _generator_case("imagenet", image_size=16, width=16)


def test_generator_rejects_bad_conv_impl():
  with pytest.raises(ValueError, match="subpixel"):
    get_generator("cifar", conv_impl="fast")
  gen = GeneratorCifar(image_size=8, width=8, conv_impl="fft")
  z, y = jnp.zeros((2, 100)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="'subpixel', 'standard'"):
    gen.init(jax.random.key(0), z, y)


def test_kernel_gradient_fold_is_the_exact_transpose():
  """The written-out transpose equals jax.linear_transpose of the kernel fold."""
  from dfq_jax.generators import subpixel

  kernel = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))
  cotangent = jax.random.normal(jax.random.key(1), (4 * 5, 4 * 7))
  (expected,) = jax.linear_transpose(subpixel.subpixel_kernel, kernel)(cotangent)
  np.testing.assert_array_equal(subpixel.kernel_grad_from_subpixel(cotangent, 5, 7), expected)
