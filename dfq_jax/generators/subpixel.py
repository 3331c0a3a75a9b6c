"""Exact sub-pixel form of `conv3x3(nearest_upsample_2x(x))` with a fast custom backward.

The GDFQ generators upsample x2 (nearest) and then apply a 3x3, stride-1, pad-1 conv.
Every output pixel of that pair depends on at most 2x2 source pixels, so it equals ONE
2x2 convolution on the low-resolution input (padded by 1) with 4*cout output channels
(one group per output phase), followed by a depth-to-space interleave.

Derivation (rows; columns are the same). Output row 2i+a, a in {0, 1}, reads upsampled
rows 2i+a-1, 2i+a, 2i+a+1, i.e. source rows
  a=0: i-1 (kernel row w[0]) and i (w[1] + w[2]);
  a=1: i (w[0] + w[1]) and i+1 (w[2]).
With xp = x padded by 1 (xp[r] = x[r-1], zeros outside, which is exactly the zero padding
of the upsampled image), a 2x2 VALID conv Z[t] = xp[t] W2[0] + xp[t+1] W2[1] has H+1 rows,
and output phase a at row i is Z[i+a] with the phase-a taps above. W2 [2,2,cin,2,2,cout]
is a fixed 0/1 linear map of the 3x3 kernel; its gradient maps back by the transpose.
Backward, with dZ = the output cotangent de-interleaved into Z's layout (each phase zero-
padded by one row/column on the side it does not reach):
  dx[r] = sum_k dZ[r+1-k] W2[k]^T      (2x2 VALID conv of dZ, flipped kernel; no padding),
  dW2[k] = sum_t xp[t+k]^T dZ[t]       (2x2 correlation of xp with dZ, batch <-> feature),
  dkernel = transpose(fold)(dW2),  dbias = sum(dy).
All three are plain `lax.conv`s at low resolution with 4*cout channels.

Why: the sub-pixel form has 4/9 x (H+1)(W+1)/(HW) of the multiply-adds of the original,
and at low resolution with wide channels every conv runs near the machine's peak. On CPU
compile with `dfq_jax.xla_options.compiler_options()` (the training step does): XLA's
default YNNPACK kernels are slower than its Eigen ones on the two backward convs.
The backward is written out (`jax.custom_vjp`) so that it stays these three convs and the
kernel-fold transpose (plain convs, not im2col GEMMs). `bench_subpixel.py` measures it;
the numbers are in the README's speed section.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax.quant.layers import torch_bias_init, torch_kernel_init


def _fold_taps(w: jax.Array, axis: int) -> jax.Array:
  """Folds a length-3 kernel axis into (tap k, phase a) = two new axes at `axis`."""
  w0, w1, w2 = (jnp.take(w, i, axis=axis) for i in range(3))
  tap0 = jnp.stack([w0, w0 + w1], axis=axis)  # phase 0, phase 1
  tap1 = jnp.stack([w1 + w2, w2], axis=axis)
  return jnp.stack([tap0, tap1], axis=axis)


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """3x3 HWIO kernel [3,3,ci,co] -> 2x2 sub-pixel kernel as a matrix [(kh,kw,ci), (a,b,co)].

  Row (kh, kw, ci) multiplies tap (kh, kw) of the padded input; column (a, b, co) is
  output phase (a, b) (output pixel (2i+a, 2j+b)).
  """
  ci, co = kernel.shape[2], kernel.shape[3]
  w = _fold_taps(kernel, 0)  # [kh, a, 3, ci, co]
  w = _fold_taps(w, 2)  # [kh, a, kw, b, ci, co]
  w = jnp.transpose(w, (0, 2, 4, 1, 3, 5))  # [kh, kw, ci, a, b, co]
  return w.reshape(4 * ci, 4 * co)


def _unfold_taps(d: jax.Array, axis: int) -> jax.Array:
  """Transpose of `_fold_taps`: (tap k, phase a) axes at `axis`, `axis`+1 -> length 3."""
  t0 = jnp.take(d, 0, axis=axis)  # tap 0: [phase 0 -> w0, phase 1 -> w0 + w1]
  t1 = jnp.take(d, 1, axis=axis)  # tap 1: [phase 0 -> w1 + w2, phase 1 -> w2]
  p = lambda t, a: jnp.take(t, a, axis=axis)
  return jnp.stack([p(t0, 0) + p(t0, 1), p(t0, 1) + p(t1, 0), p(t1, 0) + p(t1, 1)], axis=axis)


def kernel_grad_from_subpixel(dw2: jax.Array, ci: int, co: int) -> jax.Array:
  """Transpose of `subpixel_kernel`: [(kh,kw,ci), (a,b,co)] cotangent -> [3,3,ci,co].

  Written out (not `jax.linear_transpose`, whose cotangent type check rejects the
  device-varying values inside `jax.shard_map`).
  """
  d = dw2.reshape(2, 2, ci, 2, 2, co)  # [kh, kw, ci, a, b, co]
  d = jnp.transpose(d, (0, 3, 1, 4, 2, 5))  # [kh, a, kw, b, ci, co]
  d = _unfold_taps(d, 2)  # [kh, a, 3, ci, co]
  return _unfold_taps(d, 0)  # [3, 3, ci, co]


def _interleave(z: jax.Array, h: int, w: int, co: int) -> jax.Array:
  """Z [B, H+1, W+1, (a,b,co)] -> y [B, 2H, 2W, co] with y[2i+a, 2j+b] = Z[i+a, j+b, (a,b)]."""
  z = z.reshape(z.shape[0], h + 1, w + 1, 2, 2, co)
  rows = [jnp.stack([z[:, a : a + h, b : b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(z.shape[0], 2 * h, 2 * w, co)


def _deinterleave(dy: jax.Array, h: int, w: int, co: int) -> jax.Array:
  """Transpose of `_interleave`: dy [B, 2H, 2W, co] -> dZ [B, H+1, W+1, (a,b,co)]."""
  d = dy.reshape(dy.shape[0], h, 2, w, 2, co)
  return jnp.concatenate(
    [
      jnp.pad(d[:, :, a, :, b], ((0, 0), (a, 1 - a), (b, 1 - b), (0, 0)))
      for a in (0, 1)
      for b in (0, 1)
    ],
    axis=-1,
  )


def _pad1(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def cast_to(a: jax.Array, dtype) -> jax.Array:
  """`a` in `dtype`; unchanged if dtype is None."""
  return a if dtype is None else a.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _upconv(x: jax.Array, kernel: jax.Array, compute_dtype) -> jax.Array:
  y, _ = _upconv_fwd(x, kernel, compute_dtype)
  return y


def accumulation_dtype(x, kernel):
  """The dtype products are accumulated in: the inputs' type, at least float32."""
  return jnp.promote_types(jnp.promote_types(x.dtype, kernel.dtype), jnp.float32)


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_kernel(kernel: jax.Array, acc, compute_dtype) -> jax.Array:
  """The 2x2 sub-pixel kernel as a conv kernel [2, 2, ci, 4co] (HWIO)."""
  ci, co = kernel.shape[2], kernel.shape[3]
  return cast_to(subpixel_kernel(kernel.astype(acc)), compute_dtype).reshape(2, 2, ci, 4 * co)


