"""BN-statistics trees: layer enumeration and lookup, batch-level moments, layer reduction."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from dfq_jax.losses._base import Array, Tree, _float
from dfq_jax.stats import combine_moments


def _is_layer(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node.keys()) == {"mean", "var"}


def layer_items(tree: Tree, prefix: tuple = ()) -> list[tuple[tuple, Mapping]]:
  """(path, {'mean', 'var'}) layer nodes of a BN-statistics tree, in iteration order."""
  if _is_layer(tree):
    return [(prefix, tree)]
  if not isinstance(tree, Mapping):
    raise TypeError(
      f"Expected a nested mapping of {{'mean', 'var'}} layer nodes; got "
      f"{type(tree).__name__} at {'/'.join(map(str, prefix)) or '<root>'}."
    )
  items = []
  for key, value in tree.items():
    items.extend(layer_items(value, prefix + (key,)))
  return items


def lookup_layer(tree: Tree, path: tuple) -> Mapping:
  """The {'mean', 'var'} node at `path` of `tree` (KeyError naming the layer if absent)."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"Layer {'/'.join(map(str, path))} is missing from the other tree.")
    node = node[key]
  if not _is_layer(node):
    raise KeyError(f"{'/'.join(map(str, path))} is not a {{'mean', 'var'}} layer node.")
  return node


def _layers(bn_stats: Tree) -> list[tuple[tuple, Mapping]]:
  items = layer_items(bn_stats)
  if not items:
    raise ValueError("The BN-statistics tree holds no {'mean', 'var'} layer nodes.")
  return items


def _batch_level(node: Mapping) -> tuple[Array, Array]:
  mean, var = _float(node["mean"]), _float(node["var"])
  if mean.ndim == 1:
    return mean, var
  if mean.ndim == 2:
    return combine_moments(mean, var)
  raise ValueError(f"BN statistics must be [C] or [B, C]; got shape {mean.shape}.")


def _check_reduction(reduction: str) -> None:
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")


def _reduce_layers(values: list[Array], reduction: str) -> Array:
  _check_reduction(reduction)
  total = functools.reduce(jnp.add, values)
  return total if reduction == "sum" else total / len(values)
