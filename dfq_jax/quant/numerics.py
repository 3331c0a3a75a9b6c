"""Pure quantization numerics: asymmetric fake quantization, STE, range updates.

Conventions: NHWC activations, HWIO conv kernels and [in, out] dense kernels, so the
per-output-channel axis of every weight is the LAST one.

The quantizer is the ZeroQ/GDFQ asymmetric uniform quantizer (methods.md §2.3), with the
exact operation order of the original code and half-to-even rounding (`jnp.round`, like
`torch.round`):

    n  = 2**k - 1
    s  = n / max(hi - lo, 1e-8)                 # inverse step
    zp = round(s * lo) + 2**(k - 1)             # signed offset
    q  = clip(round(s * x - zp), -2**(k-1), 2**(k-1) - 1)
    x̂  = (q + zp) / s

Because rounding is half-to-even, this is NOT the same as the commuted form
`round(s*x) - round(s*lo)`; see the known-value tests in tests/quant/test_numerics.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MIN_BITS = 2
MAX_BITS = 8
RANGE_MODES = ("bias_corrected", "ema", "minmax")
# How one batch of activations becomes a (min, max) range (DSG/ZeroQ PTQ `--act_q_method`).
OBSERVERS = ("minmax", "sample_mean", "percentile", "mse")


def check_bits(bits: int, what: str = "bits") -> int:
  """Returns `bits` if it is a supported bit-width (2..8), else raises ValueError."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(
      f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} "
      "(or leave the layer in full precision)."
    )
  return bits


