"""Diversity diagnostics for sets of images as the teacher sees them (real, ZeroQ, DSG).

DSG's argument (Zhang et al., "Diversifying Sample Generation for Accurate Data-Free
Quantization", CVPR 2021, arXiv:2103.01049; Qin et al., "Diverse Sample Generation: Pushing
the Limit of Generative Data-free Quantization", TPAMI, arXiv:2109.00212; methods.md §4) is
that ZeroQ's samples are homogeneous: every sample is pushed onto the same BN running
statistics, so the samples' per-sample statistics barely differ from each other, whereas
real images (and DSG samples, with slack alignment and layerwise enhancement) spread
around them. The functions here make this measurable for any set of images.

Definitions. For a BN layer with per-sample input means mu[b, c] and per-sample stds
s[b, c] = sqrt(var[b, c] + eps) (biased variance over H, W, as `BatchNorm` stores them in
`bn_stats`), running mean m[c] and running std r[c] = sqrt(running_var[c] + eps), eps=1e-5:

  mean_spread = mean_c( std_b(mu[b, c]) / r[c] )        how much samples differ
  std_spread  = mean_c( std_b(s[b, c]) / r[c] )          from each other
  mean_gap    = mean_c( mean_b |mu[b, c] - m[c]| / r[c] )  how far samples are from
  std_gap     = mean_c( mean_b |s[b, c] - r[c]| / r[c] )   the running statistics

(std_b is the population standard deviation over the samples, ddof=0), all in units of the
channel's running std. The set-level values are the averages over layers.

  cosine_images   = mean over pairs i != j of cos(x_i, x_j), x_i the flattened image;
  cosine_features = the same for per-sample feature vectors f_i, the concatenation over
                    layers (network order) of the standardised BN-input means
                    (mu[i, c] - m[c]) / r[c].

The mean off-diagonal cosine is computed exactly, without forming the Gram matrix: with
rows u_i = x_i / ||x_i|| (0 for a zero row), sum_{i != j} u_i.u_j = ||sum_i u_i||^2 -
sum_i ||u_i||^2, accumulated in float64 over row blocks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dfq_jax.losses import layer_items, lookup_layer
from dfq_jax.models.layers import BN_STATS

EPS = 1e-5
METRICS = ("mean_spread", "std_spread", "mean_gap", "std_gap")
_COSINE_BLOCK = 256

Tree = Any


def _layer_arrays(node: Mapping, running: Mapping, path: tuple, eps: float):
  """(mu [B, C], s [B, C], m [C], r [C]) in float64."""
  mu = np.asarray(node["mean"], np.float64)
  var = np.asarray(node["var"], np.float64)
  m = np.asarray(running["mean"], np.float64)
  rv = np.asarray(running["var"], np.float64)
  name = "/".join(map(str, path))
  if mu.ndim != 2 or var.shape != mu.shape:
    raise ValueError(
      f"{name}: per-sample statistics must be [B, C]; got mean {mu.shape}, var {var.shape}."
    )
  if m.shape != mu.shape[1:] or rv.shape != mu.shape[1:]:
    raise ValueError(
      f"{name}: running statistics must be [{mu.shape[1]}]; got mean {m.shape}, var {rv.shape}."
    )
  return mu, np.sqrt(var + eps), m, np.sqrt(rv + eps)


def spread_from_stats(bn_stats: Tree, running: Tree, *, eps: float = EPS) -> dict:
  """Spread/gap metrics (module docstring) from per-sample stats and running stats.

  Args:
    bn_stats: tree of {'mean': [B, C], 'var': [B, C]} per-sample BN-input statistics;
      layers are reported in its iteration order.
    running: tree with the same paths holding {'mean': [C], 'var': [C]}.
    eps: added to both variances before the square root.

  Returns:
    {'per_layer': [{'layer', 'mean_spread', 'std_spread', 'mean_gap', 'std_gap'}, ...],
     'mean_spread', 'std_spread', 'mean_gap', 'std_gap'} (layer averages), plain floats.
  """
  per_layer = []
  for path, node in layer_items(bn_stats):
    mu, s, m, r = _layer_arrays(node, lookup_layer(running, path), path, eps)
    per_layer.append(
      {
        "layer": "/".join(map(str, path)),
        "mean_spread": float(np.mean(np.std(mu, axis=0) / r)),
        "std_spread": float(np.mean(np.std(s, axis=0) / r)),
        "mean_gap": float(np.mean(np.mean(np.abs(mu - m), axis=0) / r)),
        "std_gap": float(np.mean(np.mean(np.abs(s - r), axis=0) / r)),
      }
    )
  if not per_layer:
    raise ValueError("The BN-statistics tree holds no {'mean', 'var'} layer nodes.")
  out = {"per_layer": per_layer}
  for key in METRICS:
    out[key] = float(np.mean([layer[key] for layer in per_layer]))
  return out


def bn_features(bn_stats: Tree, running: Tree, *, eps: float = EPS) -> np.ndarray:
  """Per-sample features [B, sum_l C_l]: (mu[b, c] - m[c]) / r[c], layers concatenated."""
  feats = []
  for path, node in layer_items(bn_stats):
    mu, _, m, r = _layer_arrays(node, lookup_layer(running, path), path, eps)
    feats.append((mu - m) / r)
  if not feats:
    raise ValueError("The BN-statistics tree holds no {'mean', 'var'} layer nodes.")
  return np.concatenate(feats, axis=1)


def mean_pairwise_cosine(rows) -> float:
  """Mean cosine similarity over ordered pairs i != j of the flattened rows of `rows`.

  Exact (float64): ||sum_i u_i||^2 - sum_i ||u_i||^2 over N(N-1), u_i the l2-normalised
  rows (a zero row counts as similarity 0 with everything). Needs N >= 2.
  """
  n = len(rows)
  if n < 2:
    raise ValueError(f"mean pairwise cosine needs at least 2 rows; got {n}.")
  total = None
  diag = 0.0
  for start in range(0, n, _COSINE_BLOCK):
    block = np.asarray(rows[start : start + _COSINE_BLOCK], np.float64).reshape(
      min(_COSINE_BLOCK, n - start), -1
    )
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    u = np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)
    part = u.sum(axis=0)
    total = part if total is None else total + part
    diag += float(np.sum(u * u))
  return float((np.dot(total, total) - diag) / (n * (n - 1)))


@functools.partial(jax.jit, static_argnums=0)
def _forward_stats(model, variables, images):
  _, updates = model.apply(variables, images, mutable=[BN_STATS])
  return updates[BN_STATS]


def _network_order(model, variables, sample) -> list[tuple]:
  """Layer paths in the order the layers ran (jit outputs come back in sorted key order)."""
  order = []

  def trace(v, x):
    _, updates = model.apply(v, x, mutable=[BN_STATS])
    order.extend(path for path, _ in layer_items(updates[BN_STATS]))
    return updates[BN_STATS]

  jax.eval_shape(trace, variables, sample)
  return order


def _nest(items: list[tuple[tuple, dict]]) -> dict:
  tree: dict = {}
  for path, node in items:
    parent = tree
    for key in path[:-1]:
      parent = parent.setdefault(key, {})
    parent[path[-1]] = node
  return tree


def diversity_stats(model, variables, images, *, batch_size: int = 256) -> dict:
  """Diversity of `images` in the teacher's eyes (definitions in the module docstring).

  Args:
    model: linen teacher whose `BatchNorm`s store per-sample input statistics in `bn_stats`.
    variables: its variables; `variables['batch_stats']` holds the running statistics.
    images: [N, H, W, C] images in the model's normalised input space, N >= 2.
    batch_size: forward batch size. Every batch, the last one padded, has
      min(batch_size, N) images, so the forward compiles once.

  Returns:
    JSON-able dict: 'per_layer' (network order), 'mean_spread', 'std_spread', 'mean_gap',
    'std_gap', 'cosine_images', 'cosine_features', 'num_images'.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}.")
  n = images.shape[0]
  if n < 2:
    raise ValueError(f"diversity needs at least 2 images; got {n}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  if "batch_stats" not in variables:
    raise KeyError("variables has no 'batch_stats' (the teacher's running statistics).")
  running = variables["batch_stats"]
  bs = min(batch_size, n)

  order = _network_order(model, variables, images[:bs])
  chunks: dict[tuple, dict[str, list]] = {path: {"mean": [], "var": []} for path in order}
  for start in range(0, n, bs):
    batch = images[start : start + bs]
    valid = batch.shape[0]
    if valid < bs:
      pad = np.repeat(batch[-1:], bs - valid, axis=0)
      batch = np.concatenate([batch, pad], axis=0)
    stats = jax.device_get(_forward_stats(model, variables, batch))
    for path, node in layer_items(stats):
      chunks[path]["mean"].append(np.asarray(node["mean"])[:valid])
      chunks[path]["var"].append(np.asarray(node["var"])[:valid])
  bn_stats = _nest(
    [(path, {k: np.concatenate(v, axis=0) for k, v in chunks[path].items()}) for path in order]
  )

  out = spread_from_stats(bn_stats, running)
  out["cosine_images"] = mean_pairwise_cosine(images)
  out["cosine_features"] = mean_pairwise_cosine(bn_features(bn_stats, running))
  out["num_images"] = int(n)
  return out


def plot_diversity(named_stats: dict[str, dict], path: str) -> None:
  """Writes one PNG comparing sets: per-layer mean_spread, per-layer std_spread, cosines."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError("plot_diversity needs matplotlib: pip install matplotlib") from e
  if not named_stats:
    raise ValueError("plot_diversity needs at least one set of statistics.")

  fig = Figure(figsize=(15, 4.2))
  FigureCanvasAgg(fig)
  ax_mean, ax_std, ax_cos = fig.subplots(1, 3)
  for name, stats in named_stats.items():
    layers = stats["per_layer"]
    x = np.arange(len(layers))
    ax_mean.plot(x, [layer["mean_spread"] for layer in layers], marker="o", ms=3, label=name)
    ax_std.plot(x, [layer["std_spread"] for layer in layers], marker="o", ms=3, label=name)
  for ax, title in ((ax_mean, "mean_spread per layer"), (ax_std, "std_spread per layer")):
    ax.set_title(title)
    ax.set_xlabel("BN layer index")
    ax.set_ylabel("std over samples / running std")
    ax.grid(alpha=0.3)
    ax.legend()

  keys = ("cosine_images", "cosine_features")
  width = 0.8 / len(named_stats)
  for i, (name, stats) in enumerate(named_stats.items()):
    ax_cos.bar(
      np.arange(len(keys)) + (i - (len(named_stats) - 1) / 2) * width,
      [stats[k] for k in keys],
      width,
      label=name,
    )
  ax_cos.set_xticks(np.arange(len(keys)), keys)
  ax_cos.set_title("mean pairwise cosine (lower = more diverse)")
  ax_cos.axhline(0.0, color="black", lw=0.8)
  ax_cos.grid(axis="y", alpha=0.3)
  ax_cos.legend()

  fig.tight_layout()
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)


def format_table(named_stats: dict[str, dict]) -> str:
  """Markdown table, one row per set."""
  cols = ("mean_spread", "std_spread", "mean_gap", "std_gap", "cosine_images", "cosine_features")
  lines = ["| set | images | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
  for name, stats in named_stats.items():
    values = " | ".join(f"{stats[c]:.4f}" for c in cols)
    lines.append(f"| {name} | {stats['num_images']} | {values} |")
  return "\n".join(lines)