def _upconv_fwd(x, kernel, compute_dtype):
  _, h, w, _ = x.shape
  co = kernel.shape[-1]
  acc = accumulation_dtype(x, kernel)
  z = jax.lax.conv_general_dilated(
    _pad1(cast_to(x, compute_dtype)),
    _conv_kernel(kernel, acc, compute_dtype),
    (1, 1),
    "VALID",
    dimension_numbers=_DN,
    preferred_element_type=acc,
  )
  y = _interleave(z, h, w, co).astype(jnp.promote_types(x.dtype, kernel.dtype))
  return y, (x, kernel)


def _upconv_bwd(compute_dtype, res, dy):
  x, kernel = res
  _, h, w, ci = x.shape
  co = kernel.shape[-1]
  acc = accumulation_dtype(x, kernel)
  dz = _deinterleave(cast_to(dy, compute_dtype), h, w, co)  # [B, H+1, W+1, 4co]
  w2 = _conv_kernel(kernel, acc, compute_dtype)  # [2, 2, ci, 4co]
  # Input gradient: 2x2 VALID conv of dZ with the flipped, transposed kernel.
  w2t = jnp.transpose(w2[::-1, ::-1], (0, 1, 3, 2))  # [2, 2, 4co, ci]
  dx = jax.lax.conv_general_dilated(
    dz, w2t, (1, 1), "VALID", dimension_numbers=_DN, preferred_element_type=acc
  )
  # Kernel gradient: correlation of xp with dZ over batch and space (batch <-> feature
  # swapped), mapped back through the fold.
  dw2 = jax.lax.conv_general_dilated(
    _pad1(cast_to(x, compute_dtype)),
    dz,
    (1, 1),
    "VALID",
    dimension_numbers=("CHWN", "IHWO", "HWNC"),
    preferred_element_type=acc,
  )  # [2, 2, ci, 4co]
  dkernel = kernel_grad_from_subpixel(dw2.reshape(4 * ci, 4 * co), ci, co)
  dkernel = sum_over_extra_device_axes(dkernel, kernel)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _varying_axes(a: jax.Array) -> frozenset:
  manual = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", ()) or ())


