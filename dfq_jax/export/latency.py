r"""python -m dfq_jax.export.latency A.onnx B.onnx ... [--batch 100] [--calls 20] [--rounds 3]

File size and ONNX Runtime latency of exported models measured side by side in one run:
the models alternate (A B ... A B ...) for --rounds rounds, each round timing --calls calls
on one random float32 batch [--batch, 3, H, W] (after 3 warm-up calls; H, W from the
model's metadata or 32), and one JSON line per model gives the median of the round medians,
the round medians, the file size and the kernels of ORT's optimised graph.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import onnx
from absl import app, flags

from dfq_jax.export import runtime

_BATCH = flags.DEFINE_integer("batch", 100, "Images per call.")
_CALLS = flags.DEFINE_integer("calls", 20, "Timed calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_SIZE = flags.DEFINE_integer("size", 32, "Input height and width.")


def compare(paths: list[str], batch: int, calls: int, rounds: int, size: int) -> list[dict]:
  """One row per model: median latency of `rounds` alternating rounds, size, kernels."""
  for p in paths:
    if not os.path.isfile(p):
      raise ValueError(f"{p!r} is not a file: pass exported .onnx files.")
  data = {p: open(p, "rb").read() for p in paths}
  sessions = {p: runtime.session(data[p]) for p in paths}
  medians = {p: [] for p in paths}
  for _ in range(rounds):
    for p in paths:
      medians[p].append(runtime.latency(sessions[p], (batch, 3, size, size), repeats=calls))
  rows = []
  for p in paths:
    meta = {m.key: m.value for m in onnx.load_from_string(data[p]).metadata_props}
    rows.append(
      {
        "model": p,
        "bits": meta.get("bits", ""),
        "graph": meta.get("graph", ""),
        "file_kib": round(len(data[p]) / 1024, 1),
        "batch": batch,
        "latency_s": statistics.median(medians[p]),
        "round_medians_s": medians[p],
        "kernels": runtime.kernel_counts(data[p]),
      }
    )
  return rows


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("usage: python -m dfq_jax.export.latency A.onnx [B.onnx ...]")
  try:
    rows = compare(argv[1:], _BATCH.value, _CALLS.value, _ROUNDS.value, _SIZE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
