"""DSG slack distribution alignment (SDA, §4.2) and layerwise sample enhancement (LSE, §4.3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax.losses._base import Array, ArrayLike, Tree, _float
from dfq_jax.losses._trees import (
  _batch_level,
  _check_reduction,
  _is_layer,
  _layers,
  _reduce_layers,
  lookup_layer,
)

# Layerwise sample enhancement, one vocabulary for every caller (config keys dsg.lse and
# ptq.lse take subsets): 'off'; 'modulo' (sample b enhances layer b mod L, per-sample form);
# 'diagonal' (sample b enhances layer b for b < L: the PTQ code); 'channel' (channel l of
# layer l on batch statistics: the QAT code).
LSE_MODES = ("off", "modulo", "diagonal", "channel")


def _second_stat(var: Array, stat: str, eps: float) -> Array:
  if stat == "var":
    return var
  if stat == "std":
    return jnp.sqrt(var + eps)
  raise ValueError(f"stat must be 'var' or 'std'; got {stat!r}.")


def _layer_margins(margins: Any, path: tuple) -> tuple[Array, Array]:
  """Per-layer (mean margin, second-statistic margin) from a tree or a global pair."""
  if _is_layer(margins):
    return _float(margins["mean"]), _float(margins["var"])
  if isinstance(margins, Mapping):
    node = lookup_layer(margins, path)
    return _float(node["mean"]), _float(node["var"])
  mean_margin, var_margin = margins
  return _float(mean_margin), _float(var_margin)


def sda_margins(
  ref_bn_stats: Tree,
  running: Tree,
  *,
  percentile: float,
  stat: str = "var",
  level: str = "batch",
  eps: float = 1e-6,
) -> dict:
  """DSG slack margins: ε-th percentile of the statistic gaps of reference inputs.

  The original margin files (m.npy, n.npy) are not public. Following methods.md §4.2, feed
  one batch of the initial inputs (N(0, 1) noise for the generator path, U[0, 1) for the
  PTQ path) through the teacher, and per layer set δ_l = percentile_ε(|μ_ref − μ_run|) and
  γ_l = percentile_ε(|s_ref − s_run|), where s is the variance (`stat='var'`, compared by
  the QAT code) or the std sqrt(var + eps) (`stat='std'`, compared by the PTQ code).
  The values cannot be parity-exact with the paper.

  Args:
    ref_bn_stats: per-sample ([B, C]) or batch-level ([C]) tree from the reference batch.
    running: teacher `batch_stats` tree.
    percentile: ε in [0, 100] (linear interpolation, as `np.percentile`).
    stat: 'var' or 'std' — must match the `stat` of the loss the margins are used with.
    level: 'batch' (gaps of batch statistics, percentile over channels) or 'sample'
      (per-sample gaps, percentile over all B·C entries; needs [B, C] leaves).
    eps: added to variances before the square root when `stat='std'`.

  Returns:
    A nested dict with the layer paths of `ref_bn_stats` and leaves
    {'mean': δ_l, 'var': γ_l} (scalars; 'var' holds the margin of the second statistic in
    the units of `stat`).

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), slack distribution
  alignment.
  """
  if level not in ("batch", "sample"):
    raise ValueError(f"level must be 'batch' or 'sample'; got {level!r}.")
  out: dict = {}
  for path, node in _layers(ref_bn_stats):
    run = lookup_layer(running, path)
    if level == "batch":
      mean, var = _batch_level(node)
    else:
      mean, var = _float(node["mean"]), _float(node["var"])
      if mean.ndim != 2:
        raise ValueError("level='sample' needs per-sample [B, C] statistics.")
    d_mean = jnp.abs(mean - _float(run["mean"]))
    d_var = jnp.abs(_second_stat(var, stat, eps) - _second_stat(_float(run["var"]), stat, eps))
    leaf = {"mean": jnp.percentile(d_mean, percentile), "var": jnp.percentile(d_var, percentile)}
    target = out
    for key in path[:-1]:
      target = target.setdefault(key, {})
    if path:
      target[path[-1]] = leaf
    else:
      out = leaf
  return out


def _slack(gap: Array, margin: Array, two_sided: bool) -> Array:
  excess = jnp.abs(gap) - jnp.abs(margin)
  return jnp.abs(excess) if two_sided else jax.nn.relu(excess)


def sda_loss_layer(
  mean: ArrayLike,
  var: ArrayLike,
  running_mean: ArrayLike,
  running_var: ArrayLike,
  *,
  mean_margin: ArrayLike,
  var_margin: ArrayLike,
  stat: str = "var",
  two_sided: bool = False,
  eps: float = 1e-6,
  enhance_channel: int | None = None,
) -> Array:
  """One layer of DSG's batch-level slack alignment: ‖g_μ‖² + ‖g_s‖².

  g = relu(|stat − stat_run| − |margin|) (paper: one-sided hinge, no penalty inside the
  margin), or with `two_sided=True` |(|stat − stat_run| − |margin|)| (QAT code parity,
  which also penalises gaps smaller than the margin).

  Args:
    mean: [C] batch mean of the BN input.
    var: [C] biased batch variance of the BN input.
    running_mean: [C]; running_var: [C].
    mean_margin: δ_l (scalar or [C]).
    var_margin: γ_l, in the units of `stat`.
    stat: 'var' (QAT code: biased variance vs running variance) or 'std' (sqrt(· + eps)).
    two_sided: QAT code form of the slack.
    eps: used when `stat='std'`.
    enhance_channel: QAT-code LSE parity: channel `enhance_channel` of both gaps is
      multiplied by √2 (the code passes the layer index here). Ignored if ≥ C.

  Returns:
    Scalar (sums over channels).

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al., TPAMI,
  arXiv:2109.00212), SDA and the QAT code's LSE.
  """
  mean, var = _float(mean), _float(var)
  g_mean = _slack(mean - _float(running_mean), _float(mean_margin), two_sided)
  g_var = _slack(
    _second_stat(var, stat, eps) - _second_stat(_float(running_var), stat, eps),
    _float(var_margin),
    two_sided,
  )
  if enhance_channel is not None and enhance_channel < mean.shape[-1]:
    scale = jnp.ones(mean.shape[-1], g_mean.dtype).at[enhance_channel].set(math.sqrt(2.0))
    g_mean, g_var = g_mean * scale, g_var * scale
  return jnp.sum(jnp.square(g_mean)) + jnp.sum(jnp.square(g_var))


def sda_loss(
  bn_stats: Tree,
  running: Tree,
  *,
  margins: Any,
  stat: str = "var",
  two_sided: bool = False,
  reduction: str = "mean",
  lse: str = "off",
  eps: float = 1e-6,
) -> Array:
  """DSG slack distribution alignment on batch statistics (generator / QAT path).

  Default: the paper's one-sided hinge on what the QAT code compares (batch mean and
  biased batch variance of each BN input vs the running mean / variance), averaged over
  layers as in the QAT code (`reduction='sum'` gives the paper's Σ_l). Code parity:
  `two_sided=True, lse='channel'` (and `reduction='mean'`).

  Args:
    bn_stats: per-sample ([B, C]) or batch-level ([C]) tree.
    running: teacher `batch_stats` tree.
    margins: tree from `sda_margins` ({'mean': δ_l, 'var': γ_l} per layer) or one
      (δ, γ) pair for all layers.
    stat: 'var' or 'std' (see `sda_loss_layer`).
    two_sided: QAT code's |(|gap| − m)| instead of the hinge.
    reduction: 'mean' or 'sum' over layers.
    lse: 'off' or 'channel' (the QAT code's "LSE": channel l of layer l scaled by √2);
      the per-sample modes are `sda_loss_per_sample`'s.
    eps: used when `stat='std'`.

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al., TPAMI,
  arXiv:2109.00212).
  """
  _check_reduction(reduction)
  _check_lse(lse, ("off", "channel"))
  values = []
  for index, (path, node) in enumerate(_layers(bn_stats)):
    mean, var = _batch_level(node)
    run = lookup_layer(running, path)
    mean_margin, var_margin = _layer_margins(margins, path)
    values.append(
      sda_loss_layer(
        mean,
        var,
        run["mean"],
        run["var"],
        mean_margin=mean_margin,
        var_margin=var_margin,
        stat=stat,
        two_sided=two_sided,
        eps=eps,
        enhance_channel=index if lse == "channel" else None,
      )
    )
  return _reduce_layers(values, reduction)


def _check_lse(lse: str, allowed: tuple[str, ...]) -> None:
  if lse not in allowed:
    raise ValueError(f"lse={lse!r} is not one of {allowed} here (LSE_MODES: {LSE_MODES}).")


def lse_weights(
  batch_size: int,
  num_layers: int,
  *,
  mode: str = "modulo",
  scale: float = 2.0,
  on: str = "residual",
  layer_num: int = 20,
) -> Array:
  """DSG layerwise sample enhancement: per (sample, layer) weights on the per-sample loss.

  Sample b enhances layer l when
    mode='modulo' (default): l == b mod L — every sample enhances exactly one layer;
    mode='diagonal' (the PTQ code): b == l and b < min(B, layer_num) — with the code's
      hard-coded layer_num=20, samples ≥ 20 and layers ≥ 20 are never enhanced.
  The enhanced weight is scale² with `on='residual'` (the code multiplies the slack
  residual by scale=2, i.e. ×4 on the squared loss) or scale with `on='loss'` (the
  formalisation w = 1 + λ: pass scale = 1 + λ). Other entries are 1.

  Args:
    batch_size: B. num_layers: L.
    mode: 'modulo' or 'diagonal'. scale: enhancement factor. on: 'residual' or 'loss'.
    layer_num: the PTQ code's layer count (mode='diagonal' only).

  Returns:
    [B, L] float32 weights multiplying the per-sample per-layer loss ℓ_{b,l}.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), layerwise sample
  enhancement.
  """
  b = np.arange(batch_size)[:, None]
  l = np.arange(num_layers)[None, :]
  if mode == "modulo":
    hit = l == b % num_layers
  elif mode == "diagonal":
    hit = (l == b) & (b < min(batch_size, layer_num))
  else:
    raise ValueError(f"mode must be 'modulo' or 'diagonal'; got {mode!r}.")
  if on == "residual":
    w = scale**2
  elif on == "loss":
    w = scale
  else:
    raise ValueError(f"on must be 'residual' or 'loss'; got {on!r}.")
  return jnp.asarray(np.where(hit, w, 1.0), jnp.float32)


def sda_per_sample_term(
  stat: ArrayLike, target: ArrayLike, *, margin: ArrayLike, sample_weights: ArrayLike | None = None
) -> Array:
  """One statistic of DSG's per-sample slack loss (the PTQ code's `main_loss`), per example.

  D_{b,c} = relu(|target_c − stat_{b,c}| − |margin|); returns w_b·Σ_c D_{b,c}². The
  code's layer loss ‖D‖²_F / B is the mean of the result over the batch.

  Args:
    stat: [B, C] per-sample statistic.
    target: [C] (or broadcastable) target statistic.
    margin: scalar or [C].
    sample_weights: optional [B] loss weights (a column of `lse_weights`).

  Returns:
    [B].

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ code form.
  """
  d = jax.nn.relu(jnp.abs(_float(target) - _float(stat)) - jnp.abs(_float(margin)))
  per_example = jnp.sum(jnp.square(d), axis=-1)
  if sample_weights is not None:
    per_example = per_example * _float(sample_weights)
  return per_example


def sda_per_sample_layer(
  mean: ArrayLike,
  var: ArrayLike,
  running_mean: ArrayLike,
  running_var: ArrayLike,
  *,
  mean_margin: ArrayLike,
  var_margin: ArrayLike,
  stat: str = "std",
  eps: float = 1e-6,
  sample_weights: ArrayLike | None = None,
) -> Array:
  """One layer of DSG's per-sample slack loss (mean term + second-statistic term).

  With `stat='std'` (PTQ code) the per-sample std sqrt(var + eps) is compared with
  sqrt(running_var + eps); with `stat='var'` the variances are compared.

  Args:
    mean: [B, C] per-sample means; var: [B, C] per-sample variances.
    running_mean: [C]; running_var: [C].
    mean_margin, var_margin: scalars (var_margin in the units of `stat`).
    stat: 'std' or 'var'. eps: used when `stat='std'`.
    sample_weights: optional [B] LSE weights for this layer.

  Returns:
    [B] per-example loss; the layer loss is its mean.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ code form.
  """
  var, running_var = _float(var), _float(running_var)
  return sda_per_sample_term(
    mean, running_mean, margin=mean_margin, sample_weights=sample_weights
  ) + sda_per_sample_term(
    _second_stat(var, stat, eps),
    _second_stat(running_var, stat, eps),
    margin=var_margin,
    sample_weights=sample_weights,
  )


def sda_loss_per_sample(
  bn_stats: Tree,
  running: Tree,
  *,
  margins: Any,
  stat: str = "std",
  lse: str = "off",
  lse_scale: float = 2.0,
  lse_on: str = "residual",
  layer_num: int = 20,
  eps: float = 1e-6,
  reduction: str = "sum",
) -> Array:
  """DSG slack alignment on per-sample statistics, with optional LSE (PTQ code form).

  Σ_l (1/B) Σ_b w_{b,l} [Σ_c D^μ_{b,c}² + Σ_c D^s_{b,c}²], summed over layers as in the
  PTQ code (`reduction='mean'` divides by L). The PTQ code uses the unbiased spatial
  variance: convert `bn_stats` with `to_unbiased_var` first for exact parity.

  Args:
    bn_stats: per-sample tree ({'mean': [B, C], 'var': [B, C]} per layer).
    running: teacher `batch_stats` tree.
    margins: `sda_margins` tree or one (δ, γ) pair.
    stat: 'std' (PTQ code) or 'var'.
    lse: 'off' (no enhancement), 'modulo' (sample b enhances layer b mod L) or
      'diagonal' (the PTQ code); see `lse_weights`. Layer l is the l-th layer of `bn_stats`.
    lse_scale, lse_on, layer_num: see `lse_weights`.
    eps: used when `stat='std'`.
    reduction: 'sum' or 'mean' over layers.

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al., TPAMI,
  arXiv:2109.00212), SDA + LSE.
  """
  _check_reduction(reduction)
  _check_lse(lse, ("off", "modulo", "diagonal"))
  layers = _layers(bn_stats)
  weights = None
  if lse != "off":
    batch = jnp.shape(layers[0][1]["mean"])[0]
    weights = lse_weights(
      batch, len(layers), mode=lse, scale=lse_scale, on=lse_on, layer_num=layer_num
    )
  values = []
  for index, (path, node) in enumerate(layers):
    if jnp.ndim(node["mean"]) != 2:
      raise ValueError("sda_loss_per_sample needs per-sample [B, C] statistics.")
    run = lookup_layer(running, path)
    mean_margin, var_margin = _layer_margins(margins, path)
    per_example = sda_per_sample_layer(
      node["mean"],
      node["var"],
      run["mean"],
      run["var"],
      mean_margin=mean_margin,
      var_margin=var_margin,
      stat=stat,
      eps=eps,
      sample_weights=None if weights is None else weights[:, index],
    )
    values.append(jnp.mean(per_example))
  return _reduce_layers(values, reduction)
