"""Model zoo: one definition serves the FP teacher (quant=None) and the quantized student.

`get_model(name, num_classes, quant)` builds a model by name; see `MODELS`.
"""

from __future__ import annotations

import functools

from dfq_jax.models.resnet_cifar import ResNetCifar

MODELS = {
    "resnet8_cifar": functools.partial(ResNetCifar, depth=8),
    "resnet20_cifar": functools.partial(ResNetCifar, depth=20),
    "resnet32_cifar": functools.partial(ResNetCifar, depth=32),
    "resnet44_cifar": functools.partial(ResNetCifar, depth=44),
    "resnet56_cifar": functools.partial(ResNetCifar, depth=56),
}


def get_model(name: str, *, num_classes: int, quant=None, **kwargs):
  """Returns the linen module `name` (see MODELS) with the given classes and policy."""
  if name not in MODELS:
    raise ValueError(f"model {name!r} is unknown: choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, quant=quant, **kwargs)
