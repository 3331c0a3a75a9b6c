"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20/32/44/56 (depth = 6n + 2).

Two shortcut layouts:
  'A' (akamaster/pytorch_resnet_cifar10): parameter-free; where the shape changes the
      input is subsampled by 2 and zero-padded with planes // 4 channels on each side.
      ResNet-20 has 19 BN layers.
  'B' (pytorchcv resnet20_cifar10, the papers' teachers): 1x1 conv + BN projection where
      the shape changes. ResNet-20 has 21 BN layers.

Quantization (student): every conv and the classifier are `QConv`/`QDense`; a `QuantAct`
follows every ReLU (after the stem, inside each block, after each residual sum). The
input image is not quantized, except by the deployment quantizer (`QuantPolicy.deploy`),
which also quantizes the input, each block's conv2 output before the sum (`conv2_act`),
the projection shortcut (`shortcut_act`) and the pooled features (`pool_act`): what an
integer engine reads. Inputs are NHWC, normalised images.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.models.layers import BatchNorm, projection_shortcut
from dfq_jax.quant.layers import QConv, QDense, QuantAct, QuantPolicy


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -ReLU (also the ImageNet ResNet-18/34 block)."""

  planes: int
  stride: int = 1
  shortcut: str = "A"
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    s = (self.stride, self.stride)
    out = QConv(self.planes, (3, 3), s, quant=self.quant, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(bn("bn1")(out))
    out = QuantAct(self.quant, name="act1")(out)
    out = QConv(self.planes, (3, 3), quant=self.quant, dtype=self.dtype, name="conv2")(out)
    out = QuantAct(self.quant, deploy=True, name="conv2_act")(bn("bn2")(out))
    in_planes = x.shape[-1]
    if self.shortcut == "B":
      x = projection_shortcut(x, self.planes, self.stride, self.quant, train, self.dtype)
    elif self.stride != 1 or in_planes != self.planes:
      pad = self.planes // 4
      x = x[:, ::2, ::2, :]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, self.planes - in_planes - pad)))
    out = nn.relu(out + x)
    return QuantAct(self.quant, name="act2")(out)


class ResNetCifar(nn.Module):
  """CIFAR ResNet of depth 6n+2 with widths (w, 2w, 4w).

  Attributes:
    depth: 20, 32, 44, 56, ... (6n + 2); 8 gives one block per stage.
    num_classes: classifier outputs.
    shortcut: 'A' (akamaster) or 'B' (pytorchcv).
    width: channels of the first stage (16 in the papers).
    quant: None for the full-precision teacher, a QuantPolicy for the student.
  """

  depth: int = 20
  num_classes: int = 10
  shortcut: str = "A"
  width: int = 16
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x [B, H, W, C] normalised images. Returns logits [B, num_classes]."""
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56); got {self.depth}.")
    if self.shortcut not in ("A", "B"):
      raise ValueError(f"shortcut must be 'A' or 'B'; got {self.shortcut!r}.")
    n = (self.depth - 2) // 6
    x = QuantAct(self.quant, deploy=True, name="input_act")(x)
    x = QConv(self.width, (3, 3), quant=self.quant, dtype=self.dtype, role="first", name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = QuantAct(self.quant, name="act1")(x)
    for stage in range(3):
      planes = self.width * 2**stage
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
          planes, stride, self.shortcut, self.quant, self.dtype, name=f"layer{stage + 1}_{block}"
        )(x, train)
    x = QuantAct(self.quant, deploy=True, name="pool_act")(jnp.mean(x, axis=(1, 2)))
    return QDense(self.num_classes, quant=self.quant, dtype=self.dtype, role="last", name="linear")(
      x
    )
