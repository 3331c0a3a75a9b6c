r"""Top-1 against model size: uniform bit-widths and mixed-precision budgets (bench mixed).

  python -m dfq_jax.bench mixed --config configs/cifar10_resnet20.py:eval,w4a8 \
      --uniform 2,3,4,5,6,8 --budgets 2.5,3,3.5,4,5,6 --sources dsg,real --out runs/mixed \
      --config.teacher.weights=... --config.data.root=...

Every point is a real run of the config (its own workdir under --out, resumable: a
finished one is read back): `uniform_w<b>` with quant.w_bits=b, and `<source>_w<B>`
with quant.mixed.budget_w_bits=B whose sensitivities are measured once per source (the
first budget) and reused by the others (quant.mixed.sensitivity_path), as are its
synthesised images for the refinement (quant.mixed.samples_path). Writes
pareto.json, pareto.md and pareto.png (top-1 against the kernels' size in KiB).
"""

from __future__ import annotations

import copy
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dfq_jax import metrics as metrics_lib
from dfq_jax import run as run_lib
from dfq_jax.quant import mixed
from dfq_jax.quant.config import policy_from_config


def _run(config, workdir: str, log) -> dict:
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    run_lib.prepare_workdir(workdir, config, restart=False)  # refuses another config
    with open(done) as f:
      return json.load(f)
  return run_lib.run(config, workdir, log=log)


def _top1(results: dict) -> float:
  return results["quant_top1"] if "quant_top1" in results else results["final_top1"]


def _point(series: str, label: str, results: dict, size_kib: float, avg_bits: float) -> dict:
  return {
    "series": series,
    "label": label,
    "top1": _top1(results),
    "weight_size_kib": size_kib,
    "avg_w_bits": avg_bits,
    "fp_top1": results["fp_top1"],
  }


def pareto(
  config, uniform: list[int], budgets: list[float], sources: list[str], out: str, log=print
) -> list[dict]:
  """Runs every uniform and mixed point; writes pareto.json/md/png under `out`."""
  os.makedirs(out, exist_ok=True)
  base = copy.deepcopy(config)
  with base.unlocked():
    base.quant.mixed.budget_w_bits = 0.0
  image_shape = (config.image_size, config.image_size, config.channels)
  slots = mixed.find_slots(mixed.probe_model(base), image_shape)
  points = []
  for b in uniform:
    c = copy.deepcopy(base)
    with c.unlocked():
      c.quant.w_bits = int(b)
    r = _run(c, os.path.join(out, f"uniform_w{b}"), log)
    policy = policy_from_config(c)
    size = mixed.weight_size_kib(policy, slots)
    points.append(_point("uniform", f"W{b}", r, size, mixed.average_bits(policy, slots, "w")))
  for source in sources:
    first = images = None
    for budget in budgets:
      c = copy.deepcopy(base)
      with c.unlocked():
        c.quant.mixed.budget_w_bits = float(budget)
        c.quant.mixed.source = source
        c.quant.mixed.sensitivity_path = first or ""
        c.quant.mixed.samples_path = images or c.quant.mixed.samples_path
      workdir = os.path.join(out, f"{source}_w{budget:g}")
      r = _run(c, workdir, log)
      if first is None:
        first = os.path.join(workdir, mixed.REPORT_FILE)
        saved = os.path.join(workdir, mixed.IMAGES_FILE)
        images = saved if os.path.exists(saved) else None
      m = r["mixed_precision"]
      points.append(
        _point(f"mixed ({source})", f"{budget:g}", r, m["weight_size_kib"], m["avg_w_bits"])
      )
  metrics_lib.write_json_atomic(os.path.join(out, "pareto.json"), points)
  with open(os.path.join(out, "pareto.md"), "w") as f:
    f.write(format_points(points))
  plot(points, os.path.join(out, "pareto.png"))
  return points


def format_points(points: list[dict]) -> str:
  """A markdown table: series, setting, average weight bits, size, top-1."""
  lines = [
    "| allocation | setting | avg weight bits | kernels KiB | top-1 % |",
    "|---|---|---|---|---|",
  ]
  for p in points:
    lines.append(
      f"| {p['series']} | {p['label']} | {p['avg_w_bits']:.2f} | "
      f"{p['weight_size_kib']:.1f} | {p['top1']:.2f} |"
    )
  return "\n".join(lines) + "\n"


def plot(points: list[dict], path: str) -> None:
  """Top-1 against the kernels' size, one line per series, the FP level dashed."""
  fig = Figure(figsize=(7.0, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for series in dict.fromkeys(p["series"] for p in points):
    chosen = sorted(
      (p for p in points if p["series"] == series), key=lambda p: p["weight_size_kib"]
    )
    marker = "s" if series == "uniform" else "o"
    ax.plot(
      [p["weight_size_kib"] for p in chosen],
      [p["top1"] for p in chosen],
      marker=marker,
      label=series,
    )
    for p in chosen:
      ax.annotate(
        p["label"],
        (p["weight_size_kib"], p["top1"]),
        fontsize=7,
        xytext=(3, -9),
        textcoords="offset points",
      )
  if points:
    ax.axhline(points[0]["fp_top1"], color="grey", linestyle="--", label="full precision")
  ax.set_xlabel("kernels (KiB)")
  ax.set_ylabel("top-1 %")
  ax.set_title("top-1 against weight size: uniform and mixed precision")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
