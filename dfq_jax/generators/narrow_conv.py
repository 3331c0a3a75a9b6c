"""Exact GEMM form of a 3x3 'same' conv with few output channels (the generators' image conv).

The last generator conv maps 64 channels to the 3 image channels at full resolution. For
so few outputs XLA:CPU's convolution kernels are slow, its weight gradient above all
(README, speed section). Written with the nine
kernel taps as GEMM columns, every pass is one skinny GEMM over all pixels plus cheap
shifted adds on tensors of 9*cout channels:

  forward:  P = x @ Wm,  Wm [cin, (kh,kw,co)]           (all taps at every pixel)
            y[i, j] = sum_{kh,kw} P[i+kh-1, j+kw-1, (kh,kw)]   (zero outside the image)
  backward: C[p, q, (kh,kw,co)] = dy[p-kh+1, q-kw+1, co]  (9 shifted copies of dy)
            dx = C @ Wm^T,   dWm = x^T @ C,   dbias = sum(dy).

Same results as `lax.conv` up to float rounding (tests/test_narrow_conv.py); measured by
`python -m dfq_jax.generators.bench_subpixel` (the whole generator) and the README's
speed section. The tensors P and C have 9*cout channels, so this form is only worth it
for narrow outputs (cout << cin); the generators use it for the image conv only.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dfq_jax.generators.subpixel import (
  UpConv,
  accumulation_dtype,
  apply_conv3x3,
  cast_to,
  sum_over_extra_device_axes,
)


def _tap_matrix(kernel: jax.Array) -> jax.Array:
  """[3, 3, ci, co] HWIO kernel -> [ci, (kh, kw, co)]."""
  ci = kernel.shape[2]
  return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(ci, -1)


def _sum_shifted_taps(p: jax.Array, h: int, w: int) -> jax.Array:
  """p [B, H, W, 3, 3, co] -> y [B, H, W, co], y[i, j] = sum p[i+kh-1, j+kw-1, kh, kw]."""
  pp = jnp.pad(p, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(pp[:, kh : kh + h, kw : kw + w, kh, kw] for kh in range(3) for kw in range(3))


def _shifted_copies(dy: jax.Array) -> jax.Array:
  """dy [B, H, W, co] -> C [B, H, W, (kh, kw, co)], C[p, q, kh, kw] = dy[p-kh+1, q-kw+1]."""
  _, h, w, _ = dy.shape
  dyp = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate(
    [dyp[:, 2 - kh : 2 - kh + h, 2 - kw : 2 - kw + w] for kh in range(3) for kw in range(3)],
    axis=-1,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_conv(x: jax.Array, kernel: jax.Array, compute_dtype) -> jax.Array:
  y, _ = _narrow_conv_fwd(x, kernel, compute_dtype)
  return y


def _narrow_conv_fwd(x, kernel, compute_dtype):
  b, h, w, ci = x.shape
  co = kernel.shape[-1]
  acc = accumulation_dtype(x, kernel)
  wm = cast_to(_tap_matrix(kernel.astype(acc)), compute_dtype)
  p = jnp.einsum("bhwc,cn->bhwn", cast_to(x, compute_dtype), wm, preferred_element_type=acc)
  y = _sum_shifted_taps(p.reshape(b, h, w, 3, 3, co), h, w)
  return y.astype(jnp.promote_types(x.dtype, kernel.dtype)), (x, kernel)


def _narrow_conv_bwd(compute_dtype, res, dy):
  x, kernel = res
  ci, co = kernel.shape[2], kernel.shape[3]
  acc = accumulation_dtype(x, kernel)
  c = _shifted_copies(cast_to(dy, compute_dtype))  # [B, H, W, 9co]
  wm = cast_to(_tap_matrix(kernel.astype(acc)), compute_dtype)  # [ci, 9co]
  dx = jnp.einsum("bhwn,cn->bhwc", c, wm, preferred_element_type=acc)
  # As C^T x (not x^T C): XLA then transposes the narrow C, not the wide x (faster).
  dwm_t = jnp.einsum("bhwn,bhwc->nc", c, cast_to(x, compute_dtype), preferred_element_type=acc)
  dkernel = jnp.transpose(dwm_t.reshape(3, 3, co, ci), (0, 1, 3, 2))
  dkernel = sum_over_extra_device_axes(dkernel, kernel)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_narrow_conv.defvjp(_narrow_conv_fwd, _narrow_conv_bwd)


def conv3x3_narrow(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, compute_dtype: Any = None
) -> jax.Array:
  """`conv3x3(x, kernel) + bias` (stride 1, zero padding 1) in tap-GEMM form.

  Args:
    x: [B, H, W, Cin] NHWC activations.
    kernel: [3, 3, Cin, Cout] HWIO kernel; meant for small Cout (the 3 image channels).
    bias: optional [Cout].
    compute_dtype: optional GEMM input dtype (e.g. jnp.bfloat16); accumulation and the
      result in float32 (or wider). None = the inputs' dtype.
  Returns:
    [B, H, W, Cout]. Differentiable in x, kernel and bias (custom VJP; module doc).
  """
  return apply_conv3x3(_narrow_conv, "conv3x3_narrow", x, kernel, bias, compute_dtype)


class NarrowConv(UpConv):
  """3x3 'same' conv with bias in tap-GEMM form; QConv's parameters ('kernel', 'bias').

  Creates exactly the parameters of `QConv(features, (3, 3), use_bias=True)` (same names,
  shapes, PyTorch-default initialisers and order), so it replaces it under the same name
  without changing the parameter tree. (Fields and parameters as `UpConv`, without the
  upsampling.)
  """

  conv = staticmethod(conv3x3_narrow)
