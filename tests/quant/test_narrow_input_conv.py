"""The stem conv's GEMM input gradient equals the convolution's (forward, both gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.quant import layers
from dfq_jax.quant import narrow_input_conv as module
from dfq_jax.quant.narrow_input_conv import narrow_input_conv


def _lax(x, k, strides, padding):
  return jax.lax.conv_general_dilated(
    x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@pytest.mark.parametrize(
  "hw, kernel, strides, padding",
  [
    ((20, 20), 7, (2, 2), ((3, 3), (3, 3))),  # ResNet-18/50 stem (224 -> 112)
    ((19, 17), 7, (2, 2), ((3, 3), (3, 3))),  # odd sizes: the last rows read no window
    ((12, 12), 3, (1, 1), ((1, 1), (1, 1))),  # CIFAR ResNet stem
    ((13, 12), 3, (2, 2), ((1, 1), (1, 1))),  # MobileNetV2 stem
    ((11, 14), 5, (3, 2), ((2, 1), (0, 2))),  # any stride and asymmetric padding
  ],
)
def test_forward_and_gradients_equal_the_convolution(hw, kernel, strides, padding):
  rng = np.random.default_rng(sum(hw) + kernel)
  x = jnp.asarray(rng.standard_normal((2, *hw, 3), np.float32))
  k = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 8), np.float32))
  y_ref, vjp_ref = jax.vjp(lambda x, k: _lax(x, k, strides, padding), x, k)
  y, vjp = jax.vjp(lambda x, k: narrow_input_conv(x, k, strides, padding), x, k)
  dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_qconv_stem_takes_the_gemm_gradient_and_keeps_the_convolution(monkeypatch):
  calls = []
  original = module.narrow_input_conv
  monkeypatch.setattr(layers, "narrow_input_conv", lambda *a: calls.append(a[2:]) or original(*a))
  stem = layers.QConv(8, (7, 7), (2, 2), padding=((3, 3), (3, 3)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32))
  variables = stem.init(jax.random.key(0), x)
  calls.clear()
  dx = jax.grad(lambda x: jnp.sum(stem.apply(variables, x) ** 2))(x)
  assert calls == [((2, 2), ((3, 3), (3, 3)))]  # the strided RGB stem takes it
  k = variables["params"]["kernel"]
  want = jax.grad(lambda x: jnp.sum(_lax(x, k, (2, 2), ((3, 3), (3, 3))) ** 2))(x)
  np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  # A CIFAR stem (stride 1) and a 16-channel conv keep XLA's convolution.
  for conv, width in ((layers.QConv(8, (3, 3)), 3), (layers.QConv(8, (3, 3), (2, 2)), 16)):
    z = jnp.ones((1, 8, 8, width))
    conv.apply(conv.init(jax.random.key(0), z), z)
  assert len(calls) == 1


def test_bfloat16_inputs_accumulate_in_float32_and_match_the_low_precision_convolution():
  """Under compute_dtype=bfloat16 the stem takes the GEMM form too: same values as XLA's
  bf16 convolution with float32 accumulation, up to bf16 rounding of the products."""
  strides, padding = (2, 2), ((3, 3), (3, 3))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 20, 20, 3), np.float32))
  k = jnp.asarray(rng.standard_normal((7, 7, 3, 8), np.float32))

  def lax_bf16(x, k):
    return jax.lax.conv_general_dilated(
      x.astype(jnp.bfloat16),
      k.astype(jnp.bfloat16),
      strides,
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32,
    )

  def ours(x, k):
    return narrow_input_conv(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), strides, padding)

  y_ref, vjp_ref = jax.vjp(lax_bf16, x, k)
  y, vjp = jax.vjp(ours, x, k)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)  # the same convolution call
  dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-2 * float(jnp.abs(want).max()))
  # ...and within bf16 rounding of the float32 gradient.
  dx32 = jax.vjp(lambda x: _lax(x, k, strides, padding), x)[1](dy)[0]
  got = vjp(dy)[0]
  np.testing.assert_allclose(got, dx32, atol=2e-2 * float(jnp.abs(dx32).max()))
  assert float(jnp.abs(got - dx32).max()) > 0  # it really ran in bfloat16


def test_qconv_bfloat16_stem_takes_the_gemm_gradient(monkeypatch):
  calls = []
  original = module.narrow_input_conv
  monkeypatch.setattr(
    layers, "narrow_input_conv", lambda *a: calls.append(a[0].dtype) or original(*a)
  )
  stem = layers.QConv(8, (7, 7), (2, 2), padding=((3, 3), (3, 3)), dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32))
  variables = stem.init(jax.random.key(0), x)
  y = stem.apply(variables, x)
  assert y.dtype == jnp.float32
  assert calls[-1] == jnp.bfloat16
