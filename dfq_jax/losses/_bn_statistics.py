"""GDFQ's BN-statistics alignment (BNS, methods.md §2.5; used by GDFQ and AdaDFQ)."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from dfq_jax.losses._base import Array, ArrayLike, Tree, _float
from dfq_jax.losses._trees import _batch_level, _is_layer, _layers, _reduce_layers, lookup_layer


def bn_stat_loss_layer(
  mean: ArrayLike, var: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike
) -> Array:
  """One layer of GDFQ's BNS loss: MSE_c(μ, μ_run) + MSE_c(σ², σ²_run).

  Args:
    mean: [C] batch mean of the BN input.
    var: [C] biased batch variance of the BN input (compared with the variance, not std).
    running_mean: [C] teacher running mean.
    running_var: [C] teacher running variance.

  Returns:
    Scalar.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), "BNS loss".
  """
  return jnp.mean(jnp.square(_float(mean) - _float(running_mean))) + jnp.mean(
    jnp.square(_float(var) - _float(running_var))
  )


def bn_stat_loss(bn_stats: Tree, running: Tree) -> Array:
  """GDFQ's BNS loss: mean over BN layers of `bn_stat_loss_layer`.

  Args:
    bn_stats: tree of {'mean', 'var'} nodes, per-sample ([B, C], combined into batch
      mean / biased variance) or batch-level ([C]).
    running: teacher `batch_stats` tree ({'mean': [C], 'var': [C]} per layer).

  Returns:
    Scalar.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603); AdaDFQ (Qian et al., CVPR
  2023, arXiv:2303.06869) reuses it as L_BNS.
  """
  values = []
  for path, node in _layers(bn_stats):
    mean, var = _batch_level(node)
    run = lookup_layer(running, path)
    values.append(bn_stat_loss_layer(mean, var, run["mean"], run["var"]))
  return _reduce_layers(values, "mean")


def to_unbiased_var(bn_stats: Tree, num_positions: int | Tree) -> Tree:
  """Rescales per-sample biased variances to unbiased ones (Bessel, n/(n-1)).

  DSG's PTQ code uses the unbiased spatial variance per sample; `bn_stats` holds the
  biased one. Apply this before `sda_margins(level='sample')` / `sda_loss_per_sample` for
  code parity (the difference is 1/(n-1): 1.6 % at 8×8, 2 % at 7×7).

  Args:
    bn_stats: per-sample tree ({'mean': [B, C], 'var': [B, C]} per layer).
    num_positions: spatial positions n = H·W per sample, an int for every layer or a
      tree with the same layer paths whose layer nodes are replaced by ints.

  Returns:
    A tree of the same structure with 'var' multiplied by n/(n-1).

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ code statistics.
  """

  def convert(node, n):
    if n < 2:
      raise ValueError(f"Need at least 2 spatial positions for an unbiased variance; got {n}.")
    return {"mean": node["mean"], "var": _float(node["var"]) * (n / (n - 1))}

  def walk(node, prefix):
    if _is_layer(node):
      if isinstance(num_positions, Mapping):
        n = num_positions
        for key in prefix:
          n = n[key]
      else:
        n = num_positions
      return convert(node, int(n))
    return {key: walk(value, prefix + (key,)) for key, value in node.items()}

  return walk(bn_stats, ())
