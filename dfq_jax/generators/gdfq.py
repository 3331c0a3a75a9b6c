"""The GDFQ conditional generators (Xu et al., ECCV 2020; methods.md §2.2).

Shared by GDFQ, DSG-QAT and AdaDFQ. The generator is always in train mode: every BN
normalises with the statistics of the current batch (the original code's running
statistics are never read, so they are not kept).

CIFAR form (`GeneratorCifar`), latent d, image S, init size S/4:
  h = Embed(y) * z -> Linear(d, 128*(S/4)^2) -> BN(128)
  -> up x2 -> Conv3x3(128,128) -> BN(128, eps=0.8) -> LeakyReLU(0.2)
  -> up x2 -> Conv3x3(128,64) -> BN(64, eps=0.8) -> LeakyReLU(0.2)
  -> Conv3x3(64, C) -> tanh -> BN(C, affine=False)
ImageNet form (`GeneratorImagenet`): no label embedding on z; the BNs are class-
conditional (CCBN: affine-free BN, then per-class scale/shift from embeddings).

By default (`conv_impl='subpixel'`) the convolutions run in exact rewritten forms with
hand-written backwards: the two upsample+conv pairs as one 2x2 conv at low resolution
(`subpixel.py`), the image conv (64 -> 3 channels) as a tap GEMM (`narrow_conv.py`).
Measured against the standard path by `python -m dfq_jax.generators.bench_subpixel`
(numbers in the README's speed section).
`conv_impl='standard'` upsamples and calls `lax.conv`. Both create the same parameters
('conv1'/'conv2'/'conv3': 'kernel' [3,3,cin,cout], 'bias') and the same outputs.

The eps=0.8 reproduces the original code, where 0.8 was passed positionally to
BatchNorm2d's eps (`bn_eps` attribute; 1e-5 is the intended value).
Initialisation follows PyTorch defaults (conv/linear U(±1/sqrt(fan_in)), embeddings
N(0, 1)). Output: NHWC images, each channel standardised over the batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.generators.narrow_conv import NarrowConv
from dfq_jax.generators.subpixel import UpConv
from dfq_jax.models.layers import BatchNorm
from dfq_jax.quant.layers import QConv, QDense

CONV_IMPLS = ("subpixel", "standard")


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of NHWC images."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(
      f"generator conv_impl {conv_impl!r} is unknown: choose one of {list(CONV_IMPLS)}."
    )


def _upsample_conv(h: jax.Array, features: int, conv_impl: str, dtype: Any, name: str) -> jax.Array:
  """Nearest x2 upsampling, then 3x3 conv with bias (params `name`/kernel, `name`/bias).

  Call only inside a compact method: the conv becomes a submodule of the caller.
  """
  if conv_impl == "subpixel":
    return UpConv(features, dtype=dtype, name=name)(h)
  return QConv(features, (3, 3), use_bias=True, dtype=dtype, name=name)(upsample_nearest_2x(h))


def _image_conv(h: jax.Array, channels: int, conv_impl: str, dtype: Any) -> jax.Array:
  """The last 3x3 conv to the image channels (params 'conv3'/kernel, 'conv3'/bias)."""
  if conv_impl == "subpixel":
    return NarrowConv(channels, dtype=dtype, name="conv3")(h)
  return QConv(channels, (3, 3), use_bias=True, dtype=dtype, name="conv3")(h)


class CondBatchNorm(nn.Module):
  """Categorical conditional BN: affine-free BN, then scale[y] and shift[y]."""

  num_classes: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = BatchNorm(
      use_running_average=False,
      epsilon=self.epsilon,
      use_scale=False,
      use_bias=False,
      track_running_stats=False,
      name="bn",
    )(x)
    scale = nn.Embed(self.num_classes, channels, embedding_init=nn.initializers.ones, name="scale")(
      labels
    )
    shift = nn.Embed(
      self.num_classes, channels, embedding_init=nn.initializers.zeros, name="shift"
    )(labels)
    return x * scale[:, None, None, :] + shift[:, None, None, :]


def _decode(gen, h, norm):
  """The body both generators share, from the first feature map [B, S/4, S/4, width]:
  norm -> up x2 + conv1 -> norm -> LeakyReLU -> up x2 + conv2 -> norm -> LeakyReLU -> conv3
  -> tanh -> affine-free BN. `norm(eps, name)` gives the inner normalisation layer (BN, or
  class-conditional BN); the first one uses eps 1e-5, the two inner ones `gen.bn_eps`."""
  h = norm(1e-5, "bn0")(h)
  h = _upsample_conv(h, gen.width, gen.conv_impl, gen.dtype, "conv1")
  h = nn.leaky_relu(norm(gen.bn_eps, "bn1")(h), 0.2)
  h = _upsample_conv(h, gen.width // 2, gen.conv_impl, gen.dtype, "conv2")
  h = nn.leaky_relu(norm(gen.bn_eps, "bn2")(h), 0.2)
  h = jnp.tanh(_image_conv(h, gen.channels, gen.conv_impl, gen.dtype))
  out_bn = BatchNorm(
    use_running_average=False,
    use_scale=False,
    use_bias=False,
    track_running_stats=False,
    name="bn_out",
  )
  return out_bn(h)


class GeneratorCifar(nn.Module):
  """Label-conditional DCGAN-style generator for small images (CIFAR, digits).

  Attributes:
    num_classes: label count.
    image_size: output side S (divisible by 4).
    channels: output channels.
    latent_dim: z dimension (100 in GDFQ/DSG/AdaDFQ).
    width: channels of the first feature map (128).
    bn_eps: eps of the two inner BNs (0.8 = original code).
    dtype: compute dtype of the convolutions (None = float32).
    conv_impl: 'subpixel' (default, fast exact GEMM forms) | 'standard' (lax.conv) for
      the three convs; same parameters and outputs.
  """

  num_classes: int = 10
  image_size: int = 32
  channels: int = 3
  latent_dim: int = 100
  width: int = 128
  bn_eps: float = 0.8
  dtype: Any = None
  conv_impl: str = "subpixel"

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
    """Args: z [B, latent_dim], labels [B] int. Returns images [B, S, S, channels]."""
    if self.image_size % 4:
      raise ValueError(f"generator image_size must be divisible by 4; got {self.image_size}.")
    _check_conv_impl(self.conv_impl)
    s0 = self.image_size // 4
    emb = nn.Embed(
      self.num_classes,
      self.latent_dim,
      embedding_init=nn.initializers.normal(1.0),
      name="label_emb",
    )(labels)
    h = QDense(self.width * s0 * s0, dtype=self.dtype, name="l1")(emb * z)
    h = h.reshape(z.shape[0], s0, s0, self.width)

    def norm(eps, name):
      return BatchNorm(use_running_average=False, epsilon=eps, track_running_stats=False, name=name)

    return _decode(self, h, norm)


class GeneratorImagenet(nn.Module):
  """GDFQ's ImageNet generator (224x224) with class-conditional BN (1000 classes).

  Attributes as `GeneratorCifar`.
  """

  num_classes: int = 1000
  image_size: int = 224
  channels: int = 3
  latent_dim: int = 100
  width: int = 128
  bn_eps: float = 0.8
  dtype: Any = None
  conv_impl: str = "subpixel"

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
    """Args: z [B, latent_dim], labels [B] int. Returns images [B, S, S, channels]."""
    if self.image_size % 4:
      raise ValueError(f"generator image_size must be divisible by 4; got {self.image_size}.")
    _check_conv_impl(self.conv_impl)
    s0 = self.image_size // 4
    h = QDense(self.width * s0 * s0, dtype=self.dtype, name="l1")(z)
    h = h.reshape(z.shape[0], s0, s0, self.width)

    def norm(eps, name):
      return lambda x: CondBatchNorm(self.num_classes, eps, name=name)(x, labels)

    return _decode(self, h, norm)
