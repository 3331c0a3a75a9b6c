"""Top-1 / top-5 evaluation of one or more classifiers on an in-memory uint8 image set.

    results = evaluate([teacher_fn, student_fn], ds.images, ds.labels,
                       IMAGENET_NORM.mean, IMAGENET_NORM.std, batch_size=200,
                       num_classes=ds.num_classes)
    print(results.summary())

Each model is either a callable `logits = f(x)` or a pair `(apply, variables)` meaning
`apply(variables, x)` (e.g. `(model.apply, variables)`; the variables are then jit
arguments rather than constants baked into the compiled program). x is float32 NHWC,
normalised on device as (u8 / 255 - mean) / std (torchvision ToTensor + Normalize).

All models run in one jitted step over fixed-size batches: the last batch is zero-padded
and its padding masked out, so the step compiles once. Results stay on device until the
end (one transfer); the host only waits so that at most a few batches are in flight.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dfq_jax import parallel
from dfq_jax.data.preprocess import ImageDataset, Normalization, get_normalization, normalize

_MAX_IN_FLIGHT = 2  # batches dispatched ahead of the last finished one

ModelSpec = "Callable[[jax.Array], jax.Array] | tuple[Callable[[Any, jax.Array], jax.Array], Any]"


@dataclasses.dataclass
class EvalResults:
  """Per-model accuracy on N images.

  Attributes:
    names: model names.
    n: number of images.
    num_classes: C.
    topk: k of the top-k accuracy (5, or C if C < 5).
    top1, top5: [M] accuracies in [0, 1] (`top5` is top-`topk`).
    correct1, correct5: [M] int counts.
    predictions: int32 [M, N] top-1 predicted class.
    agreement: [M] fraction of images where model m's top-1 equals model 0's (1.0 for m=0).
    per_class_top1: [M, C] top-1 accuracy per true class (nan for classes without images).
    seconds: wall time of the evaluation loop (compile included).
  """

  names: tuple[str, ...]
  n: int
  num_classes: int
  topk: int
  top1: np.ndarray
  top5: np.ndarray
  correct1: np.ndarray
  correct5: np.ndarray
  predictions: np.ndarray
  agreement: np.ndarray
  per_class_top1: np.ndarray
  seconds: float
  class_counts: np.ndarray | None = None  # [C] images per true class

  def summary(self) -> str:
    lines = [f"{self.n} images, {self.num_classes} classes, {self.seconds:.1f} s"]
    for m, name in enumerate(self.names):
      agree = "" if m == 0 else f"  agreement with {self.names[0]} {100 * self.agreement[m]:.2f}%"
      lines.append(
        f"  {name}: top-1 {100 * self.top1[m]:.2f}%  top-{self.topk} "
        f"{100 * self.top5[m]:.2f}%{agree}"
      )
    return "\n".join(lines)

  def as_dict(self) -> dict[str, Any]:
    return {
      name: {
        "top1": float(self.top1[m]),
        f"top{self.topk}": float(self.top5[m]),
        "agreement": float(self.agreement[m]),
      }
      for m, name in enumerate(self.names)
    }


def validate_labels(labels: np.ndarray, num_classes: int) -> None:
  """Raises ValueError unless every label is an integer in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D [N]; got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(
      f"{bad.size} of {labels.size} labels are outside [0, {num_classes}) (num_classes="
      f"{num_classes}): label range [{labels.min()}, {labels.max()}], first bad at index "
      f"{bad[0]} (label {labels[bad[0]]}). Does the model's class count match the data?"
    )


def _split_model(spec: Any) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """-> (g, variables) with logits = g(variables, x)."""
  if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]) and not callable(spec[1]):
    return spec[0], spec[1]
  if callable(spec):
    return (lambda _, x, f=spec: f(x)), None
  raise TypeError(
    f"A model must be a callable f(x) -> logits or a pair (apply, variables); "
    f"got {type(spec).__name__}."
  )


