"""Batch statistics shared by the models and the losses (imports only jax).

The lowest layer both `dfq_jax.models` and `dfq_jax.losses` may import: neither of those
imports the other, so helpers they share live here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_moments(mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance [C] from per-sample mean and biased var [B, C].

  Law of total variance: Var = E_b[var_b] + E_b[(mean_b - mean)^2]. Exact when every
  sample has the same number of spatial positions.
  """
  batch_mean = jnp.mean(mean, axis=0)
  batch_var = jnp.mean(var, axis=0) + jnp.mean(jnp.square(mean - batch_mean), axis=0)
  return batch_mean, batch_var
