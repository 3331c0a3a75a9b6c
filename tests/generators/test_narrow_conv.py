"""The tap-GEMM image conv (generators/narrow_conv.py) equals lax.conv 3x3 'same'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dfq_test_utils import assert_close_to_scale, conv_inputs

from dfq_jax.generators.narrow_conv import NarrowConv, conv3x3_narrow
from dfq_jax.quant.layers import QConv


def _reference(x, kernel, bias):
  y = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return y + bias


@pytest.mark.parametrize(
  "shape",
  [  # (batch, H, W, cin, cout)
    (2, 8, 8, 64, 3),
    (3, 5, 7, 6, 2),  # H != W, odd sizes
    (1, 1, 1, 4, 3),  # one pixel: only the centre tap sees data
    (1, 2, 9, 5, 1),  # H = 2, one output channel
    (2, 6, 6, 3, 16),  # wide output still exact
  ],
)
def test_forward_and_gradients_match_lax_conv(shape):
  x, kernel, bias, dy = conv_inputs(*shape)
  y, vjp = jax.vjp(conv3x3_narrow, x, kernel, bias)
  y_ref, vjp_ref = jax.vjp(_reference, x, kernel, bias)
  assert_close_to_scale(y, y_ref)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):  # dx, dkernel, dbias
    assert_close_to_scale(g, g_ref)


def test_asymmetric_kernel_orientation():
  """A kernel with a single non-zero tap shifts the image the way lax.conv does."""
  x = jnp.arange(2 * 4 * 5 * 1, dtype=jnp.float32).reshape(2, 4, 5, 1)
  for kh in range(3):
    for kw in range(3):
      kernel = jnp.zeros((3, 3, 1, 1)).at[kh, kw, 0, 0].set(1.0)
      np.testing.assert_array_equal(conv3x3_narrow(x, kernel), _reference(x, kernel, 0.0))


def test_bfloat16_compute_is_close_and_returns_float32():
  x, kernel, bias, dy = conv_inputs(2, 6, 6, 32, 3, seed=2)
  f = lambda x, k, b: conv3x3_narrow(x, k, b, compute_dtype=jnp.bfloat16)
  y, vjp = jax.vjp(f, x, kernel, bias)
  assert y.dtype == jnp.float32
  y_ref, vjp_ref = jax.vjp(_reference, x, kernel, bias)
  assert_close_to_scale(y, y_ref, rtol=2e-2)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    assert g.dtype == jnp.float32
    assert_close_to_scale(g, g_ref, rtol=2e-2)


def test_module_has_qconv_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 8))
  narrow, standard = NarrowConv(3), QConv(3, (3, 3), use_bias=True)
  p = narrow.init(jax.random.key(4), x)
  p_std = standard.init(jax.random.key(4), x)
  jax.tree.map(np.testing.assert_array_equal, p, p_std)
  assert_close_to_scale(jax.jit(narrow.apply)(p, x), standard.apply(p_std, x))


def test_rejects_wrong_kernel_shape():
  with pytest.raises(ValueError, match=r"kernel \[3,3,C,Cout\]"):
    conv3x3_narrow(jnp.zeros((1, 4, 4, 5)), jnp.zeros((3, 3, 4, 3)))
