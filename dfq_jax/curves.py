"""Top-1 against iterations for finished or running training runs, as one PNG.

    python -m dfq_jax.bench curves --runs runs/a,runs/b [--labels A,B] --out curves.png

Each run's `metrics.jsonl` gives its `eval/top1` rows (one per evaluation: every
`eval_every_steps`); its `results.json`, once written, the FP top-1 and the no-training
floor (`quant_top1_before`), and before that the levels its evaluation rows carry
(`eval/fp_top1`, `eval/floor_top1`, written by the trainer). The plot draws one line
per run, the FP level of the first run that has one (dashed) and each run's floor
(dotted, in the run's colour).

`write_run_plot(workdir)` draws one run's top-1 and losses against steps into
`<workdir>/curves.png`; the trainer calls it after every evaluation.
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


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: pass the --workdir of a training run.")
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn last line of a run killed mid-write
  return rows


def write_run_plot(
  workdir: str, fp_top1: float | None = None, floor_top1: float | None = None
) -> str:
  """<workdir>/curves.png: eval top-1 (left) and the two losses (right) against steps."""
  rows = _rows(workdir)
  evals = [(r["step"], r["eval/top1"]) for r in rows if "eval/top1" in r]
  fig = Figure(figsize=(9, 3.4))
  FigureCanvasAgg(fig)
  ax_top1, ax_loss = fig.subplots(1, 2)
  if evals:
    ax_top1.plot(*zip(*evals), marker="o", ms=3, color="C0", label="student")
  if fp_top1 is not None:
    ax_top1.axhline(fp_top1, color="black", ls="--", lw=1, label=f"FP {fp_top1:.2f}")
  if floor_top1 is not None:
    ax_top1.axhline(floor_top1, color="C0", ls=":", lw=1, label=f"before {floor_top1:.2f}")
  ax_top1.set(xlabel="iteration", ylabel="top-1 (%)", title="evaluation top-1")
  ax_top1.legend(fontsize=8, loc="lower right")
  # Each loss on its own y axis: AdaDFQ's student loss (-T^2 H, about -900) would flatten
  # the generator's.
  for ax, key, color in (
    (ax_loss, "generator/loss", "C1"),
    (ax_loss.twinx(), "student/loss", "C2"),
  ):
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), color=color, lw=1)
    ax.set_ylabel(key, color=color)
  ax_loss.set(xlabel="iteration", title="losses")
  for ax in (ax_top1, ax_loss):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, "curves.png")
  tmp = path + ".tmp.png"
  fig.savefig(tmp, format="png", dpi=80)
  os.replace(tmp, path)
  return path


def read_curve(workdir: str, label: str | None = None) -> Curve:
  """The eval/top1 rows of `workdir`/metrics.jsonl and the FP / floor levels: of its
  results.json, else (a run still training) of its last evaluation row."""
  steps, top1, levels = [], [], {}
  for row in _rows(workdir):
    if "eval/top1" in row:
      steps.append(int(row["step"]))
      top1.append(float(row["eval/top1"]))
      levels = {k: row.get(f"eval/{k}") for k in ("fp_top1", "floor_top1")}
  curve = Curve(label or os.path.basename(os.path.normpath(workdir)), steps, top1)
  curve.fp_top1, curve.floor_top1 = levels.get("fp_top1"), levels.get("floor_top1")
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      r = json.load(f)
    curve.fp_top1, curve.floor_top1 = r.get("fp_top1"), r.get("quant_top1_before")
  return curve


def plot_curves(
  curves: list[Curve],
  path: str,
  *,
  fp_top1: float | None = None,
  title: str = "student top-1 during training",
) -> None:
  """Writes the PNG at `path`: top-1 vs iterations, FP and floor levels marked."""
  if not curves:
    raise ValueError("plot_curves needs at least one run.")
  fig = Figure(figsize=(8, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  fp = (
    fp_top1
    if fp_top1 is not None
    else next((c.fp_top1 for c in curves if c.fp_top1 is not None), None)
  )
  floors: dict[float, list[int]] = {}  # one dotted line per floor level (runs may share one)
  for i, c in enumerate(curves):
    ax.plot(c.steps, c.top1, marker="o", ms=3, color=f"C{i % 10}", label=c.label)
    if c.floor_top1 is not None:
      floors.setdefault(round(c.floor_top1, 2), []).append(i)
  for level, runs in floors.items():
    names = ", ".join(curves[i].label for i in runs)
    ax.axhline(level, color=f"C{runs[0] % 10}", ls=":", lw=1, label=f"floor {level:.2f} ({names})")
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
