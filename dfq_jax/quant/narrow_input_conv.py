"""A convolution with few input channels (a network's stem) whose input gradient is a GEMM.

The stem conv of an image network (7x7/2, 3 -> 64 channels in ResNet-18/50; 3x3 in the
CIFAR ResNets and MobileNetV2) reads the generator's images, so every generator step
differentiates the teacher and the student with respect to them, and the PTQ synthesis
differentiates the teacher with respect to its pixels. XLA:CPU computes that input
gradient, a transposed convolution with 3 output channels, at ~24 GFLOP/s (ResNet-18 at
batch 32: 317 ms against 76 ms for the forward; README, speed section). Here it is

  P  = dy @ W^T              [N, Ho, Wo, co] x [co, (kh, kw, ci)]: one GEMM
  dx[s·p + k − pad] += P[p, k]   for every tap k = (kh, kw): shifted adds, grouped by
                                 the tap's residue mod the stride (s² dense sums of
                                 shifted copies, then one interleave)

while the forward and the kernel gradient stay XLA's convolution. Same results as
`lax.conv_general_dilated` up to float rounding (tests/quant/test_narrow_input_conv.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Input channels up to which QConv uses this form (RGB images, grey, RGBA).
MAX_INPUT_CHANNELS = 4


def _accumulation(dtype) -> jnp.dtype | None:
  """float32 accumulation for a narrower compute dtype (bfloat16), else the input's."""
  return jnp.float32 if jnp.dtype(dtype) != jnp.float32 else None


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    strides,
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    preferred_element_type=_accumulation(x.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def narrow_input_conv(x: jax.Array, kernel: jax.Array, strides: tuple, padding: tuple):
  """[N, H, W, ci] * [kh, kw, ci, co] -> [N, Ho, Wo, co], NHWC/HWIO, explicit padding
  ((top, bottom), (left, right)); the input gradient as a GEMM plus shifted adds.

  x and kernel in float32, or both in bfloat16 (the `compute_dtype=bfloat16` policy): then
  the forward, the GEMM and the kernel gradient accumulate in float32 and the output is
  float32, like QConv's `preferred_element_type` path."""
  return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _input_grad(dy: jax.Array, kernel: jax.Array, strides, padding, in_hw) -> jax.Array:
  """dL/dx [N, H, W, ci] of the convolution, from dy [N, Ho, Wo, co]."""
  kh, kw, ci, _ = kernel.shape
  (sh, sw), ((top, _), (left, _)) = strides, padding
  n, ho, wo, _ = dy.shape
  dy = dy.astype(kernel.dtype)  # bf16 operands under the bf16 policy, f32 accumulation
  acc_dtype = _accumulation(kernel.dtype)
  # One GEMM: p [N, Ho, Wo, kh, kw, ci].
  p = jnp.einsum("nhwo,abio->nhwabi", dy, kernel, preferred_element_type=acc_dtype)
  rows, cols = -(-kh // sh), -(-kw // sw)  # taps per residue class
  mh, mw = ho - 1 + rows, wo - 1 + cols
  classes = []
  for r in range(sh):
    for t in range(sw):
      acc = jnp.zeros((n, mh, mw, ci), p.dtype)
      for a in range(rows):
        for b in range(cols):
          i, j = sh * a + r, sw * b + t
          if i < kh and j < kw:  # tap (i, j) lands at coarse (p + a, q + b) of class (r, t)
            tap = p[:, :, :, i, j, :]
            acc = acc + jnp.pad(tap, ((0, 0), (a, rows - 1 - a), (b, cols - 1 - b), (0, 0)))
      classes.append(acc)
  fine = jnp.stack(classes, axis=0).reshape(sh, sw, n, mh, mw, ci)
  fine = jnp.transpose(fine, (2, 3, 0, 4, 1, 5)).reshape(n, mh * sh, mw * sw, ci)
  h, w = in_hw
  need_h, need_w = max(0, top + h - mh * sh), max(0, left + w - mw * sw)
  fine = jnp.pad(fine, ((0, 0), (0, need_h), (0, need_w), (0, 0)))
  return fine[:, top : top + h, left : left + w, :]


def _bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = _input_grad(dy, kernel, strides, padding, x.shape[1:3]).astype(x.dtype)
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
  return dx, kernel_vjp(dy)[0]


narrow_input_conv.defvjp(_fwd, _bwd)
