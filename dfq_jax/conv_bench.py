r"""Convolution kernels on this host: XLA's convolution in float32 and bfloat16 against an
im2col + bfloat16 dot formulation (bench convs).

  python -m dfq_jax.bench convs [--steps 20]

Times forward + both gradients (input and kernel) of one 3x3 convolution, 'same' padding,
for the convolution shapes of CIFAR ResNet-20 (batch 16 and 200) and ImageNet ResNet-18
(batch 16), one JSON line per shape: ms and GFLOP/s of each variant and the bfloat16
variants' largest error relative to float32. The variants:

  lax_f32      jax.lax.conv_general_dilated in float32 (the default compute_dtype)
  lax_bf16     the same with bfloat16 operands and float32 accumulation
               (compute_dtype=bfloat16, quant/layers.QConv)
  im2col_bf16  patches [N, Ho, Wo, 9C] in bfloat16 times the kernel [9C, F] as one dot
               with float32 accumulation, its backward written as the two dots
               (dK = P^T dY, dP = dY K^T) and the patches' transpose (col2im) in float32

The question it answers (speed issue): does a dot formulation reach the bfloat16 matmul
speed (AMX) that XLA's bfloat16 convolutions do not? Results in the README.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax import xla_options

# (network, batch, spatial size, in channels, out channels): the 3x3 stride-1 convs.
SHAPES = (
  ("resnet20", 16, 32, 16, 16),
  ("resnet20", 16, 16, 32, 32),
  ("resnet20", 16, 8, 64, 64),
  ("resnet20", 200, 32, 16, 16),
  ("resnet20", 200, 16, 32, 32),
  ("resnet20", 200, 8, 64, 64),
  ("resnet18", 16, 56, 64, 64),
  ("resnet18", 16, 28, 128, 128),
  ("resnet18", 16, 14, 256, 256),
  ("resnet18", 16, 7, 512, 512),
)
VARIANTS = ("lax_f32", "lax_bf16", "im2col_bf16")


def conv_lax(x: jax.Array, kernel: jax.Array, stride: int, dtype) -> jax.Array:
  """[N, H, W, C] * [3, 3, C, F] -> [N, Ho, Wo, F] float32, operands in `dtype`."""
  low = jnp.dtype(dtype) != jnp.float32
  y = jax.lax.conv_general_dilated(
    x.astype(dtype),
    kernel.astype(dtype),
    (stride, stride),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    preferred_element_type=jnp.float32 if low else None,
  )
  return y.astype(jnp.float32)


def patches(x: jax.Array, stride: int) -> jax.Array:
  """[N, H, W, C] -> [N, Ho, Wo, 9C]: the 3x3 windows of the zero-padded input, taps
  (i, j) outer and channels inner, the order of an HWIO kernel reshaped to [9C, F]."""
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  taps = [
    padded[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
    for i in range(3)
    for j in range(3)
  ]
  return jnp.concatenate(taps, axis=-1)


def _dot_last(a: jax.Array, b: jax.Array, b_axis: int) -> jax.Array:
  return jax.lax.dot_general(
    a, b, (((a.ndim - 1,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_im2col_bf16(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """The 3x3 'same' convolution as im2col + one bfloat16 dot (float32 accumulation)."""
  return _im2col_fwd(x, kernel, stride)[0]


def _im2col_fwd(x, kernel, stride):
  p = patches(x.astype(jnp.bfloat16), stride)
  k = kernel.astype(jnp.bfloat16).reshape(-1, kernel.shape[-1])
  return _dot_last(p, k, 0), (x, p, kernel)


def _im2col_bwd(stride, residuals, dy):
  x, p, kernel = residuals
  dy16 = dy.astype(jnp.bfloat16)
  dk = jax.lax.dot_general(
    p, dy16, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32
  )
  dp = _dot_last(dy16, kernel.astype(jnp.bfloat16).reshape(-1, kernel.shape[-1]), 1)
  _, col2im = jax.vjp(lambda v: patches(v, stride), x)
  return col2im(dp)[0], dk.reshape(kernel.shape)


conv_im2col_bf16.defvjp(_im2col_fwd, _im2col_bwd)


def variant(name: str):
  """(x, kernel, stride) -> y float32 of one of VARIANTS."""
  if name == "lax_f32":
    return lambda x, k, s: conv_lax(x, k, s, jnp.float32)
  if name == "lax_bf16":
    return lambda x, k, s: conv_lax(x, k, s, jnp.bfloat16)
  if name == "im2col_bf16":
    return conv_im2col_bf16
  raise ValueError(f"unknown convolution variant {name!r}: use one of {VARIANTS}.")


def fwd_bwd(name: str, stride: int = 1):
  """The jitted (x, kernel) -> (dL/dx, dL/dkernel) of L = Σ conv(x, kernel)² / 2."""
  conv = variant(name)
  loss = lambda x, k: 0.5 * jnp.sum(conv(x, k, stride) ** 2)  # noqa: E731
  options = xla_options.compiler_options("eigen")
  return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)


def _median_s(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_shape(network: str, batch: int, size: int, cin: int, cout: int, steps: int) -> dict:
  """One row: per variant the median ms of `steps` forward+backward passes and GFLOP/s
  (3 x the forward's 2·N·H·W·9·C·F), and each bfloat16 variant's largest output error
  relative to float32's largest output."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
  flops = 3 * 2 * batch * size * size * 9 * cin * cout
  row = {"network": network, "batch": batch, "shape": f"{size}x{size}x{cin}->{cout}"}
  reference = conv_lax(x, k, 1, jnp.float32)
  for name in VARIANTS:
    seconds = _median_s(fwd_bwd(name), (x, k), steps)
    row[f"{name}_ms"] = round(seconds * 1e3, 3)
    row[f"{name}_gflops"] = float(f"{flops / seconds / 1e9:.3g}")  # 3 significant digits
    if name != "lax_f32":
      err = jnp.max(jnp.abs(variant(name)(x, k, 1) - reference)) / jnp.max(jnp.abs(reference))
      row[f"{name}_rel_err"] = float(err)
  return row


def conv_table(steps: int = 20, shapes=SHAPES) -> list[dict]:
  """time_shape of every shape."""
  return [time_shape(*shape, steps=steps) for shape in shapes]
