"""Shared helpers of the loss primitives: array type aliases, float casting, a safe norm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Tree = Any


def _float(x: ArrayLike) -> Array:
  """Casts to at least float32 (keeps float64 under x64)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_norm(x: Array, axis=None) -> Array:
  """l2 norm whose gradient at 0 is 0 instead of NaN."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
