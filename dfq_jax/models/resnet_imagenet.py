"""ImageNet ResNets (He et al. 2016): ResNet-18/34 (basic blocks), ResNet-50/101/152
(bottleneck blocks).

Stem: conv7x7/2 (pad 3) + BN + ReLU + max-pool 3x3/2 (pad 1, padded with -inf as in
PyTorch, output size floor((H - 1) / 2) + 1). Four stages of widths 64, 128, 256, 512
(x4 outputs for bottlenecks), stride 2 at the first block of stages 2-4, projection
shortcuts conv1x1 + BN where the shape changes, global average pool, linear classifier.

Where the stride-2 of a bottleneck sits (`conv1_stride`):
  True  (pytorchcv `resnet50`/`resnet101`/`resnet152`, the papers' teachers, and the
        original ResNet v1): on the first 1x1 conv.
  False (torchvision "v1.5", pytorchcv `resnet50b`): on the 3x3 conv.
The weights have the same shapes either way, so the converter cannot tell them apart:
pick the one that matches the checkpoint.

Quantization (student): every conv and the classifier are `QConv`/`QDense`; a `QuantAct`
follows every ReLU (the stem, inside each block, after each residual sum). The input
image is not quantized, except by the deployment quantizer (`QuantPolicy.deploy`: the
input, the last conv of each block before the sum, the shortcut, the pooled features).
Inputs are NHWC, normalised images; any size >= 32 works (the final pool is global, which
equals PyTorch's 7x7 pool at 224x224).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.models.layers import BatchNorm, projection_shortcut
from dfq_jax.models.resnet_cifar import BasicBlock
from dfq_jax.quant.layers import QConv, QDense, QuantAct, QuantPolicy

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}


def max_pool_torch(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """`torch.nn.MaxPool2d(window, stride, pad)` on NHWC: pads with -inf, floor mode."""
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (pad, pad), (pad, pad), (0, 0)),
  )


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN (+ shortcut) -ReLU; 4*planes outputs."""

  planes: int
  stride: int = 1
  conv1_stride: bool = True
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    s = (self.stride, self.stride)
    s1, s2 = (s, (1, 1)) if self.conv1_stride else ((1, 1), s)
    out = QConv(self.planes, (1, 1), s1, quant=self.quant, dtype=self.dtype, name="conv1")(x)
    out = QuantAct(self.quant, name="act1")(nn.relu(bn("bn1")(out)))
    out = QConv(self.planes, (3, 3), s2, quant=self.quant, dtype=self.dtype, name="conv2")(out)
    out = QuantAct(self.quant, name="act2")(nn.relu(bn("bn2")(out)))
    out = QConv(4 * self.planes, (1, 1), quant=self.quant, dtype=self.dtype, name="conv3")(out)
    out = QuantAct(self.quant, deploy=True, name="conv3_act")(bn("bn3")(out))
    x = projection_shortcut(x, 4 * self.planes, self.stride, self.quant, train, self.dtype)
    return QuantAct(self.quant, name="act3")(nn.relu(out + x))


class ResNet(nn.Module):
  """ImageNet ResNet.

  Attributes:
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottlenecks).
    num_classes: classifier outputs.
    conv1_stride: bottleneck stride on the first 1x1 conv (pytorchcv, True) or on the
      3x3 conv (torchvision v1.5, False). Ignored for basic blocks.
    width: channels of the stem and of the first stage's (bottleneck) planes (64).
    quant: None for the full-precision teacher, a QuantPolicy for the student.

  Layer names: stem `conv1`/`bn1`/`act1`; blocks `layer{stage}_{block}` (stage from 1,
  block from 0) holding `conv{k}`, `bn{k}`, `act{k}`, `shortcut_conv`, `shortcut_bn`;
  classifier `fc`.
  """

  depth: int = 18
  num_classes: int = 1000
  conv1_stride: bool = True
  width: int = 64
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x [B, H, W, C] normalised images. Returns logits [B, num_classes]."""
    if self.depth not in RESNET_SPECS:
      raise ValueError(
        f"ImageNet ResNet depth must be one of {sorted(RESNET_SPECS)}; got {self.depth}."
      )
    kind, stage_sizes = RESNET_SPECS[self.depth]
    x = QuantAct(self.quant, deploy=True, name="input_act")(x)
    x = QConv(
      self.width, (7, 7), (2, 2), quant=self.quant, dtype=self.dtype, role="first", name="conv1"
    )(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = QuantAct(self.quant, name="act1")(x)
    x = max_pool_torch(x)
    for stage, n_blocks in enumerate(stage_sizes):
      planes = self.width * 2**stage
      for block in range(n_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        name = f"layer{stage + 1}_{block}"
        if kind == "basic":
          block_module = BasicBlock(planes, stride, "B", self.quant, self.dtype, name=name)
        else:
          block_module = Bottleneck(
            planes, stride, self.conv1_stride, self.quant, self.dtype, name=name
          )
        x = block_module(x, train)
    x = QuantAct(self.quant, deploy=True, name="pool_act")(jnp.mean(x, axis=(1, 2)))
    return QDense(self.num_classes, quant=self.quant, dtype=self.dtype, role="last", name="fc")(x)
