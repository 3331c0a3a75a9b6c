"""The exported model in ONNX Runtime: logits and top-1 on a run's real evaluation set."""

from __future__ import annotations

import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from dfq_jax.data.preprocess import normalize


def session(model_bytes: bytes, optimize: bool = True) -> ort.InferenceSession:
  """A CPU session; `optimize=False` runs the graph as written (no fusions)."""
  options = ort.SessionOptions()
  options.graph_optimization_level = (
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimize
    else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  )
  return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def logits(
  sess: ort.InferenceSession, images_uint8: np.ndarray, mean, std, batch_size: int = 500
) -> np.ndarray:
  """Logits [N, C] of uint8 NHWC images, normalised as the teacher was trained (NCHW in)."""
  out = []
  for start in range(0, len(images_uint8), batch_size):
    x = normalize(images_uint8[start : start + batch_size], mean, std)
    out.append(sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0])
  return np.concatenate(out)


def latency(sess: ort.InferenceSession, shape, repeats: int = 20) -> float:
  """Median seconds of one call on a random float32 NCHW batch of `shape` (after 3 warm-up
  calls)."""
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  for _ in range(3):
    sess.run(None, {"input": x})
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    sess.run(None, {"input": x})
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def kernel_counts(model_bytes: bytes) -> dict[str, int]:
  """Op types of ORT's optimised graph (which kernels it runs), with their counts."""
  with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = f.name
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(f.name).graph
  counts: dict[str, int] = {}
  for node in graph.node:
    counts[node.op_type] = counts.get(node.op_type, 0) + 1
  return counts
