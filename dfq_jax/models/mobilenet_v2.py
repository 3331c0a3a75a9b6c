"""MobileNetV2 width 1.0 (Sandler et al. 2018, arXiv 1801.04381), ReLU6.

Stem conv3x3/2 (32) + BN + ReLU6; 17 inverted-residual blocks (table below); head
conv1x1 (1280) + BN + ReLU6; global average pool; classifier. Each block: optional
expansion conv1x1 + BN + ReLU6, depthwise conv3x3 (stride) + BN + ReLU6, projection
conv1x1 + BN with NO activation ("linear bottleneck"), plus the input when the stride is
1 and the widths agree.

Two published layouts differ in architecture (not only in names):
  pytorchcv `mobilenetv2_w1` (the papers' teacher; 3,504,960 parameters):
      the first block keeps an expansion conv1x1 32->32 + BN + ReLU6 although its
      expansion factor is 1 (`expand_first_block=True`), and the classifier is a 1x1
      conv WITHOUT bias (`classifier_bias=False`).
  torchvision `mobilenet_v2` (3,504,872 parameters): no expansion conv in the first
      block, Linear classifier with bias, preceded by Dropout(0.2). The dropout is left
      out here: the teacher runs in eval mode, where it is the identity.

Quantization (student): every conv and the classifier are `QConv`/`QDense` (depthwise
convs included); a `QuantAct` follows every ReLU6. Block outputs have no activation and
are not quantized, so the expansion convs see full-precision inputs (methods.md §1, §2.3),
except with the deployment quantizer (`QuantPolicy.deploy`), which quantizes the input,
each projection output (`project_act`), each residual sum (`add_act`) and the pooled
features: what an integer engine reads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.models.layers import BatchNorm
from dfq_jax.quant.layers import QConv, QDense, QuantAct, QuantPolicy

STEM_FEATURES = 32
HEAD_FEATURES = 1280
# (expansion t, output channels c, repeats n, stride of the first repeat s): paper Table 2.
INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


def block_specs() -> list[tuple[int, int, int]]:
  """(expansion, out_features, stride) of the 17 blocks, in order."""
  return [(t, c, s if i == 0 else 1) for t, c, n, s in INVERTED_RESIDUAL_SETTING for i in range(n)]


class InvertedResidual(nn.Module):
  """[conv1x1-BN-ReLU6] - dw3x3-BN-ReLU6 - conv1x1-BN (+ input)."""

  out_features: int
  stride: int = 1
  expansion: int = 6
  expand_conv: bool = True
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    in_features = x.shape[-1]
    mid = in_features * self.expansion
    y = x
    if self.expand_conv:
      y = QConv(mid, (1, 1), quant=self.quant, dtype=self.dtype, name="expand_conv")(y)
      y = QuantAct(self.quant, name="expand_act")(nn.relu6(bn("expand_bn")(y)))
    elif self.expansion != 1:
      raise ValueError("an inverted residual without expansion conv needs expansion 1.")
    y = QConv(
      mid,
      (3, 3),
      (self.stride, self.stride),
      feature_group_count=mid,
      quant=self.quant,
      dtype=self.dtype,
      name="dw_conv",
    )(y)
    y = QuantAct(self.quant, name="dw_act")(nn.relu6(bn("dw_bn")(y)))
    y = QConv(self.out_features, (1, 1), quant=self.quant, dtype=self.dtype, name="project_conv")(y)
    y = QuantAct(self.quant, deploy=True, name="project_act")(bn("project_bn")(y))
    if self.stride == 1 and in_features == self.out_features:
      y = QuantAct(self.quant, deploy=True, name="add_act")(y + x)
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 x1.0.

  Attributes:
    num_classes: classifier outputs.
    expand_first_block: keep the 1x1 expansion conv (+BN+ReLU6) of the first block,
      whose expansion factor is 1 (pytorchcv: True; torchvision: False).
    classifier_bias: whether the classifier has a bias (pytorchcv: False; torchvision:
      True).
    quant: None for the full-precision teacher, a QuantPolicy for the student.

  Layer names: `stem_conv`/`stem_bn`/`stem_act`; blocks `block{i}` (i = 0..16) holding
  `expand_conv`/`expand_bn`/`expand_act`, `dw_conv`/`dw_bn`/`dw_act`,
  `project_conv`/`project_bn`; `head_conv`/`head_bn`/`head_act`; `classifier`.
  """

  num_classes: int = 1000
  expand_first_block: bool = True
  classifier_bias: bool = False
  quant: QuantPolicy | None = None
  dtype: Any = None  # conv/dense compute dtype (None: float32); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x [B, H, W, C] normalised images. Returns logits [B, num_classes]."""
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    x = QuantAct(self.quant, deploy=True, name="input_act")(x)
    x = QConv(
      STEM_FEATURES,
      (3, 3),
      (2, 2),
      quant=self.quant,
      dtype=self.dtype,
      role="first",
      name="stem_conv",
    )(x)
    x = QuantAct(self.quant, name="stem_act")(nn.relu6(bn("stem_bn")(x)))
    for i, (t, c, s) in enumerate(block_specs()):
      x = InvertedResidual(
        c,
        s,
        t,
        expand_conv=(t != 1 or self.expand_first_block),
        quant=self.quant,
        dtype=self.dtype,
        name=f"block{i}",
      )(x, train)
    x = QConv(HEAD_FEATURES, (1, 1), quant=self.quant, dtype=self.dtype, name="head_conv")(x)
    x = QuantAct(self.quant, name="head_act")(nn.relu6(bn("head_bn")(x)))
    x = QuantAct(self.quant, deploy=True, name="pool_act")(jnp.mean(x, axis=(1, 2)))
    return QDense(
      self.num_classes,
      use_bias=self.classifier_bias,
      quant=self.quant,
      dtype=self.dtype,
      role="last",
      name="classifier",
    )(x)
