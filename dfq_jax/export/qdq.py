"""The student's quantizers as ONNX QuantizeLinear / DequantizeLinear parameters.

dfq_jax's asymmetric fake quantization (methods.md §2.3) with range [lo, hi] and k bits is
    s = (2^k - 1) / (hi - lo),  zp = round(s * lo) + 2^(k-1)
    q = clip(round(s * x) - zp, -2^(k-1), 2^(k-1) - 1),  x̂ = (q + zp) / s
(round(s x - zp) = round(s x) - zp since zp is an integer). That is ONNX's
    y = saturate(round(x / Δ) + z),  x̂ = (y - z) * Δ   with Δ = 1/s, z = -zp,
stored in a signed k-bit range inside an int8 container: an explicit Clip to the k-bit
range precedes QuantizeLinear for k < 8 (int8 saturation is the clip for k = 8). The
remaining difference to dfq_jax's own evaluation is x / Δ vs s * x in float32 (a rounding
tie can fall the other way) and Δ rounded to float32.
"""

from __future__ import annotations

import numpy as np

INT8_MIN, INT8_MAX = -128, 127


def affine_params(lo, hi, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """(Δ float32, z int) of the k-bit quantizer with range [lo, hi] (per tensor or channel)."""
  lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
  n = np.float32(2.0**bits - 1.0)
  scale = n / np.maximum(hi - lo, np.float32(1e-8))
  zp = np.round(scale * lo) + np.float32(2.0 ** (bits - 1))
  return (np.float32(1.0) / scale).astype(np.float32), (-zp).astype(np.int64)


def unsigned_params(lo, hi, bits: int) -> tuple[np.float32, int]:
  """(Δ, z) of the same k-bit quantizer on the unsigned grid u = q + 2^(k-1) in [0, 2^k - 1]
  (uint8 storage): z = -round(s lo), in [0, 2^k - 1] when lo <= 0 <= hi."""
  delta, z = affine_params(lo, hi, bits)
  z = int(np.asarray(z).reshape(())) + 2 ** (bits - 1)
  if not 0 <= z <= 2**bits - 1:
    raise ValueError(f"range [{float(lo)}, {float(hi)}] excludes 0: no uint8 zero point.")
  return np.float32(np.asarray(delta).reshape(())), z


def check_zero_point(z: np.ndarray, what: str) -> np.ndarray:
  """z as int8; raises ValueError naming `what` when a range cannot be stored so."""
  if z.min() < INT8_MIN or z.max() > INT8_MAX:
    raise ValueError(
      f"{what}: its quantization range does not contain 0 (zero point {int(z.min())}.."
      f"{int(z.max())} outside int8), so it cannot be stored as int8 QDQ."
    )
  return z.astype(np.int8)


INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


INT4_MIN, INT4_MAX = -8, 7


def weight_storage(
  q: np.ndarray, z: np.ndarray, what: str, bits: int = 8
) -> tuple[np.ndarray, np.ndarray, str]:
  """(q, z, storage): 'int4' (ONNX INT4, two weights a byte) for bits <= 4 when the zero
  points fit, else 'int8', or 'int16' when some channel's range excludes 0 (its zero point
  is outside int8: e.g. a depthwise 3x3 kernel whose 9 weights share a sign). The
  dequantized values are the same in each; q and z come back as int8/int16 arrays."""
  fits = lambda lo, hi: z.min() >= lo and z.max() <= hi
  if bits <= 4 and fits(INT4_MIN, INT4_MAX):
    return q.astype(np.int8), z.astype(np.int8), "int4"
  if fits(INT8_MIN, INT8_MAX):
    return q.astype(np.int8), z.astype(np.int8), "int8"
  if fits(INT16_MIN, INT16_MAX):
    return q.astype(np.int16), z.astype(np.int16), "int16"
  raise ValueError(
    f"{what}: its zero point {int(z.min())}..{int(z.max())} does not fit int16 (a range far "
    "from 0), so it cannot be stored as QDQ."
  )


def quantized_weight(
  kernel: np.ndarray, bits: int, mode: str = "asymmetric"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-output-channel (last axis) integer weights y (int8, in the signed k-bit range),
  Δ [C] and z [C] such that (y - z) * Δ is dfq_jax's fake-quantized kernel
  (`numerics.quantize_weight` with the same `mode`; 'symmetric' gives z = 0)."""
  axes = tuple(range(kernel.ndim - 1))
  lo, hi = kernel.min(axis=axes), kernel.max(axis=axes)
  if mode == "symmetric":  # as numerics._symmetric_ste: zero point 0, levels -Q..Q
    q_max = np.float32(2.0 ** (bits - 1) - 1.0)
    scale = q_max / np.maximum(np.maximum(np.abs(lo), np.abs(hi)), np.float32(1e-8))
    scale = scale.astype(np.float32)
    q = np.clip(np.round(scale * kernel), -q_max, q_max)
    return (
      q.astype(np.int8),
      (np.float32(1.0) / scale).astype(np.float32),
      np.zeros(kernel.shape[-1], np.int64),
    )
  delta, z = affine_params(lo, hi, bits)
  scale = (np.float32(2.0**bits - 1.0) / np.maximum(hi - lo, np.float32(1e-8))).astype(np.float32)
  half = 2.0 ** (bits - 1)
  q = np.clip(np.round(scale * kernel + z.astype(np.float32)), -half, half - 1)  # as numerics
  return q.astype(np.int8), delta, z
