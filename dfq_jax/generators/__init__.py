"""Generators that synthesise images from (z, label); chosen by name."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dfq_jax.generators.gdfq import CONV_IMPLS, GeneratorCifar, GeneratorImagenet

GENERATORS = {"cifar": GeneratorCifar, "imagenet": GeneratorImagenet}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def get_generator(name: str, *, conv_impl: str = "subpixel", dtype: Any = None, **kwargs):
  """Returns the generator `name` ('cifar' or 'imagenet') built with `kwargs`.

  conv_impl: 'subpixel' | 'standard' (see `gdfq.py`); dtype: conv compute dtype, None,
  a dtype or its name 'float32' | 'bfloat16'.
  """
  if name not in GENERATORS:
    raise ValueError(f"generator {name!r} is unknown: choose one of {sorted(GENERATORS)}.")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"generator conv_impl {conv_impl!r} is unknown: choose one of "
                     f"{list(CONV_IMPLS)}.")
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"generator dtype {dtype!r} is unknown: choose one of {list(DTYPES)}.")
    dtype = DTYPES[dtype]
  return GENERATORS[name](conv_impl=conv_impl, dtype=dtype, **kwargs)
