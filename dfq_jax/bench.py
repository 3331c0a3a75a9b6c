r"""Benchmarks: speed of the training iteration, and the accuracy grid of the README.

  python -m dfq_jax.bench speed --config configs/cifar10_resnet20.py:adadfq,w4a4 \
      [--batch 16] [--steps 20] [--warmup 3]
prints one JSON line: median_step_s (median of --steps timed iterations after compile
and warm-up), images_per_s, compile_s, flops_per_step (XLA cost analysis of the compiled
step), achieved GFLOP/s, peak host memory, device kind and count. The teacher's weights
do not change the speed: without --config.teacher.weights a random teacher is used.

  python -m dfq_jax.bench accuracy --config configs/cifar10_resnet20.py \
      --methods gdfq,dsg,adadfq --bits w4a4,w3a3 --steps 2000 --seeds 3 --out runs/grid \
      --config.teacher.weights=... --config.data.root=...
runs every method x bits x seed (each in its own workdir under --out, resumable) and
writes grid.json and grid.md: mean +- std over seeds of final and best top-1, wall time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:args].",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None, "speed: global batch size (default: config's).")
_STEPS = flags.DEFINE_integer("steps", 20, "speed: timed iterations; accuracy: total_steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "speed: untimed iterations after compilation.")
_METHODS = flags.DEFINE_list("methods", ["gdfq", "dsg", "adadfq"], "accuracy: methods.")
_BITS = flags.DEFINE_list("bits", ["w4a4", "w3a3"], "accuracy: bit-widths.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "accuracy: seeds 0..K-1 per cell.")
_OUT = flags.DEFINE_string("out", "runs/grid", "accuracy: output directory.")


def speed(config, batch: int | None, steps: int, warmup: int) -> dict:
  """Times the full training iteration (generator step + student step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dfq_jax import experiment, trainer  # pylint: disable=g-import-not-at-top

  if batch:
    config.batch_size = batch
  shape = (1, config.image_size, config.image_size, config.channels)
  if config.teacher.weights:
    teacher_vars = experiment.load_teacher(config)
  else:
    teacher_vars = experiment.teacher_model(config).init(jax.random.key(0),
                                                        np.zeros(shape, np.float32))
  models = experiment.build_models(config, teacher_vars)
  setup = trainer.setup_training(config, models)
  state, teacher, constants, step = (setup.state, setup.teacher_vars, setup.constants,
                                     setup.step_fn)

  t0 = time.perf_counter()
  compiled = step.lower(state, teacher, constants, True).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  for _ in range(warmup):
    state, metrics = compiled(state, teacher, constants)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, teacher, constants)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {
      "method": config.method, "bits": f"w{config.quant.w_bits}a{config.quant.a_bits}",
      "model": config.teacher.model, "batch": config.batch_size,
      "median_step_s": median, "min_step_s": min(times), "max_step_s": max(times),
      "images_per_s": config.batch_size / median, "compile_s": compile_s,
      "flops_per_step": flops, "gflops_per_s": flops / median / 1e9,
      "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
      "timed_steps": steps,
  }


def accuracy(config, methods_: list[str], bits: list[str], steps: int, seeds: int,
             out: str) -> dict:
  """Runs the methods x bits x seeds grid; writes grid.json and grid.md under `out`."""
  import copy  # pylint: disable=g-import-not-at-top
  from dfq_jax import config_base  # pylint: disable=g-import-not-at-top
  from dfq_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from dfq_jax import run as run_lib  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  cells = {}
  for m in methods_:
    for b in bits:
      runs = []
      for seed in range(seeds):
        c = copy.deepcopy(config)
        with c.unlocked():
          config_base.apply_flags(c, [m, b])
          c.seed = seed
          if steps:
            c.total_steps = steps
        runs.append(run_lib.run(c, os.path.join(out, f"{m}_{b}_seed{seed}")))
      cells[f"{m},{b}"] = runs
  table = {}
  for key, runs in cells.items():
    def stat(name):
      values = [r[name] for r in runs]
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      return statistics.mean(values), std
    table[key] = {"final_top1": stat("final_top1"), "best_top1": stat("best_top1"),
                  "quant_top1_before": stat("quant_top1_before"),
                  "wall_s": stat("wall_s"), "seeds": len(runs),
                  "fp_top1": runs[0]["fp_top1"], "steps": runs[0]["steps"]}
  metrics_lib.write_json_atomic(os.path.join(out, "grid.json"), table)
  lines = ["| method | bits | before | final | best* | wall s/run | seeds |",
           "|---|---|---|---|---|---|---|"]
  for key, r in table.items():
    m, b = key.split(",")
    fmt = lambda v: f"{v[0]:.2f} ± {v[1]:.2f}" if r["seeds"] > 1 else f"{v[0]:.2f}"
    lines.append(f"| {m} | {b.upper()} | {fmt(r['quant_top1_before'])} | "
                 f"{fmt(r['final_top1'])} | {fmt(r['best_top1'])} | {r['wall_s'][0]:.0f} | "
                 f"{r['seeds']} |")
  lines.append("\n* best: selected on the evaluation set, as the papers report.")
  with open(os.path.join(out, "grid.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return table


def main(argv):
  if len(argv) != 2 or argv[1] not in ("speed", "accuracy"):
    raise app.UsageError("usage: python -m dfq_jax.bench speed|accuracy --config FILE[:args] ...")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. configs/cifar10_resnet20.py:adadfq,w4a4")
  if argv[1] == "speed":
    print(json.dumps(speed(config, _BATCH.value, _STEPS.value, _WARMUP.value)))
  else:
    accuracy(config, _METHODS.value, _BITS.value, _STEPS.value, _SEEDS.value, _OUT.value)
    with open(os.path.join(_OUT.value, "grid.md")) as f:
      print(f.read())


if __name__ == "__main__":
  app.run(main)
