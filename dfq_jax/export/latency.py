r"""python -m dfq_jax.export.latency A.onnx B.onnx ... [--batch 100] [--calls 20] [--rounds 3]

File size and ONNX Runtime latency of exported models measured side by side in one run:
the models alternate (A B ... A B ...) for --rounds rounds, each round timing --calls calls
on one random float32 batch [--batch, 3, --size, --size] (after 3 warm-up calls; size
32 by default), and one JSON line per model gives the median of the round medians,
the round medians, the file size and the kernels of ORT's optimised graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import onnx

from dfq_jax.export import runtime


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


def main(argv=None):
  # argparse, not absl flags: absl's are global, and `--batch` is bench's flag already.
  parser = argparse.ArgumentParser(prog="python -m dfq_jax.export.latency")
  parser.add_argument("models", nargs="+", help="exported .onnx files")
  parser.add_argument("--batch", type=int, default=100, help="images per call")
  parser.add_argument("--calls", type=int, default=20, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
  parser.add_argument("--size", type=int, default=32, help="input height and width")
  args = parser.parse_args(argv)
  try:
    rows = compare(args.models, args.batch, args.calls, args.rounds, args.size)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  main()
