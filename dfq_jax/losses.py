"""Pure loss primitives for generative data-free quantization (GDFQ, DSG, AdaDFQ).

Everything here is a pure function of arrays or pytrees of arrays: no Flax modules, no
I/O, no global configuration (`from dfq_jax import losses` works anywhere). Method
hyperparameters are keyword-only. Functions named `*_layer`, `cross_entropy`,
`kl_divergence`, `entropy`, `input_prior_loss` and `l2_norm_prior` return per-example
values ([B]) or per-layer scalars; the remaining functions are the scalar aggregates the
trainer optimises. Specification: docs/methods.md §2.5 (BNS), §3 (GDFQ), §4 (DSG), §5
(AdaDFQ), §7 (paper/code disagreements).

BN-statistics trees. The teacher's `BatchNorm` (dfq_jax.models.layers) sows PER-SAMPLE
statistics of its input, `bn_stats[path] = {'mean': [B, C], 'var': [B, C]}` (biased
variance over the spatial axes), in a tree with the same structure as the running
statistics `batch_stats[path] = {'mean': [C], 'var': [C]}`. A "layer node" is a mapping
with exactly the keys {'mean', 'var'}. Tree functions accept per-sample leaves ([B, C],
combined into batch mean / biased variance by the law of total variance, as PyTorch's BN
hooks compute them) or batch-level leaves ([C]) where batch statistics suffice.
Layers are enumerated in the iteration order of the `bn_stats` mapping (for a collection
returned by `Module.apply` inside a step this is the order in which the layers ran; after
a `jax.tree` round-trip it is sorted key order); running statistics and margins are looked
up by path. Only DSG's layer-sample assignment (LSE) depends on this order, and since
generated samples are exchangeable it only decides which layers are left out when the
network has more layers than `layer_num`.

References:
  GDFQ: Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020,
    arXiv:2003.03603.
  DSG: Zhang et al., "Diversifying Sample Generation for Accurate Data-Free
    Quantization", CVPR 2021, arXiv:2103.01049; Qin et al., "Diverse Sample Generation:
    Pushing the Limit of Generative Data-free Quantization", TPAMI, arXiv:2109.00212.
  AdaDFQ: Qian et al., "Adaptive Data-Free Quantization", CVPR 2023, arXiv:2303.06869.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Tree = Any

# ----------------------------------------------------------------------------------------
# Helpers (private).


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


def _is_layer(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node.keys()) == {"mean", "var"}


def layer_items(tree: Tree, prefix: tuple = ()) -> list[tuple[tuple, Mapping]]:
  """(path, {'mean', 'var'}) layer nodes of a BN-statistics tree, in iteration order."""
  if _is_layer(tree):
    return [(prefix, tree)]
  if not isinstance(tree, Mapping):
    raise TypeError(f"Expected a nested mapping of {{'mean', 'var'}} layer nodes; got "
                    f"{type(tree).__name__} at {'/'.join(map(str, prefix)) or '<root>'}.")
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


def _combine_moments(mean: Array, var: Array) -> tuple[Array, Array]:
  """Batch mean and biased variance [C] from per-sample mean and biased var [B, C]."""
  batch_mean = jnp.mean(mean, axis=0)
  batch_var = jnp.mean(var, axis=0) + jnp.mean(jnp.square(mean - batch_mean), axis=0)
  return batch_mean, batch_var


def _batch_level(node: Mapping) -> tuple[Array, Array]:
  mean, var = _float(node["mean"]), _float(node["var"])
  if mean.ndim == 1:
    return mean, var
  if mean.ndim == 2:
    return _combine_moments(mean, var)
  raise ValueError(f"BN statistics must be [C] or [B, C]; got shape {mean.shape}.")


def _second_stat(var: Array, stat: str, eps: float) -> Array:
  if stat == "var":
    return var
  if stat == "std":
    return jnp.sqrt(var + eps)
  raise ValueError(f"stat must be 'var' or 'std'; got {stat!r}.")


def _check_reduction(reduction: str) -> None:
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")


def _reduce_layers(values: list[Array], reduction: str) -> Array:
  _check_reduction(reduction)
  total = functools.reduce(jnp.add, values)
  return total if reduction == "sum" else total / len(values)


def _layer_margins(margins: Any, path: tuple) -> tuple[Array, Array]:
  """Per-layer (mean margin, second-statistic margin) from a tree or a global pair."""
  if _is_layer(margins):
    return _float(margins["mean"]), _float(margins["var"])
  if isinstance(margins, Mapping):
    node = lookup_layer(margins, path)
    return _float(node["mean"]), _float(node["var"])
  mean_margin, var_margin = margins
  return _float(mean_margin), _float(var_margin)


# ----------------------------------------------------------------------------------------
# Classification and distillation (GDFQ §3).


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
  """Softmax cross-entropy with integer labels, per example.

  Args:
    logits: [B, C].
    labels: [B] integer class indices.

  Returns:
    [B] losses; `jnp.mean` gives `torch.nn.CrossEntropyLoss()`.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), the CE terms of L_G and L_Q.
  """
  return optax.softmax_cross_entropy_with_integer_labels(_float(logits), jnp.asarray(labels))


def kl_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                  temperature: float = 1.0) -> Array:
  """KL(softmax(t/T) || softmax(s/T)) per example, summed over classes (no T² factor).

  Gradients flow into both arguments; stop the teacher's gradient at the call site.

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C].
    temperature: softmax temperature T.

  Returns:
    [B] divergences.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), the KD term of L_Q.
  """
  s = _float(student_logits) / temperature
  t = _float(teacher_logits) / temperature
  # log p_t − log p_s = e − log Σ_c p_s,c exp(e_c), with e = (t − s) centred under p_s.
  # At high T both distributions are close and the naive difference of two log-softmaxes
  # (each ≈ −log C) loses ~3 digits in float32; log1p(Σ p_s expm1(e)) keeps them. Large
  # gaps fall back to the overflow-safe logsumexp(log p_s + e) (double-where keeps grads finite).
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  p_s = jnp.exp(log_p_s)
  d = t - s
  e = d - jnp.sum(p_s * d, axis=-1, keepdims=True)
  small = jnp.max(jnp.abs(e), axis=-1, keepdims=True) <= 1.0
  e_small = jnp.where(small, e, 0.0)
  log_z = jnp.where(
      small, jnp.log1p(jnp.sum(p_s * jnp.expm1(e_small), axis=-1, keepdims=True)),
      jax.nn.logsumexp(log_p_s + jnp.where(small, 0.0, e), axis=-1, keepdims=True))
  p_t = jax.nn.softmax(t, axis=-1)
  return jnp.sum(p_t * (e - log_z), axis=-1)


def kd_loss_gdfq(student_logits: ArrayLike, teacher_logits: ArrayLike, labels: ArrayLike, *,
                 temperature: float = 20.0, alpha: float = 1.0,
                 reduction: str = "elementwise_mean") -> tuple[Array, dict[str, Array]]:
  """GDFQ's student loss: alpha·T²·KL(softmax(t/T) || softmax(s/T)) + CE(s, y).

  `reduction='elementwise_mean'` (default, code parity) averages the KL over all B·C
  elements like `torch.nn.KLDivLoss()`, i.e. 1/C of the per-example KL; `'batchmean'` is
  the per-example mean (the paper-intended KD, methods.md §7.3).

  Args:
    student_logits: [B, C] logits of the quantized student.
    teacher_logits: [B, C] teacher logits (stop their gradient at the call site).
    labels: [B] integer labels the generator was conditioned on.
    temperature: T (20 in GDFQ/DSG-QAT).
    alpha: weight of the KD term.
    reduction: 'elementwise_mean' or 'batchmean'.

  Returns:
    (total scalar, {'kd': scalar, 'ce': scalar}) — the form `jax.value_and_grad(...,
    has_aux=True)` expects.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), trainer `loss_fn_kd`.
  """
  if reduction not in ("elementwise_mean", "batchmean"):
    raise ValueError(f"reduction must be 'elementwise_mean' or 'batchmean'; got {reduction!r}.")
  kl = kl_divergence(student_logits, teacher_logits, temperature=temperature)
  if reduction == "elementwise_mean":
    kl = jnp.mean(kl) / jnp.shape(student_logits)[-1]
  else:
    kl = jnp.mean(kl)
  kd = alpha * temperature**2 * kl
  ce = jnp.mean(cross_entropy(student_logits, labels))
  return kd + ce, {"kd": kd, "ce": ce}


# ----------------------------------------------------------------------------------------
# BN-statistics alignment (GDFQ form, §2.5; used by GDFQ and AdaDFQ).


def bn_stat_loss_layer(mean: ArrayLike, var: ArrayLike, running_mean: ArrayLike,
                       running_var: ArrayLike) -> Array:
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
  return (jnp.mean(jnp.square(_float(mean) - _float(running_mean)))
          + jnp.mean(jnp.square(_float(var) - _float(running_var))))


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


# ----------------------------------------------------------------------------------------
# DSG: slack distribution alignment (§4.2) and layerwise sample enhancement (§4.3).


def sda_margins(ref_bn_stats: Tree, running: Tree, *, percentile: float, stat: str = "var",
                level: str = "batch", eps: float = 1e-6) -> dict:
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


def sda_loss_layer(mean: ArrayLike, var: ArrayLike, running_mean: ArrayLike,
                   running_var: ArrayLike, *, mean_margin: ArrayLike, var_margin: ArrayLike,
                   stat: str = "var", two_sided: bool = False, eps: float = 1e-6,
                   enhance_channel: int | None = None) -> Array:
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
  g_var = _slack(_second_stat(var, stat, eps) - _second_stat(_float(running_var), stat, eps),
                 _float(var_margin), two_sided)
  if enhance_channel is not None and enhance_channel < mean.shape[-1]:
    scale = jnp.ones(mean.shape[-1], g_mean.dtype).at[enhance_channel].set(math.sqrt(2.0))
    g_mean, g_var = g_mean * scale, g_var * scale
  return jnp.sum(jnp.square(g_mean)) + jnp.sum(jnp.square(g_var))


def sda_loss(bn_stats: Tree, running: Tree, *, margins: Any, stat: str = "var",
             two_sided: bool = False, reduction: str = "mean", qat_channel_lse: bool = False,
             eps: float = 1e-6) -> Array:
  """DSG slack distribution alignment on batch statistics (generator / QAT path).

  Default: the paper's one-sided hinge on what the QAT code compares (batch mean and
  biased batch variance of each BN input vs the running mean / variance), averaged over
  layers as in the QAT code (`reduction='sum'` gives the paper's Σ_l). Code parity:
  `two_sided=True, qat_channel_lse=True` (and `reduction='mean'`).

  Args:
    bn_stats: per-sample ([B, C]) or batch-level ([C]) tree.
    running: teacher `batch_stats` tree.
    margins: tree from `sda_margins` ({'mean': δ_l, 'var': γ_l} per layer) or one
      (δ, γ) pair for all layers.
    stat: 'var' or 'std' (see `sda_loss_layer`).
    two_sided: QAT code's |(|gap| − m)| instead of the hinge.
    reduction: 'mean' or 'sum' over layers.
    qat_channel_lse: QAT code's "LSE": channel l of layer l scaled by √2.
    eps: used when `stat='std'`.

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al., TPAMI,
  arXiv:2109.00212).
  """
  _check_reduction(reduction)
  values = []
  for index, (path, node) in enumerate(_layers(bn_stats)):
    mean, var = _batch_level(node)
    run = lookup_layer(running, path)
    mean_margin, var_margin = _layer_margins(margins, path)
    values.append(sda_loss_layer(
        mean, var, run["mean"], run["var"], mean_margin=mean_margin, var_margin=var_margin,
        stat=stat, two_sided=two_sided, eps=eps,
        enhance_channel=index if qat_channel_lse else None))
  return _reduce_layers(values, reduction)


def lse_weights(batch_size: int, num_layers: int, *, mode: str = "modulo", scale: float = 2.0,
                on: str = "residual", layer_num: int = 20) -> Array:
  """DSG layerwise sample enhancement: per (sample, layer) weights on the per-sample loss.

  Sample b enhances layer l when
    mode='modulo' (default): l == b mod L — every sample enhances exactly one layer;
    mode='ptq' (PTQ code parity): b == l and b < min(B, layer_num) — with the code's
      hard-coded layer_num=20, samples ≥ 20 and layers ≥ 20 are never enhanced.
  The enhanced weight is scale² with `on='residual'` (the code multiplies the slack
  residual by scale=2, i.e. ×4 on the squared loss) or scale with `on='loss'` (the
  formalisation w = 1 + λ: pass scale = 1 + λ). Other entries are 1.

  Args:
    batch_size: B. num_layers: L.
    mode: 'modulo' or 'ptq'. scale: enhancement factor. on: 'residual' or 'loss'.
    layer_num: the PTQ code's layer count (mode='ptq' only).

  Returns:
    [B, L] float32 weights multiplying the per-sample per-layer loss ℓ_{b,l}.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), layerwise sample
  enhancement.
  """
  b = np.arange(batch_size)[:, None]
  l = np.arange(num_layers)[None, :]
  if mode == "modulo":
    hit = l == b % num_layers
  elif mode == "ptq":
    hit = (l == b) & (b < min(batch_size, layer_num))
  else:
    raise ValueError(f"mode must be 'modulo' or 'ptq'; got {mode!r}.")
  if on == "residual":
    w = scale**2
  elif on == "loss":
    w = scale
  else:
    raise ValueError(f"on must be 'residual' or 'loss'; got {on!r}.")
  return jnp.asarray(np.where(hit, w, 1.0), jnp.float32)


def sda_per_sample_term(stat: ArrayLike, target: ArrayLike, *, margin: ArrayLike,
                        sample_weights: ArrayLike | None = None) -> Array:
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


def sda_per_sample_layer(mean: ArrayLike, var: ArrayLike, running_mean: ArrayLike,
                         running_var: ArrayLike, *, mean_margin: ArrayLike,
                         var_margin: ArrayLike, stat: str = "std", eps: float = 1e-6,
                         sample_weights: ArrayLike | None = None) -> Array:
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
  return (sda_per_sample_term(mean, running_mean, margin=mean_margin,
                              sample_weights=sample_weights)
          + sda_per_sample_term(_second_stat(var, stat, eps),
                                _second_stat(running_var, stat, eps), margin=var_margin,
                                sample_weights=sample_weights))


def sda_loss_per_sample(bn_stats: Tree, running: Tree, *, margins: Any, stat: str = "std",
                        lse: str | None = None, lse_scale: float = 2.0,
                        lse_on: str = "residual", layer_num: int = 20, eps: float = 1e-6,
                        reduction: str = "sum") -> Array:
  """DSG slack alignment on per-sample statistics, with optional LSE (PTQ code form).

  Σ_l (1/B) Σ_b w_{b,l} [Σ_c D^μ_{b,c}² + Σ_c D^s_{b,c}²], summed over layers as in the
  PTQ code (`reduction='mean'` divides by L). The PTQ code uses the unbiased spatial
  variance: convert `bn_stats` with `to_unbiased_var` first for exact parity.

  Args:
    bn_stats: per-sample tree ({'mean': [B, C], 'var': [B, C]} per layer).
    running: teacher `batch_stats` tree.
    margins: `sda_margins` tree or one (δ, γ) pair.
    stat: 'std' (PTQ code) or 'var'.
    lse: None (no enhancement), 'modulo' (sample b enhances layer b mod L) or 'ptq'
      (PTQ code parity); see `lse_weights`. Layer l is the l-th layer of `bn_stats`.
    lse_scale, lse_on, layer_num: see `lse_weights`.
    eps: used when `stat='std'`.
    reduction: 'sum' or 'mean' over layers.

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al., TPAMI,
  arXiv:2109.00212), SDA + LSE.
  """
  _check_reduction(reduction)
  layers = _layers(bn_stats)
  weights = None
  if lse is not None:
    batch = jnp.shape(layers[0][1]["mean"])[0]
    weights = lse_weights(batch, len(layers), mode=lse, scale=lse_scale, on=lse_on,
                          layer_num=layer_num)
  values = []
  for index, (path, node) in enumerate(layers):
    if jnp.ndim(node["mean"]) != 2:
      raise ValueError("sda_loss_per_sample needs per-sample [B, C] statistics.")
    run = lookup_layer(running, path)
    mean_margin, var_margin = _layer_margins(margins, path)
    per_example = sda_per_sample_layer(
        node["mean"], node["var"], run["mean"], run["var"], mean_margin=mean_margin,
        var_margin=var_margin, stat=stat, eps=eps,
        sample_weights=None if weights is None else weights[:, index])
    values.append(jnp.mean(per_example))
  return _reduce_layers(values, reduction)


# ----------------------------------------------------------------------------------------
# DSG PTQ image priors (§4.5).


def input_prior_loss(x: ArrayLike, *, eps: float = 1e-6) -> Array:
  """DSG-PTQ input prior: per-sample per-channel image mean → 0 and std → 1, margin 0.

  Same function as the per-sample SDA with the unbiased spatial variance:
  Σ_c mean_{b,c}² + (sqrt(var_{b,c} + eps) − 1)².

  Args:
    x: [B, H, W, C] images (H·W ≥ 2).
    eps: added to the unbiased variance before the square root.

  Returns:
    [B]; the code's loss is the batch mean.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ `getDistilData`.
  """
  x = _float(x)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  mean = jnp.mean(flat, axis=1)
  var = jnp.var(flat, axis=1, ddof=1)
  return (sda_per_sample_term(mean, 0.0, margin=0.0)
          + sda_per_sample_term(jnp.sqrt(var + eps), 1.0, margin=0.0))


def total_variation_l2(x: ArrayLike) -> Array:
  """Sum of the l2 norms of the four directional first differences of a batch.

  With x indexed [b, i, j, c] (i: row/H, j: column/W), the differences are
  horizontal x[:, :, :-1] − x[:, :, 1:], vertical x[:, :-1] − x[:, 1:], anti-diagonal
  x[:, 1:, :-1] − x[:, :-1, 1:] and diagonal x[:, :-1, :-1] − x[:, 1:, 1:]; each norm is
  the Frobenius norm over the WHOLE batch tensor (not per sample), so the result is a
  scalar, and the four norms are added (not their squares). The gradient at a constant
  image is 0 (safe norm).

  Args:
    x: [B, H, W, C].

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ image prior "TV_L2".
  """
  x = _float(x)
  diffs = (x[:, :, :-1] - x[:, :, 1:], x[:, :-1] - x[:, 1:],
           x[:, 1:, :-1] - x[:, :-1, 1:], x[:, :-1, :-1] - x[:, 1:, 1:])
  return sum(_safe_norm(d) for d in diffs)


def l2_norm_prior(x: ArrayLike) -> Array:
  """Per-sample l2 norm of the image (DSG-PTQ prior; the code uses its batch mean).

  Args:
    x: [B, ...].

  Returns:
    [B] ‖x_b‖₂ (gradient 0 at x_b = 0).

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ `getDistilData`.
  """
  x = _float(x)
  return _safe_norm(x.reshape(x.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------------------
# DSG inter-sample correlation inhibition (SCI, TPAMI; §4.4).


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _eigh_broadened(a: Array, eps: float) -> tuple[Array, Array]:
  """Symmetric eigendecomposition (ascending) with a broadened eigenvector derivative."""
  w, v = jnp.linalg.eigh(a)
  return w, v


@_eigh_broadened.defjvp
def _eigh_broadened_jvp(eps, primals, tangents):
  (a,), (da,) = primals, tangents
  w, v = jnp.linalg.eigh(a)
  da = 0.5 * (da + da.T)
  vdav = v.T @ da @ v
  # The exact derivative has F_ij = 1/(w_j − w_i), which is infinite for (near-)degenerate
  # eigenvalues; (w_j − w_i)/((w_j − w_i)² + eps) is bounded by 1/(2√eps) and 0 on ties.
  gap = w[None, :] - w[:, None]
  f = gap / (jnp.square(gap) + eps)
  return (w, v), (jnp.diagonal(vdav), v @ (f * vdav))


def similarity_spectrum(x: ArrayLike, *, eig_grad_eps: float = 1e-8) -> tuple[Array, Array]:
  """Canonical eigendecomposition of the batch cosine-similarity matrix.

  Φ = x reshaped to [B, D] with rows l2-normalised (norm floored at 1e-12), S = ΦΦᵀ,
  eigenvalues sorted in descending order, each eigenvector's sign fixed so its
  largest-|component| entry is positive. Differentiable: the eigenvector derivative uses
  the broadened factor (w_j − w_i)/((w_j − w_i)² + eig_grad_eps) instead of 1/(w_j − w_i),
  so gradients stay finite for degenerate spectra (e.g. B > D, or S = I).

  Args:
    x: [B, ...].
    eig_grad_eps: broadening of the eigenvector derivative (scale of S's eigenvalues is
      O(1)–O(B)).

  Returns:
    (eigenvalues [B] descending, eigenvectors [B, B] as columns).

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  x = _float(x)
  phi = x.reshape(x.shape[0], -1)
  phi = phi / jnp.maximum(_safe_norm(phi, axis=-1), 1e-12)[:, None]
  s = phi @ phi.T
  s = 0.5 * (s + s.T)
  w, v = _eigh_broadened(s, eig_grad_eps)
  w, v = w[::-1], v[:, ::-1]
  pivot = jnp.argmax(jnp.abs(v), axis=0)
  signs = jnp.sign(v[pivot, jnp.arange(v.shape[1])])
  signs = jax.lax.stop_gradient(jnp.where(signs == 0, 1.0, signs))
  return w, v * signs[None, :]