def _resolve_norm(mean: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(mean, str):
    mean = get_normalization(mean)
  if isinstance(mean, Normalization):
    if std is not None:
      raise ValueError("Pass std=None when mean is a Normalization or a preset name.")
    mean, std = mean.mean, mean.std
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def evaluate(
  apply_fns: "ModelSpec | Sequence[ModelSpec]",
  images_uint8: np.ndarray,
  labels: np.ndarray,
  mean: Any,
  std: Any = None,
  batch_size: int = 200,
  *,
  num_classes: int | None = None,
  names: Sequence[str] | None = None,
  compiler_options: dict | None = None,
) -> EvalResults:
  """Evaluates classifiers on uint8 images.

  Args:
    apply_fns: one model or a list; each `f(x) -> logits` or `(apply, variables)`.
      Model 0 is the reference for `agreement`.
    images_uint8: uint8 [N, H, W, 3] (anything sliceable to numpy batches works).
    labels: int [N], in [0, num_classes).
    mean, std: RGB normalisation constants on the [0, 1] scale; or `mean` a Normalization
      or a preset name (see NORMALIZATION_PRESETS) with std=None.
    batch_size: fixed batch size (the last batch is padded; capped at N).
    num_classes: C. Default: the models' logits width. Labels are checked against it, and
      every model must output C logits.
    names: model names for the summary (default model0, model1, ...).
    compiler_options: XLA options of the jitted batch step (`dfq_jax.xla_options`).
  Returns:
    EvalResults.
  """
  single = callable(apply_fns) or (
    isinstance(apply_fns, tuple)
    and len(apply_fns) == 2
    and callable(apply_fns[0])
    and not callable(apply_fns[1])
  )
  specs = [apply_fns] if single else list(apply_fns)
  if not specs:
    raise ValueError("evaluate needs at least one model.")
  fns, variables = zip(*(_split_model(s) for s in specs))
  names = tuple(names) if names is not None else tuple(f"model{m}" for m in range(len(specs)))
  if len(names) != len(specs):
    raise ValueError(f"{len(names)} names for {len(specs)} models.")
  mean_a, std_a = _resolve_norm(mean, std)
  n, labels, image_shape = _checked_inputs(images_uint8, labels, batch_size)
  bsz = min(int(batch_size), n)
  if num_classes is not None:
    validate_labels(labels, num_classes)  # before paying for the compile
  # Trace and compile the step once; the models' logits widths are read while tracing.
  resolved: dict[str, int] = {}
  step = _batch_step(fns, names, mean_a, std_a, bsz, num_classes, resolved)
  t0 = time.perf_counter()
  compiled = (
    jax.jit(step, compiler_options=compiler_options)
    .trace(
      variables,
      jax.ShapeDtypeStruct((bsz,) + image_shape, jnp.uint8),
      jax.ShapeDtypeStruct((bsz,), jnp.int32),
    )
    .lower()
    .compile()
  )
  num_classes, k = resolved["num_classes"], resolved["k"]
  validate_labels(labels, num_classes)
  labels32 = labels.astype(np.int32)
  predictions, hits = _run_batches(compiled, variables, images_uint8, labels32, bsz)
  return _results(names, predictions, hits, labels32, num_classes, k, time.perf_counter() - t0)


def _checked_inputs(images_uint8, labels, batch_size):
  """(N, labels as numpy, image shape) after checking shapes and dtypes."""
  n = len(images_uint8)
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape [N={n}]; got {labels.shape}.")
  if n == 0:
    raise ValueError("evaluate got an empty image set.")
  first = np.asarray(images_uint8[:1])
  if first.dtype != np.uint8 or first.ndim != 4 or first.shape[-1] != 3:
    raise ValueError(
      f"images must be uint8 [N, H, W, 3]; got {first.dtype} "
      f"[N, {', '.join(map(str, first.shape[1:]))}]."
    )
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  return n, labels, first.shape[1:]


def _batch_step(fns, names, mean_a, std_a, bsz, num_classes, resolved):
  """The per-batch function: (variables, uint8 batch, labels) -> (top-1 [M, B], top-5 hit
  [M, B]); records the class count and k in `resolved` while it is traced."""

  def step(variables, batch_u8, batch_labels):
    x = normalize(batch_u8, mean_a, std_a)
    all_logits = [g(v, x) for g, v in zip(fns, variables)]
    widths = []
    for m, logits in enumerate(all_logits):
      if logits.ndim != 2 or logits.shape[0] != bsz:
        raise ValueError(
          f"Model {names[m]} must return logits [B, C]; got {logits.shape} for a batch of {bsz}."
        )
      widths.append(int(logits.shape[1]))
    c = num_classes
    if c is None:
      if len(set(widths)) != 1:
        raise ValueError(f"The models output different class counts {widths}; pass num_classes.")
      c = widths[0]
    for m, w in enumerate(widths):
      if w != c:
        raise ValueError(f"Model {names[m]} outputs {w} logits but num_classes={c}.")
    k = min(5, c)
    resolved.update(num_classes=c, k=k)
    preds, hits = [], []
    for logits in all_logits:
      _, top = jax.lax.top_k(logits, k)  # ties: lowest index first, like argmax
      preds.append(top[:, 0].astype(jnp.int32))
      hits.append(jnp.any(top == batch_labels[:, None], axis=1))
    return jnp.stack(preds), jnp.stack(hits)

  return step


def _run_batches(compiled, variables, images_uint8, labels32, bsz):
  """Predictions [M, N] and top-5 hits [M, N] over all images (last batch padded)."""
  n = len(labels32)
  image_shape = np.asarray(images_uint8[:1]).shape[1:]
  outs = []
  for start in range(0, n, bsz):
    stop = min(start + bsz, n)
    xb = np.asarray(images_uint8[start:stop])
    yb = labels32[start:stop]
    if stop - start < bsz:  # pad the last batch to the compiled shape
      pad = bsz - (stop - start)
      xb = np.concatenate([xb, np.zeros((pad,) + image_shape, np.uint8)])
      yb = np.concatenate([yb, np.zeros((pad,), np.int32)])
    outs.append(compiled(variables, xb, yb))  # dispatched asynchronously
    if len(outs) > _MAX_IN_FLIGHT:
      # Bound the queued input batches (ImageNet: 30 MB each) without fetching results.
      jax.block_until_ready(outs[-1 - _MAX_IN_FLIGHT])
  preds_b, hits_b = jax.device_get(([o[0] for o in outs], [o[1] for o in outs]))  # one sync
  predictions = np.concatenate(preds_b, axis=1)[:, :n]  # drop the padding
  hits = np.concatenate(hits_b, axis=1)[:, :n]
  return predictions, hits


def _results(names, predictions, hits, labels32, num_classes, k, seconds) -> "EvalResults":
  n = len(labels32)
  correct1 = (predictions == labels32[None]).sum(axis=1)
  correct5 = hits.sum(axis=1)
  agreement = (predictions == predictions[:1]).mean(axis=1)
  counts = np.bincount(labels32, minlength=num_classes)
  per_class = np.stack(
    [np.bincount(labels32, weights=(p == labels32), minlength=num_classes) for p in predictions]
  )
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class_top1 = per_class / counts[None]
  return EvalResults(
    names=names,
    n=n,
    num_classes=num_classes,
    topk=k,
    top1=correct1 / n,
    top5=correct5 / n,
    correct1=correct1,
    correct5=correct5,
    predictions=predictions.astype(np.int32),
    agreement=agreement,
    per_class_top1=per_class_top1,
    seconds=seconds,
    class_counts=counts,
  )


def evaluate_dataset(
  apply_fns: "ModelSpec | Sequence[ModelSpec]",
  dataset: ImageDataset,
  normalization: "str | Normalization",
  batch_size: int = 200,
  *,
  names: Sequence[str] | None = None,
) -> EvalResults:
  """`evaluate` on an ImageDataset, with num_classes from its class names."""
  norm = get_normalization(normalization) if isinstance(normalization, str) else normalization
  return evaluate(
    apply_fns,
    dataset.images,
    dataset.labels,
    norm.mean,
    norm.std,
    batch_size,
    num_classes=dataset.num_classes,
    names=names,
  )


def host_counts(results: EvalResults) -> np.ndarray:
  """The additive counts of one host's EvalResults: [n, correct1[M], correct5[M],
  agreements[M], per-class correct[M*C], per-class count[C]] (float64)."""
  agree = np.rint(results.agreement * results.n)
  per_class_correct = np.nan_to_num(results.per_class_top1 * results.class_counts[None])
  return np.concatenate(
    [
      [results.n],
      results.correct1,
      results.correct5,
      agree,
      np.rint(per_class_correct).ravel(),
      results.class_counts,
    ]
  ).astype(np.float64)


def combine_host_counts(
  counts: np.ndarray, names, num_classes: int, topk: int, seconds: float
) -> EvalResults:
  """EvalResults of the whole set from the stacked `host_counts` of every host [P, K]."""
  total = np.asarray(counts, np.float64).sum(axis=0)
  m = len(names)
  n = int(total[0])
  c1, c5, agree = (total[1 + i * m : 1 + (i + 1) * m] for i in range(3))
  pcc = total[1 + 3 * m : 1 + 3 * m + m * num_classes].reshape(m, num_classes)
  class_counts = total[1 + 3 * m + m * num_classes :]
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = pcc / class_counts[None]
  return EvalResults(
    names=tuple(names),
    n=n,
    num_classes=num_classes,
    topk=topk,
    top1=c1 / n,
    top5=c5 / n,
    correct1=c1.astype(np.int64),
    correct5=c5.astype(np.int64),
    predictions=np.zeros((m, 0), np.int32),
    agreement=agree / n,
    per_class_top1=per_class,
    seconds=seconds,
    class_counts=class_counts.astype(np.int64),
  )


def evaluate_across_hosts(
  apply_fns,
  images_uint8,
  labels,
  mean,
  std=None,
  batch_size=200,
  *,
  num_classes: int,
  names: Sequence[str],
  compiler_options: dict | None = None,
) -> EvalResults:
  """`evaluate` sharded over the processes of a multi-host run, counts summed.

  Host p evaluates images[p::P] with host-local copies of the (replicated) variables;
  the counts are gathered with `process_allgather`. With one process this is `evaluate`.
  Predictions are not gathered (the result's `predictions` is empty).
  """
  count = jax.process_count()
  if count == 1:
    return evaluate(
      apply_fns,
      images_uint8,
      labels,
      mean,
      std,
      batch_size,
      num_classes=num_classes,
      names=names,
      compiler_options=compiler_options,
    )
  specs = [(f, parallel.to_host(v)) for f, v in (_split_model(s) for s in apply_fns)]
  index = jax.process_index()
  local = evaluate(
    specs,
    images_uint8[index::count],
    np.asarray(labels)[index::count],
    mean,
    std,
    batch_size,
    num_classes=num_classes,
    names=names,
    compiler_options=compiler_options,
  )
  gathered = multihost_utils.process_allgather(host_counts(local))
  return combine_host_counts(np.asarray(gathered), names, num_classes, local.topk, local.seconds)