def sum_over_extra_device_axes(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Inside `jax.shard_map`: the gradient of a replicated input is the sum over devices.

  JAX's own autodiff inserts this psum; a custom backward must do it itself, or the
  cotangent would vary over devices where its primal does not.
  """
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


_upconv.defvjp(_upconv_fwd, _upconv_bwd)


def upsample2x_conv3x3(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, compute_dtype: Any = None
) -> jax.Array:
  """`conv3x3_pad1(upsample_nearest_2x(x), kernel) + bias`, computed in sub-pixel form.

  Args:
    x: [B, H, W, Cin] NHWC activations, any B, H, W >= 1.
    kernel: [3, 3, Cin, Cout] HWIO kernel (stride 1, symmetric zero padding 1).
    bias: optional [Cout].
    compute_dtype: optional dtype of the GEMM inputs (e.g. jnp.bfloat16); products are
      accumulated and returned in float32 (or wider). None = the inputs' dtype.
  Returns:
    [B, 2H, 2W, Cout]. Differentiable in x, kernel and bias (custom VJP; see module doc).
  """
  return apply_conv3x3(_upconv, "upsample2x_conv3x3", x, kernel, bias, compute_dtype)


def apply_conv3x3(custom_conv, name: str, x, kernel, bias, compute_dtype):
  """Checks shapes, calls `custom_conv(x, kernel, compute_dtype)`, adds the bias."""
  if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]):
    raise ValueError(
      f"{name} wants x [B,H,W,C] and kernel [3,3,C,Cout]; got {x.shape} and {kernel.shape}."
    )
  compute_dtype = None if compute_dtype is None else np.dtype(compute_dtype)
  y = custom_conv(x, kernel, compute_dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


class UpConv(nn.Module):
  """Nearest x2 upsampling + 3x3 conv (bias) in sub-pixel form.

  Creates exactly QConv's parameters ('kernel' [3,3,cin,features], 'bias' [features],
  same PyTorch-default initialisers and order), so it can replace `QConv` after
  `upsample_nearest_2x` under the same name without changing the parameter tree.
  """

  features: int
  dtype: Any = None  # compute dtype of the conv inputs (None = float32)
  conv = staticmethod(upsample2x_conv3x3)  # a class attribute, not a module field

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch = x.shape[-1]
    kernel = self.param("kernel", torch_kernel_init, (3, 3, in_ch, self.features))
    bias = self.param("bias", torch_bias_init(9 * in_ch), (self.features,))
    return self.conv(x, kernel, bias, compute_dtype=self.dtype).astype(x.dtype)
