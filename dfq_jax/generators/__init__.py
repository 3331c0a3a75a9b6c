"""Generators that synthesise images from (z, label); chosen by name."""

from __future__ import annotations

from dfq_jax.generators.gdfq import GeneratorCifar, GeneratorImagenet

GENERATORS = {"cifar": GeneratorCifar, "imagenet": GeneratorImagenet}


def get_generator(name: str, **kwargs):
  """Returns the generator `name` ('cifar' or 'imagenet') built with `kwargs`."""
  if name not in GENERATORS:
    raise ValueError(f"generator {name!r} is unknown: choose one of {sorted(GENERATORS)}.")
  return GENERATORS[name](**kwargs)
