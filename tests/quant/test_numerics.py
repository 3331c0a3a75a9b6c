"""Known-value and gradient tests of the quantizer numerics (methods.md §0, §2.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.quant import numerics


@pytest.mark.parametrize(
  "x, bits, lo, hi, expected",
  [
    ([0, 0.1, 0.2, 0.3], 2, 0.0, 0.3, [0, 0.1, 0.2, 0.3]),
    # Zero point rounds to an even integer: +1 is not representable.
    ([-1, -0.3, 0, 0.26, 0.5, 1], 2, -1.0, 1.0, [-4 / 3, 0, 0, 0, 2 / 3, 2 / 3]),
    # x=2 maps up because -0.5 rounds half-to-even.
    ([0, 0.4, 1, 2, 3.5, 4], 3, 0.0, 4.0, [0, 0.5714286, 1.1428572, 2.2857144, 3.4285715, 4.0]),
  ],
)
def test_asym_fake_quant_known_values(x, bits, lo, hi, expected):
  out = numerics.asym_fake_quant(jnp.asarray(x, jnp.float32), bits, lo, hi)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def _numpy_reference(x, bits, lo, hi):
  n = 2.0**bits - 1
  s = n / np.maximum(hi - lo, 1e-8)
  zp = np.round(s * lo) + 2.0 ** (bits - 1)
  q = np.clip(np.round(s * x - zp), -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
  return (q + zp) / s


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_matches_numpy_reference_and_level_count(bits):
  x = np.random.default_rng(bits).uniform(-1.3, 2.1, size=(20000,)).astype(np.float32)
  lo, hi = np.float32(x.min()), np.float32(x.max())
  out = np.asarray(numerics.asym_fake_quant(jnp.asarray(x), bits, lo, hi))
  ref = _numpy_reference(x, bits, lo, hi).astype(np.float32)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert len(np.unique(out)) <= 2**bits
  assert len(np.unique(out)) >= 2**bits - 1  # min/max range uses (almost) every level


def test_ste_gradient_is_identity_also_outside_range():
  x = jnp.array([-3.0, -0.5, 0.0, 0.2, 0.9, 5.0])
  g = jax.grad(lambda x: jnp.sum(numerics.fake_quant_ste(x, 3, 0.0, 1.0)))(x)
  np.testing.assert_array_equal(g, jnp.ones_like(x))
  g_lo, g_hi = jax.grad(
    lambda lo, hi: jnp.sum(numerics.fake_quant_ste(x, 3, lo, hi)), argnums=(0, 1)
  )(0.0, 1.0)
  assert g_lo == 0 and g_hi == 0


def test_weight_range_per_output_channel_hwio():
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 5))
  lo, hi = numerics.weight_range(w)
  assert lo.shape == hi.shape == (5,)
  np.testing.assert_allclose(lo, np.asarray(w).reshape(-1, 5).min(0))
  np.testing.assert_allclose(hi, np.asarray(w).reshape(-1, 5).max(0))
  # Each output channel has its own grid (step (hi-lo)/15): at most 2^4 levels per
  # channel, and the channel's minimum is reproduced to within half a step.
  wq = np.asarray(numerics.quantize_weight(w, 4))
  for c in range(5):
    assert len(np.unique(wq[..., c])) <= 16
  step = (np.asarray(hi) - np.asarray(lo)) / 15
  assert np.all(np.abs(wq.reshape(-1, 5).min(0) - lo) <= step / 2 + 1e-6)
  # No gradient flows into the range: the gradient is exactly the STE identity.
  g = jax.grad(lambda w: jnp.sum(numerics.quantize_weight(w, 4) * 2.0))(w)
  np.testing.assert_array_equal(g, 2.0 * jnp.ones_like(w))


def test_parity_ema_known_sequence():
  state = (jnp.float32(0), jnp.float32(0), jnp.float32(1))
  seq = []
  for m in [1.0, 1.0, 1.0, 2.0]:
    state = numerics.update_range(*state, jnp.float32(0), jnp.float32(m), mode="bias_corrected")
    seq.append(float(state[1]))
  np.testing.assert_allclose(seq[:3], [1.0, 5.263158, 17.848126], rtol=1e-6)
  np.testing.assert_allclose(seq[3], 47.290821, rtol=2e-6)  # float32


def test_parity_ema_converges_to_plain_ema():
  state = (jnp.float32(0), jnp.float32(0), jnp.float32(1))
  update = jax.jit(lambda s: numerics.update_range(*s, 0.0, 1.0, mode="bias_corrected"))
  for _ in range(200):
    state = update(state)
  np.testing.assert_allclose(float(state[1]), 1.00007, atol=2e-5)


def test_plain_ema_and_minmax():
  s = (jnp.float32(0), jnp.float32(0), jnp.float32(1))
  s = numerics.update_range(*s, -1.0, 2.0, mode="ema")
  assert (float(s[0]), float(s[1])) == (-1.0, 2.0)  # first batch initialises
  s = numerics.update_range(*s, 0.0, 4.0, mode="ema")
  np.testing.assert_allclose([s[0], s[1]], [-0.9, 2.2], rtol=1e-6)
  m = (jnp.float32(0), jnp.float32(0), jnp.float32(1))
  m = numerics.update_range(*m, 1.0, 2.0, mode="minmax")
  m = numerics.update_range(*m, 1.5, 3.0, mode="minmax")
  assert (float(m[0]), float(m[1])) == (1.0, 3.0)


@pytest.mark.parametrize("bits", [0, 1, 9, 33, 4.0, True])
def test_check_bits_rejects(bits):
  with pytest.raises(ValueError, match="not supported"):
    numerics.check_bits(bits)


def test_symmetric_weights_have_zero_point_0_and_2k_minus_1_levels():
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  for bits in (3, 4, 8):
    wq = numerics.quantize_weight(w, bits, "symmetric")
    m = jnp.max(jnp.abs(w), axis=(0, 1, 2))
    step = m / (2 ** (bits - 1) - 1)
    levels = wq / step  # integers: zero point 0
    np.testing.assert_allclose(levels, jnp.round(levels), atol=1e-3)
    assert float(jnp.max(jnp.abs(wq - w) / step)) <= 0.5 + 1e-4
    assert float(jnp.max(jnp.abs(levels))) <= 2 ** (bits - 1) - 1 + 1e-3
    # The straight-through gradient.
    g = jax.grad(lambda v, b=bits: jnp.sum(numerics.quantize_weight(v, b, "symmetric") * w))(w)
    np.testing.assert_allclose(g, w)
  with pytest.raises(ValueError, match="weight mode"):
    numerics.quantize_weight(w, 4, "log")
