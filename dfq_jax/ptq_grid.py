"""The PTQ table: calibration data x bit-widths x range observers, on one teacher.

    python -m dfq_jax.bench ptq --config configs/cifar10_resnet20.py --bits w4a4,w6a6,w8a8 \
        --out runs/ptq --config.teacher.weights=... --config.data.root=...

1. Synthesises the ZeroQ and the DSG set with the usual runs (`<out>/zeroq_ptq`,
   `<out>/dsg_ptq`: resumable, each with its results.json and diagnostics); synthesis does
   not depend on the bit-width, so each set is made once.
2. Calibration sets of the same size: ZeroQ samples, DSG samples, real training images
   (calib.split: the upper bound) and N(0, 1) noise (the data-free floor).
3. For every bit-width, set and observer (minmax, sample_mean, percentile, mse): the
   student's ranges from that set, then top-1 on the evaluation set.
4. Writes ptq_grid.json, ptq_grid.md (the table, the best observer per row marked, and
   synthesis / calibration wall times) and diversity.png / diversity.md (real vs ZeroQ vs
   DSG samples).
The best observer of a row is chosen on the evaluation set (as the papers choose their
settings); every observer's number is in the table.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dfq_jax import config_base, networks, xla_options
from dfq_jax import metrics as metrics_lib
from dfq_jax import run as run_lib
from dfq_jax.data import eval_set as eval_set_lib
from dfq_jax.evaluate import evaluate_across_hosts
from dfq_jax.models import teacher as teacher_lib
from dfq_jax.ptq import diagnostics, pipeline, synthesis
from dfq_jax.quant.numerics import OBSERVERS

SOURCES = ("zeroq", "dsg", "real", "noise")


def ptq_grid(config, bits: list[str], out: str, *, observers=OBSERVERS, log=print) -> dict:
  """Runs the grid of the module docstring; returns the table as a dict."""
  os.makedirs(out, exist_ok=True)
  sets, runs = {}, {}
  # Both synthetic sets get the size of `config.ptq.batch_size` (64 unless overridden), so
  # the calibration sets compare at equal size; a `zeroq_ptq` run on its own synthesises
  # the ZeroQ code's 32.
  set_size = int(config.ptq.batch_size)
  for method, name in (("zeroq_ptq", "zeroq"), ("dsg_ptq", "dsg")):
    c = config_base.with_flags(config, [method, bits[0]])
    with c.unlocked():
      c.ptq.batch_size = set_size
    workdir = os.path.join(out, method)
    runs[name] = run_lib.run(c, workdir, log=log)
    sets[name], _ = synthesis.load_samples(
      os.path.join(workdir, pipeline.SAMPLES_FILE), (c.image_size, c.image_size, c.channels)
    )
  count = len(sets["dsg"])
  norm = eval_set_lib.normalization(config)
  sets["real"] = eval_set_lib.real_images(config, norm, config.calib.split, count)
  sets["noise"] = np.asarray(
    jax.random.normal(
      jax.random.key(config.seed + 7),
      (count, config.image_size, config.image_size, config.channels),
    )
  )
  teacher_vars = teacher_lib.load_teacher(config, os.path.join(out, "dsg_ptq"))
  eval_set = eval_set_lib.load_eval_set(config)

  def top1(model, variables):
    r = evaluate_across_hosts(
      [(model.apply, variables)],
      eval_set.images,
      eval_set.labels,
      norm.mean,
      norm.std,
      config.data.eval_batch_size,
      num_classes=config.num_classes,
      names=["model"],
      compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
    )
    return 100 * float(r.top1[0])

  table = {
    "fp_top1": runs["dsg"]["fp_top1"],
    "eval_images": len(eval_set),
    "calibration_images": count,
    "synthesis_s": {k: runs[k]["synthesis_s"] for k in ("zeroq", "dsg")},
    "cells": {},
  }
  for b in bits:
    c = config_base.with_flags(config, [b])
    models = networks.build_models(c, teacher_vars)
    for source in SOURCES:
      for observer in observers:
        c.calib.method = observer
        variables, seconds = pipeline.calibrate(c, models, sets[source])
        acc = top1(models.student, variables)
        table["cells"][f"{b},{source},{observer}"] = {"top1": acc, "calibration_s": seconds}
        log(f"{b} {source:5s} {observer:11s} top-1 {acc:.2f} % (calibration {seconds:.1f} s)")
  named = {
    "real": diagnostics.diversity_stats(models.teacher, teacher_vars, sets["real"]),
    "zeroq": diagnostics.diversity_stats(models.teacher, teacher_vars, sets["zeroq"]),
    "dsg": diagnostics.diversity_stats(models.teacher, teacher_vars, sets["dsg"]),
  }
  table["diversity"] = {
    k: {m: v for m, v in s.items() if m != "per_layer"} for k, s in named.items()
  }
  diagnostics.plot_diversity(named, os.path.join(out, "diversity.png"))
  with open(os.path.join(out, "diversity.md"), "w") as f:
    f.write(diagnostics.format_table(named) + "\n")
  metrics_lib.write_json_atomic(os.path.join(out, "ptq_grid.json"), table)
  with open(os.path.join(out, "ptq_grid.md"), "w") as f:
    f.write(format_grid(table, bits, observers) + "\n")
  return table


def format_grid(table: dict, bits: list[str], observers=OBSERVERS) -> str:
  """Markdown: one row per (bits, calibration set), one column per observer, best in bold."""
  names = {
    "zeroq": "ZeroQ samples",
    "dsg": "DSG samples",
    "real": "real train images",
    "noise": "N(0,1) noise",
  }
  lines = [
    f"| bits | calibration set ({table['calibration_images']} images) | "
    + " | ".join(observers)
    + " |",
    "|---|---|" + "---|" * len(observers),
  ]
  for b in bits:
    for source in SOURCES:
      accs = [table["cells"][f"{b},{source},{o}"]["top1"] for o in observers]
      best = max(accs)
      cells = [f"**{a:.2f}**" if a == best else f"{a:.2f}" for a in accs]
      lines.append(f"| {b.upper()} | {names[source]} | " + " | ".join(cells) + " |")
  lines.append(
    f"\nFP top-1 {table['fp_top1']:.2f} on {table['eval_images']} images. "
    f"Synthesis wall time: ZeroQ {table['synthesis_s']['zeroq']:.0f} s, DSG "
    f"{table['synthesis_s']['dsg']:.0f} s. Best observer per row in bold "
    "(chosen on the evaluation set)."
  )
  median = lambda o: float(
    np.median([v["calibration_s"] for k, v in table["cells"].items() if k.endswith("," + o)])
  )
  lines.append(
    "Calibration wall time per cell (median, jit compile included): "
    + ", ".join(f"{o} {median(o):.1f} s" for o in observers)
    + "."
  )
  return "\n".join(lines)
