"""bench convs: the im2col + bfloat16 dot convolution is the convolution (forward and both
gradients, up to bfloat16 rounding), and a table row reports every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax import conv_bench


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_bf16_equals_the_float32_convolution_up_to_bf16_rounding(stride):
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 5), np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, 5, 7), np.float32) / np.sqrt(45))
  dy = jnp.asarray(rng.standard_normal((2, (9 - 1) // stride + 1, (8 - 1) // stride + 1, 7)))

  def forward_and_grads(conv):
    y, vjp = jax.vjp(lambda x, k: conv(x, k, stride), x, k)
    return (y, *vjp(dy.astype(jnp.float32)))

  want = forward_and_grads(lambda x, k, s: conv_bench.conv_lax(x, k, s, jnp.float32))
  got = forward_and_grads(conv_bench.conv_im2col_bf16)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(w)))
    err = float(jnp.max(jnp.abs(g - w)))
    assert 0 < err < 2e-2 * scale  # bf16 operands (8 mantissa bits), not bit-exact float32
  # A wrong tap order would fail by O(1): the patches follow the HWIO kernel layout.
  p = conv_bench.patches(x, stride)
  direct = jnp.einsum("nhwk,kf->nhwf", p, k.reshape(-1, 7), precision="highest")
  np.testing.assert_allclose(direct, want[0], rtol=1e-5, atol=1e-5)


def test_a_table_row_times_every_variant():
  row = conv_bench.time_shape("tiny", 2, 8, 4, 4, steps=2)
  for name in conv_bench.VARIANTS:
    assert row[f"{name}_ms"] > 0 and row[f"{name}_gflops"] > 0  # 3 significant digits, never 0
    flops = 3 * 2 * 2 * 8 * 8 * 9 * 4 * 4  # batch 2, 8x8, 4 -> 4 channels
    assert row[f"{name}_gflops"] == pytest.approx(flops / row[f"{name}_ms"] / 1e6, rel=2e-2)
  assert 0 < row["lax_bf16_rel_err"] < 2e-2 and 0 < row["im2col_bf16_rel_err"] < 2e-2
  with pytest.raises(ValueError, match="unknown convolution variant"):
    conv_bench.variant("winograd")
