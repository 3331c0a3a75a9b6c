"""Model zoo: one definition serves the FP teacher (quant=None) and the quantized student.

`get_model(name, num_classes, quant)` builds a model by name; see `MODELS`. Names with
`_torchvision` select the architecture variant that torchvision's checkpoints need
(bottleneck stride on the 3x3 conv; MobileNetV2 without the first expansion conv and with
a classifier bias); the plain names follow pytorchcv, the papers' teachers. Pretrained
PyTorch weights are converted by `dfq_jax.models.convert`.
"""

from __future__ import annotations

import functools

from dfq_jax.models.mobilenet_v2 import MobileNetV2
from dfq_jax.models.resnet_cifar import ResNetCifar
from dfq_jax.models.resnet_imagenet import ResNet

MODELS = {
  "resnet8_cifar": functools.partial(ResNetCifar, depth=8),
  "resnet20_cifar": functools.partial(ResNetCifar, depth=20),
  "resnet32_cifar": functools.partial(ResNetCifar, depth=32),
  "resnet44_cifar": functools.partial(ResNetCifar, depth=44),
  "resnet56_cifar": functools.partial(ResNetCifar, depth=56),
  "resnet18": functools.partial(ResNet, depth=18),
  "resnet34": functools.partial(ResNet, depth=34),
  "resnet50": functools.partial(ResNet, depth=50, conv1_stride=True),
  "resnet50_torchvision": functools.partial(ResNet, depth=50, conv1_stride=False),
  "mobilenetv2": functools.partial(MobileNetV2, expand_first_block=True, classifier_bias=False),
  "mobilenetv2_torchvision": functools.partial(
    MobileNetV2, expand_first_block=False, classifier_bias=True
  ),
}


def get_model(name: str, *, num_classes: int, quant=None, **kwargs):
  """Returns the linen module `name` (see MODELS) with the given classes and policy."""
  if name not in MODELS:
    raise ValueError(f"model {name!r} is unknown: choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, quant=quant, **kwargs)
