"""Generators that synthesise images from (z, label); chosen by name."""

from __future__ import annotations

from typing import Any

from dfq_jax.generators.gdfq import CONV_IMPLS, GeneratorCifar, GeneratorImagenet
from dfq_jax.quant.layers import COMPUTE_DTYPES as DTYPES

GENERATORS = {"cifar": GeneratorCifar, "imagenet": GeneratorImagenet}


def get_generator(name: str, *, conv_impl: str = "subpixel", dtype: Any = None, **kwargs):
  """Returns the generator `name` ('cifar' or 'imagenet') built with `kwargs`.

  conv_impl: 'subpixel' | 'standard' (see `gdfq.py`); dtype: conv compute dtype, None,
  a dtype or its name 'float32' | 'bfloat16'.
  """
  if name not in GENERATORS:
    raise ValueError(f"generator {name!r} is unknown: choose one of {sorted(GENERATORS)}.")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(
      f"generator conv_impl {conv_impl!r} is unknown: choose one of {list(CONV_IMPLS)}."
    )
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"generator dtype {dtype!r} is unknown: choose one of {list(DTYPES)}.")
    dtype = DTYPES[dtype]
  return GENERATORS[name](conv_impl=conv_impl, dtype=dtype, **kwargs)


def check_generator_config(config) -> None:
  """Raises ValueError for a config.generator that names an unknown option."""
  g = config.generator
  if g.name not in GENERATORS:
    raise ValueError(f"generator.name={g.name!r} is unknown: use one of {sorted(GENERATORS)}.")
  if g.conv_impl not in CONV_IMPLS:
    raise ValueError(
      f"generator.conv_impl={g.conv_impl!r} is unknown: use one of {list(CONV_IMPLS)}."
    )


def generator_from_config(config):
  """The run's generator (config.generator; image size, channels, classes of the run)."""
  g = config.generator
  return get_generator(
    g.name,
    num_classes=config.num_classes,
    image_size=config.image_size,
    channels=config.channels,
    latent_dim=g.latent_dim,
    width=g.width,
    bn_eps=g.bn_eps,
    conv_impl=g.conv_impl,
    dtype=config.compute_dtype,
  )