def asym_fake_quant(x: jax.Array, bits: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Asymmetric uniform fake quantization with the GDFQ/ZeroQ op order (no STE).

  Args:
    x: any shape.
    bits: bit-width k (static Python int).
    lo, hi: range, broadcastable to `x` (per tensor: scalars; per channel: [C]).

  Returns:
    x̂ with the shape and dtype of `x`, on the grid Δ·(round(s·lo) + j), j = 0..2^k-1.
  """
  n = 2.0**bits - 1.0
  half = 2.0 ** (bits - 1)
  scale = n / jnp.maximum(hi - lo, 1e-8)
  zero_point = jnp.round(scale * lo) + half
  q = jnp.clip(jnp.round(scale * x - zero_point), -half, half - 1.0)
  return ((q + zero_point) / scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant_ste(x: jax.Array, bits: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """`asym_fake_quant` with the straight-through estimator of the original code.

  Backward: the incoming gradient passes to `x` unchanged (no clipping mask, also
  outside [lo, hi]); `lo` and `hi` get zero gradient.
  """
  return asym_fake_quant(x, bits, lo, hi)


def _ste_fwd(x, bits, lo, hi):
  return asym_fake_quant(x, bits, lo, hi), (lo, hi)


def _ste_bwd(bits, residuals, g):
  del bits
  lo, hi = residuals
  return g, jnp.zeros_like(lo), jnp.zeros_like(hi)


fake_quant_ste.defvjp(_ste_fwd, _ste_bwd)


def weight_range(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel (last axis) min and max of a kernel, without gradient.

  Args:
    w: kernel [..., C_out] (HWIO conv or [in, out] dense).
  Returns:
    (lo, hi), each of shape [C_out].
  """
  axes = tuple(range(w.ndim - 1))
  w = jax.lax.stop_gradient(w)
  return jnp.min(w, axis=axes), jnp.max(w, axis=axes)


WEIGHT_MODES = ("asymmetric", "symmetric")


def quantize_weight(w: jax.Array, bits: int, mode: str = "asymmetric") -> jax.Array:
  """Per-output-channel fake quantization of a kernel with STE (§2.3).

  mode='asymmetric' (the papers'): the channel's [min, max], 2^k levels. 'symmetric' (for
  integer engines, zero point exactly 0): q = clip(round(s w), -Q, Q), ŵ = q / s with
  Q = 2^(k-1) - 1 and s = Q / max |w| (2^k - 1 levels, as int8 kernels such as
  QLinearConv expect).
  """
  lo, hi = weight_range(w)
  if mode == "symmetric":
    return _symmetric_ste(w, bits, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
  if mode != "asymmetric":
    raise ValueError(f"weight mode {mode!r} is unknown: use one of {WEIGHT_MODES}.")
  return fake_quant_ste(w, bits, lo, hi)


def _symmetric_fake_quant(w: jax.Array, bits, m: jax.Array) -> jax.Array:
  """Symmetric per-channel fake quantization (zero point 0) with |w| <= m, no STE."""
  q_max = 2.0 ** (bits - 1) - 1.0
  scale = q_max / jnp.maximum(m, 1e-8)
  return (jnp.clip(jnp.round(scale * w), -q_max, q_max) / scale).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _symmetric_ste(w: jax.Array, bits: int, m: jax.Array) -> jax.Array:
  """`_symmetric_fake_quant` with a straight-through backward."""
  return _symmetric_fake_quant(w, bits, m)


_symmetric_ste.defvjp(
  lambda w, bits, m: (_symmetric_ste(w, bits, m), m),
  lambda bits, m, g: (g, jnp.zeros_like(m)),
)


def update_range(
  x_min: jax.Array,
  x_max: jax.Array,
  beta_t: jax.Array,
  batch_min: jax.Array,
  batch_max: jax.Array,
  *,
  mode: str = "bias_corrected",
  decay: float = 0.9,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One update of a per-tensor activation range.

  State (x_min, x_max, beta_t) starts at (0, 0, 1); `beta_t == 1` means "never updated".

  Modes:
    bias_corrected: the GDFQ-family rule (the original codes'), bias correction applied
      to the already corrected state (methods.md §2.3): beta_t <- beta_t*decay;
      x <- (decay*x + (1-decay)*m) / (1-beta_t). Overshoots early, equals a plain EMA
      after ~200 updates.
    ema: a plain EMA initialised with the first batch: x <- decay*x + (1-decay)*m.
    minmax: running min / max initialised with the first batch (ZeroQ calibration).

  Returns:
    The new (x_min, x_max, beta_t).
  """
  first = beta_t >= 1.0
  # The constants in float32, as the original's float32 `beta` buffer gives them:
  # 1 - float32(0.9) = 0.100000024, not 0.1.
  decay = jnp.asarray(decay, jnp.float32)
  batch_weight = jnp.float32(1.0) - decay
  new_beta_t = beta_t * decay
  if mode == "bias_corrected":
    corr = 1.0 - new_beta_t
    lo = (x_min * decay + batch_min * batch_weight) / corr
    hi = (x_max * decay + batch_max * batch_weight) / corr
  elif mode == "ema":
    lo = jnp.where(first, batch_min, x_min * decay + batch_min * batch_weight)
    hi = jnp.where(first, batch_max, x_max * decay + batch_max * batch_weight)
  elif mode == "minmax":
    lo = jnp.where(first, batch_min, jnp.minimum(x_min, batch_min))
    hi = jnp.where(first, batch_max, jnp.maximum(x_max, batch_max))
  else:
    raise ValueError(f"range mode {mode!r} is unknown: use one of {RANGE_MODES}.")
  return lo, hi, new_beta_t


def observe_range(
  x: jax.Array,
  *,
  observer: str = "minmax",
  bits: int = 8,
  percentile: float = 99.999,
  mse_steps: int = 80,
  mse_shrink: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
  """The (lo, hi) range one batch of activations `x` [B, ...] suggests (no gradient).

  Observers (DSG-PTQ / ZeroQ calibration, methods.md §4.1):
    minmax: min and max over the whole batch tensor (the GDFQ/ZeroQ rule).
    sample_mean: min and max of each sample, averaged over the batch (the DSG code's
      `--act_q_method ema`); outliers of single samples count 1/B.
    percentile: the (100 - p)-th and p-th percentiles of all values (p = `percentile`,
      99.999 in the DSG code).
    mse: lo = min; hi searched over max - k·shrink·(max - min), k = 0..mse_steps-1
      (80 steps of 1 % in the DSG code), minimising ‖x − fake_quant(x)‖₂ at `bits`.

  Returns:
    (lo, hi) float32 scalars.
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  if observer == "minmax":
    return jnp.min(x), jnp.max(x)
  if observer == "sample_mean":
    flat = x.reshape(x.shape[0], -1)
    return jnp.mean(jnp.min(flat, axis=1)), jnp.mean(jnp.max(flat, axis=1))
  if observer == "percentile":
    if not 50.0 < percentile <= 100.0:
      raise ValueError(f"percentile={percentile} must lie in (50, 100].")
    lo, hi = jnp.percentile(x, jnp.asarray([100.0 - percentile, percentile]))
    return lo, hi
  if observer == "mse":
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo

    def error(k):
      candidate = hi - k * mse_shrink * span
      return jnp.sum(jnp.square(x - asym_fake_quant(x, bits, lo, candidate)))

    errors = jax.lax.map(error, jnp.arange(mse_steps, dtype=jnp.float32))
    best = jnp.argmin(errors).astype(jnp.float32)  # first minimum: the widest best range
    return lo, hi - best * mse_shrink * span
  raise ValueError(f"observer {observer!r} is unknown: use one of {OBSERVERS}.")


def probe_fake_quant(x: jax.Array, bits: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """`asym_fake_quant` at a traced bit-width, forward only; bits >= 32 returns `x`.

  For the mixed-precision sensitivity (one compiled forward serves every bit-width); equal
  to `asym_fake_quant(x, int(bits), lo, hi)` for bits in 2..8.
  """
  bits = jnp.asarray(bits, jnp.float32)
  q = asym_fake_quant(x, jnp.minimum(bits, float(MAX_BITS)), lo, hi)
  return jnp.where(bits >= 32.0, x, q)


def probe_quantize_weight(w: jax.Array, bits: jax.Array, mode: str = "asymmetric") -> jax.Array:
  """`quantize_weight` at a traced bit-width, forward only; bits >= 32 returns `w`."""
  lo, hi = weight_range(w)
  bits = jnp.asarray(bits, jnp.float32)
  if mode == "symmetric":
    m = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    q = _symmetric_fake_quant(w, jnp.minimum(bits, float(MAX_BITS)), m)
    return jnp.where(bits >= 32.0, w, q)
  if mode != "asymmetric":
    raise ValueError(f"weight mode {mode!r} is unknown: use one of {WEIGHT_MODES}.")
  return probe_fake_quant(w, bits, lo, hi)
