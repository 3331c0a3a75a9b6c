"""Top-1 against iterations for finished or running training runs, as one PNG.

    python -m dfq_jax.bench curves --runs runs/a,runs/b [--labels A,B] --out curves.png

Each run's `metrics.jsonl` gives its `eval/top1` rows (one per evaluation: every
`eval_every_steps`); its `results.json`, once written, the FP top-1 and the no-training
floor (`quant_top1_before`). The plot draws one line per run, the FP level of the first
run that has one (dashed) and each run's floor (dotted, in the run's colour).
"""

from __future__ import annotations

import dataclasses
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclasses.dataclass
class Curve:
  """One run's evaluations: steps, top-1 (%), and its FP / floor levels if known."""
  label: str
  steps: list[int]
  top1: list[float]
  fp_top1: float | None = None
  floor_top1: float | None = None


def read_curve(workdir: str, label: str | None = None) -> Curve:
  """The eval/top1 rows of `workdir`/metrics.jsonl and the levels of its results.json."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: pass the --workdir of a training run.")
  steps, top1 = [], []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue   # a torn last line of a run killed mid-write
      if "eval/top1" in row:
        steps.append(int(row["step"]))
        top1.append(float(row["eval/top1"]))
  curve = Curve(label or os.path.basename(os.path.normpath(workdir)), steps, top1)
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      r = json.load(f)
    curve.fp_top1, curve.floor_top1 = r.get("fp_top1"), r.get("quant_top1_before")
  return curve


def plot_curves(curves: list[Curve], path: str, *, fp_top1: float | None = None,
                title: str = "student top-1 during training") -> None:
  """Writes the PNG at `path`: top-1 vs iterations, FP and floor levels marked."""
  if not curves:
    raise ValueError("plot_curves needs at least one run.")
  fig = Figure(figsize=(8, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  fp = fp_top1 if fp_top1 is not None else next(
      (c.fp_top1 for c in curves if c.fp_top1 is not None), None)
  for i, c in enumerate(curves):
    color = f"C{i % 10}"
    ax.plot(c.steps, c.top1, marker="o", ms=3, color=color, label=c.label)
    if c.floor_top1 is not None:
      ax.axhline(c.floor_top1, color=color, ls=":", lw=1)
  if fp is not None:
    ax.axhline(fp, color="black", ls="--", lw=1, label=f"FP {fp:.2f}")
  ax.set_xlabel("iteration")
  ax.set_ylabel("top-1 (%)")
  ax.set_title(title + " (dotted: each run's floor without training)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png", dpi=100)