def sci_terms(x: ArrayLike, noise: ArrayLike, *, differentiable: bool = True,
              eig_grad_eps: float = 1e-8) -> dict[str, Array]:
  """The two terms of DSG's inter-sample correlation inhibition loss.

  magnitude = 1e-4·mean_k (λ_k − λ_r,k)², structure = |Σ_k λ̃_r,k·(−Σ_i V_ik V_r,ik)|,
  where (λ, V) and (λ_r, V_r) are `similarity_spectrum(x)` and of the noise, and λ̃_r is
  min-max normalised (range floored at 1e-12). The noise side is under stop_gradient.
  `differentiable=False` reproduces the released code, which detaches the eigen outputs:
  same value, exactly zero gradient.

  Args:
    x: [B, ...] generated images.
    noise: array of the same shape, fresh N(0, 1) every step.
    differentiable: paper intent (True) or code parity (False).
    eig_grad_eps: see `similarity_spectrum`.

  Returns:
    {'magnitude': scalar, 'structure': scalar}.

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  x = _float(x)
  if not differentiable:
    x = jax.lax.stop_gradient(x)
  w, v = similarity_spectrum(x, eig_grad_eps=eig_grad_eps)
  w_r, v_r = similarity_spectrum(jax.lax.stop_gradient(_float(noise)),
                                 eig_grad_eps=eig_grad_eps)
  magnitude = 1e-4 * jnp.mean(jnp.square(w - w_r))
  span = jnp.maximum(jnp.max(w_r) - jnp.min(w_r), 1e-12)
  w_r_norm = (w_r - jnp.min(w_r)) / span
  structure = jnp.abs(jnp.sum(w_r_norm * -jnp.sum(v * v_r, axis=0)))
  return {"magnitude": magnitude, "structure": structure}


def sci_loss(x: ArrayLike, noise: ArrayLike, *, differentiable: bool = True,
             eig_grad_eps: float = 1e-8) -> Array:
  """DSG's inter-sample correlation inhibition loss, magnitude + structure (`sci_terms`).

  The QAT/PTQ code adds it to L_G with weight 1/L (L = number of BN layers). That weight
  was never exercised with a gradient in the released code; re-tune it for
  `differentiable=True`.

  Args:
    x: [B, ...]; noise: same shape. differentiable, eig_grad_eps: see `sci_terms`.

  Returns:
    Scalar.

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  terms = sci_terms(x, noise, differentiable=differentiable, eig_grad_eps=eig_grad_eps)
  return terms["magnitude"] + terms["structure"]


# ----------------------------------------------------------------------------------------
# AdaDFQ (§5).


def entropy(logits: ArrayLike, *, temperature: float = 1.0) -> Array:
  """Shannon entropy (nats) of softmax(logits / T), per example.

  Args:
    logits: [B, C]. temperature: T.

  Returns:
    [B].

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), `compute_entropy`.
  """
  log_p = jax.nn.log_softmax(_float(logits) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def adadfq_generator_losses(teacher_logits: ArrayLike, student_logits: ArrayLike,
                            labels: ArrayLike, *, lambda_l: float,
                            lambda_u: float) -> dict[str, Array]:
  """AdaDFQ's generator terms: entropy of the disagreement sample, margin loss, L_ds, L_as.

  H_b = entropy(softmax(t − q)); H' = (H − min_b H)/(log C − min_b H), the min taken over
  the batch and not detached (denominator floored at 1e-12 so q = t gives no NaN);
  h = mean_b relu(λ_l − H'_b) + mean_b relu(H'_b − λ_u) (batch-size agnostic);
  L_ds = mean_b CE(t − q, y); L_as = mean_b CE(t + q, y). Gradients flow through both
  logits (the generator's gradient reaches it through the teacher and the STE student).

  Args:
    teacher_logits: [B, C] t. student_logits: [B, C] q. labels: [B] integers.
    lambda_l: lower bound λ_l. lambda_u: upper bound λ_u.

  Returns:
    {'entropy': [B] H, 'entropy_norm': [B] H', 'margin': h, 'ds': L_ds, 'as': L_as}.

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), `marginal_loss` and the
  disagreement/agreement sample losses.
  """
  t, q = _float(teacher_logits), _float(student_logits)
  z_ds = t - q
  h = entropy(z_ds)
  h_min = jnp.min(h)
  h_norm = (h - h_min) / jnp.maximum(math.log(t.shape[-1]) - h_min, 1e-12)
  margin = jnp.mean(jax.nn.relu(lambda_l - h_norm)) + jnp.mean(jax.nn.relu(h_norm - lambda_u))
  return {"entropy": h, "entropy_norm": h_norm, "margin": margin,
          "ds": jnp.mean(cross_entropy(z_ds, labels)),
          "as": jnp.mean(cross_entropy(t + q, labels))}


def adadfq_generator_loss(teacher_logits: ArrayLike, student_logits: ArrayLike,
                          labels: ArrayLike, *, lambda_l: float, lambda_u: float,
                          alpha_ds: float, alpha_as: float,
                          beta: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """AdaDFQ generator loss without the BNS term: h + β·(α_ds·L_ds + α_as·L_as).

  The full L_G adds γ·`bn_stat_loss` (γ = 1 in the released configs). There is no plain
  CE(t, y) term.

  Args:
    teacher_logits, student_logits: [B, C]. labels: [B].
    lambda_l, lambda_u, alpha_ds, alpha_as, beta: hyperparameters (§5.2).

  Returns:
    (scalar, {'margin', 'ds', 'as'} scalars).

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869).
  """
  terms = adadfq_generator_losses(teacher_logits, student_logits, labels,
                                  lambda_l=lambda_l, lambda_u=lambda_u)
  total = terms["margin"] + beta * (alpha_ds * terms["ds"] + alpha_as * terms["as"])
  return total, {k: terms[k] for k in ("margin", "ds", "as")}


def adadfq_student_loss(teacher_logits: ArrayLike, student_logits: ArrayLike, *,
                        temperature: float) -> Array:
  """AdaDFQ's student loss (code form): −T²·mean_b H(softmax((t − q)/T)).

  Maximises the entropy of the disagreement distribution, i.e. pushes t − q towards a
  constant vector. T = 20 (CIFAR) / 5 (ImageNet) in the released code. Stop the
  teacher's gradient at the call site.

  Args:
    teacher_logits: [B, C]. student_logits: [B, C]. temperature: T.

  Returns:
    Scalar.

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), trainer `loss_fn_kd`.
  """
  z = _float(teacher_logits) - _float(student_logits)
  return -temperature**2 * jnp.mean(entropy(z, temperature=temperature))
