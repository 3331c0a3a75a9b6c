r"""Benchmarks: speed of the training iteration, and the accuracy grid of the README.

  python -m dfq_jax.bench speed --config configs/cifar10_resnet20.py:adadfq,w4a4 \
      [--batch 16] [--steps 20] [--warmup 3]
prints one JSON line: median_step_s (median of --steps timed iterations after compile
and warm-up), images_per_s, compile_s, flops_per_step (XLA cost analysis of the compiled
step), achieved GFLOP/s, peak host memory, device kind and count. The teacher's weights
do not change the speed: without --config.teacher.weights a random teacher is used.

  python -m dfq_jax.bench profile --config configs/cifar10_resnet20.py:adadfq,w4a4 \
      [--batch 200] [--steps 3] [--warmup 2] [--top 15] [--out runs/profile]
traces --steps compiled iterations with jax.profiler (trace under OUT/trace, open it in
Perfetto; the compiled HLO in OUT/step.hlo.txt) and prints one JSON line: the XLA
thunks' time per step summed over threads, by op kind (the thunk name without its
number: transpose_copy_fusion, convolution, ...) and the --top thunks with the JAX op each
came from (HLO metadata), each with its share of the summed thunk time.

  python -m dfq_jax.bench accuracy --config configs/cifar10_resnet20.py \
      --methods gdfq,dsg,adadfq --bits w4a4,w3a3 --steps 2000 --seeds 3 --out runs/grid \
      --config.teacher.weights=... --config.data.root=...
runs every method x bits x seed (each in its own workdir under --out, resumable; a cell
whose results.json exists is read back, not rerun) and
writes grid.json and grid.md: mean +- std over seeds of final and best top-1, wall time.

  python -m dfq_jax.bench ptq --config configs/cifar10_resnet20.py --bits w4a4,w6a6,w8a8 \
      --out runs/ptq [--observers minmax,sample_mean,percentile,mse] --config.teacher.weights=...
synthesises the ZeroQ and DSG sets once and tables top-1 for every bit-width x calibration
set (ZeroQ, DSG, real train images, noise) x observer (dfq_jax/ptq_grid.py): ptq_grid.md/json,
diversity.png/md.

  python -m dfq_jax.bench mixed --config configs/cifar10_resnet20.py:eval,w4a8 \
      --uniform 2,3,4,5,6,8 --budgets 2.5,3,3.5,4,5,6 --sources dsg,real --out runs/mixed
runs uniform weight bit-widths and mixed-precision budgets (sensitivity from each
source) and draws top-1 against the kernels' size (dfq_jax/mixed_grid.py): pareto.json,
pareto.md, pareto.png.

  python -m dfq_jax.bench curves --runs DIR1,DIR2 [--labels A,B] --out curves.png
draws top-1 against iterations of training runs (their metrics.jsonl), the FP level and
each run's no-training floor marked (dfq_jax/curves.py); no --config needed.

  python -m dfq_jax.bench convs [--steps 20]
times forward + backward of the 3x3 convolutions of ResNet-20 and ResNet-18 in XLA's
float32 and bfloat16 convolutions and as im2col + bfloat16 dot (dfq_jax/conv_bench.py):
one JSON line per shape; no --config needed.

  python -m dfq_jax.bench compare --config configs/cifar10_resnet20.py:adadfq,w4a4 \
      [--batch 16] [--steps 10] [--warmup 3] [--rounds 3] [--torch_python PYTHON] \
      [--peak_gflops 209] [--config.x=y ...]
alternates, each in a fresh subprocess, `bench speed` (same config, overrides, batch, steps,
warm-up) and the eager PyTorch reference dfq_jax/reference/torch_adadfq.py (J T J T ...,
--rounds times each) and prints one JSON line: per-round medians, the median of the round
medians for each, speedup = torch / JAX, JAX compile_s, flops_per_step and the fraction of
the --peak_gflops matmul peak (209: numpy sgemm on the project's CPU). Needs torch for
--torch_python (default: this Python): `pip install torch==2.13.0`.

  python -m dfq_jax.bench synth --config configs/imagenet_resnet18.py:zeroq_ptq,w4a4 \
      [--batch 64] [--steps 10] [--warmup 3] [--rounds 3] [--torch_python PYTHON]
times the PTQ image synthesis (methods zeroq_ptq, dsg_ptq): alternates, each in a fresh
subprocess, our jitted synthesis step (dfq_jax/ptq/synthesis.py; `synth_speed`, which
prints one JSON line: median step after compile + warm-up, compile_s, flops_per_step,
images/s) and the eager PyTorch reference dfq_jax/reference/torch_ptq.py with the config's
preset (--preset zeroq|dsg) and network, and prints one JSON line: per-round medians, the
medians, speedup = torch / JAX. --batch defaults to the config's ptq.batch_size; the torch
reference runs float32 whatever compute_dtype says.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dfq_jax import config_base, conv_bench, mixed_grid, networks, ptq_grid, trainer, xla_options
from dfq_jax import curves as curves_lib
from dfq_jax import metrics as metrics_lib
from dfq_jax import run as run_lib
from dfq_jax.models import teacher as teacher_lib
from dfq_jax.ptq import synthesis

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:args].", lock_config=True)
_BATCH = flags.DEFINE_integer(
  "batch", None, "speed: global batch size (default: config's); synth: images (ptq.batch_size)."
)
_STEPS = flags.DEFINE_integer("steps", 20, "speed: timed iterations; accuracy: total_steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "speed: untimed iterations after compilation.")
_METHODS = flags.DEFINE_list("methods", ["gdfq", "dsg", "adadfq"], "accuracy: methods.")
_BITS = flags.DEFINE_list("bits", ["w4a4", "w3a3"], "accuracy, ptq: bit-widths.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "accuracy: seeds 0..K-1 per cell.")
_OUT = flags.DEFINE_string(
  "out", "runs/grid", "accuracy, ptq, profile: output directory (profile: runs/profile)."
)
_OBSERVERS = flags.DEFINE_list(
  "observers",
  ["minmax", "sample_mean", "percentile", "mse"],
  "ptq: activation-range observers (calib.method values).",
)
_UNIFORM = flags.DEFINE_list("uniform", ["2", "3", "4", "5", "6", "8"], "mixed: uniform bits.")
_BUDGETS = flags.DEFINE_list(
  "budgets", ["2.5", "3", "3.5", "4", "5", "6"], "mixed: average weight-bit budgets."
)
_SOURCES = flags.DEFINE_list("sources", ["dsg"], "mixed: sensitivity image sources.")
_RUNS = flags.DEFINE_list("runs", [], "curves: workdirs of training runs.")
_LABELS = flags.DEFINE_list("labels", [], "curves: one label per run (default: dir name).")
_TOP = flags.DEFINE_integer("top", 15, "profile: thunks (and op kinds) listed.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "compare, synth: alternating rounds (JAX, torch) each.")
_TORCH_PYTHON = flags.DEFINE_string(
  "torch_python", sys.executable, "compare, synth: Python executable that has torch installed."
)
_TORCH_FROZEN = flags.DEFINE_bool(
  "torch_frozen_teacher",
  False,
  "compare: the torch reference skips the teacher's weight gradients (the original code "
  "computes them: its teacher is only in eval mode).",
)
_PEAK_GFLOPS = flags.DEFINE_float(
  "peak_gflops",
  209.0,
  "compare: matmul peak (GFLOP/s) for the JAX peak fraction; "
  "<= 0 to omit. 209 = numpy sgemm on the project's CPU.",
)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_REFERENCE = os.path.join(_ROOT, "dfq_jax", "reference", "torch_adadfq.py")
_TORCH_PTQ_MODULE = "dfq_jax.reference.torch_ptq"  # run with -m from _ROOT (it imports
# the networks of torch_adadfq; dfq_jax/__init__ imports nothing, so torch-only Pythons work)


def _teacher_variables(config) -> dict:
  """The teacher's weights, or a random teacher (the weights do not change the speed)."""
  if config.teacher.weights:
    return teacher_lib.load_teacher(config)
  shape = (1, config.image_size, config.image_size, config.channels)
  init = jax.jit(teacher_lib.teacher_model(config).init)  # one compile, not one per layer op
  return init(jax.random.key(0), np.zeros(shape, np.float32))


def _compiled_training_step(config, batch: int | None):
  """(compiled step, state, teacher, constants, compile_s): the iteration `speed` times
  (frozen activation ranges, the state of 99 % of a run)."""
  if batch:
    config.batch_size = batch
  models = networks.build_models(config, _teacher_variables(config))
  setup = trainer.setup_training(config, models)
  state, teacher, constants = setup.state, setup.teacher_vars, setup.constants
  t0 = time.perf_counter()
  compiled = setup.step_fn.lower(state, teacher, constants, True, False).compile()
  return compiled, state, teacher, constants, time.perf_counter() - t0


def speed(config, batch: int | None, steps: int, warmup: int) -> dict:
  """Times the full training iteration (generator step + student step)."""
  compiled, state, teacher, constants, compile_s = _compiled_training_step(config, batch)
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
    "method": config.method,
    "bits": f"w{config.quant.w_bits}a{config.quant.a_bits}",
    "model": config.teacher.model,
    "batch": config.batch_size,
    "median_step_s": median,
    "min_step_s": min(times),
    "max_step_s": max(times),
    "images_per_s": config.batch_size / median,
    "compile_s": compile_s,
    "flops_per_step": flops,
    "gflops_per_s": flops / median / 1e9,
    "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "timed_steps": steps,
  }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NUMBER_SUFFIX = re.compile(r"[._]\d+$")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op it came from (its metadata op_name, or '')."""
  names = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op = _OP_NAME.search(line)
      names[m.group(1)] = op.group(1) if op else ""
  return names


def thunk_times(trace_dir: str, instructions) -> dict[str, float]:
  """Total duration (microseconds, summed over threads) of each trace event named after
  one of `instructions`, in the newest Perfetto trace (*.trace.json.gz) under trace_dir."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise ValueError(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace.")
  with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
    events = json.load(f).get("traceEvents", [])
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in instructions:
      totals[e["name"]] += float(e.get("dur", 0.0))
  return dict(totals)


def profile(config, batch: int | None, steps: int, warmup: int, out: str, top: int) -> dict:
  """Where the training iteration's time goes: XLA thunk times of `steps` traced steps."""
  if steps < 1 or top < 1:
    raise ValueError(f"--steps={steps} / --top={top}: both must be >= 1.")
  compiled, state, teacher, constants, compile_s = _compiled_training_step(config, batch)
  hlo = compiled.as_text()
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  op_names = hlo_op_names(hlo)
  for _ in range(warmup):
    state, metrics = compiled(state, teacher, constants)
  jax.block_until_ready(state)
  trace_dir = os.path.join(out, "trace")
  t0 = time.perf_counter()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    for _ in range(steps):
      state, metrics = compiled(state, teacher, constants)
    jax.block_until_ready(metrics)
  finally:
    jax.profiler.stop_trace()
  traced_s = time.perf_counter() - t0
  per_thunk = thunk_times(trace_dir, op_names)
  if not per_thunk:
    raise ValueError(
      f"the trace under {trace_dir} names none of the step's HLO instructions (XLA:CPU "
      "thunks); on this backend open the trace in Perfetto instead."
    )
  total = sum(per_thunk.values())
  kinds = collections.Counter()
  for name, us in per_thunk.items():
    kinds[_NUMBER_SUFFIX.sub("", name)] += us

  def entry(us):
    return {"ms_per_step": us / steps / 1e3, "share": us / total}

  return {
    "method": config.method,
    "bits": f"w{config.quant.w_bits}a{config.quant.a_bits}",
    "model": config.teacher.model,
    "batch": config.batch_size,
    "traced_steps": steps,
    "traced_wall_s_per_step": traced_s / steps,
    "compile_s": compile_s,
    "thunk_ms_per_step": total / steps / 1e3,
    "distinct_thunks": len(per_thunk),
    "by_kind": [{"kind": k, **entry(us)} for k, us in kinds.most_common(top)],
    "top_thunks": [
      {"thunk": n, "op_name": op_names[n], **entry(us)}
      for n, us in collections.Counter(per_thunk).most_common(top)
    ],
    "trace_dir": trace_dir,
    "hlo": os.path.join(out, "step.hlo.txt"),
    "device_kind": jax.devices()[0].device_kind,
  }


def synthesis_speed(config, batch: int | None, steps: int, warmup: int) -> dict:
  """Times our jitted PTQ synthesis step (`synthesis.make_synthesizer`) of config.ptq.

  The median of `steps` timed steps after compilation and `warmup` untimed steps;
  flops_per_step from XLA's cost analysis of the compiled step, images [batch, H, W, C].
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need --steps >= 1 and --warmup >= 0; got {steps}, {warmup}")
  hp = synthesis.PtqHparams.from_config(config)
  if batch:
    hp = dataclasses.replace(hp, batch_size=batch)
  image_shape = (config.image_size, config.image_size, config.channels)
  key = jax.random.key(config.seed)
  synth = synthesis.make_synthesizer(
    hp,
    teacher_lib.teacher_model(config),
    _teacher_variables(config),
    jax.random.fold_in(key, 0),
    image_shape,
    config.num_classes,
    compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
  )
  carry = synth.init_carry(jax.random.fold_in(key, 1))
  labels = jax.random.randint(jax.random.fold_in(key, 2), (hp.batch_size,), 0, config.num_classes)
  labels = jax.device_put(labels, synth.batch_sharding)
  k_steps = jax.random.fold_in(key, 3)
  t0 = time.perf_counter()
  compiled = synth.step.lower(carry, synth.teacher_vars, labels, k_steps).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  times, terms0 = [], None
  for t in range(warmup + steps):
    t0 = time.perf_counter()
    carry, metrics = compiled(carry, synth.teacher_vars, labels, jax.random.fold_in(k_steps, t))
    jax.block_until_ready(metrics)
    if t >= warmup:
      times.append(time.perf_counter() - t0)
    if t == 0:
      terms0 = {k: float(v) for k, v in jax.device_get(metrics).items()}
  median = statistics.median(times)
  return {
    "impl": "jax",
    "method": config.method,
    "model": config.teacher.model,
    "compute_dtype": config.compute_dtype,
    "batch": hp.batch_size,
    "median_step_s": median,
    "min_step_s": min(times),
    "max_step_s": max(times),
    "steps_per_s": 1.0 / median,
    "images_per_s": hp.batch_size / median,
    "compile_s": compile_s,
    "flops_per_step": flops,
    "gflops_per_s": flops / median / 1e9,
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "timed_steps": steps,
    "warmup": warmup,
    "losses_step0": terms0,
  }


def accuracy(
  config, methods_: list[str], bits: list[str], steps: int, seeds: int, out: str
) -> dict:
  """Runs the methods x bits x seeds grid; writes grid.json and grid.md under `out`.

  The tables keep the cells of earlier grids in `out` that this one does not request
  (another method or bit-width); a requested cell is summarised anew from its runs.
  Returns the table written.
  """
  os.makedirs(out, exist_ok=True)
  earlier = _earlier_grid(os.path.join(out, "grid.json"))
  cells = {}
  for m in methods_:
    for b in bits:
      runs = []
      for seed in range(seeds):
        c = config_base.with_flags(config, [m, b])
        with c.unlocked():
          c.seed = seed
          if steps:
            c.total_steps = steps
        workdir = os.path.join(out, f"{m}_{b}_seed{seed}")
        done = os.path.join(workdir, "results.json")
        if os.path.exists(done):
          # A finished cell is read back (its config must be this one: prepare_workdir
          # refuses another), so an interrupted grid resumes where it stopped.
          run_lib.prepare_workdir(workdir, c, restart=False)
          with open(done) as f:
            runs.append(json.load(f))
        else:
          runs.append(run_lib.run(c, workdir))
      cells[f"{m},{b}"] = runs
  table = {key: cell for key, cell in earlier.items() if key not in cells}
  for key, runs in cells.items():

    def stat(name, runs=runs):
      values = [r[name] for r in runs]
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      return [statistics.mean(values), std]  # as grid.json holds it

    table[key] = {
      "final_top1": stat("final_top1"),
      "best_top1": stat("best_top1"),
      "quant_top1_before": stat("quant_top1_before"),
      "wall_s": stat("wall_s"),
      "seeds": len(runs),
      "fp_top1": runs[0]["fp_top1"],
      "steps": runs[0]["steps"],
    }
  metrics_lib.write_json_atomic(os.path.join(out, "grid.json"), table)
  lines = [
    "| method | bits | before | final | best* | wall s/run | seeds |",
    "|---|---|---|---|---|---|---|",
  ]
  for key, r in table.items():
    m, b = key.split(",")
    fmt = lambda v, r=r: f"{v[0]:.2f} ± {v[1]:.2f}" if r["seeds"] > 1 else f"{v[0]:.2f}"
    lines.append(
      f"| {m} | {b.upper()} | {fmt(r['quant_top1_before'])} | "
      f"{fmt(r['final_top1'])} | {fmt(r['best_top1'])} | {r['wall_s'][0]:.0f} | "
      f"{r['seeds']} |"
    )
  lines.append("\n* best: selected on the evaluation set, as the papers report.")
  with open(os.path.join(out, "grid.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return table


def _earlier_grid(path: str) -> dict:
  """The cells of an earlier grid.json in the output folder ({} if there is none);
  checked before any run, so an unreadable file stops the grid before it trains."""
  if not os.path.exists(path):
    return {}
  why = ""
  try:
    with open(path) as f:
      table = json.load(f)
  except ValueError as e:
    why = str(e)
  else:
    cells = table.values() if isinstance(table, dict) else [None]
    if not all(isinstance(cell, dict) and "final_top1" in cell for cell in cells):
      why = "not a {cell: summary} object"
  if why:
    raise ValueError(
      f"{path} is not a grid table of `bench accuracy` ({why}): move it away or choose "
      "another --out (its runs' results.json files are read back either way)."
    )
  return table


class TorchMissingError(RuntimeError):
  """--torch_python cannot import torch."""


def _config_args(argv: list[str]) -> tuple[str | None, list[str]]:
  """The --config value and the --config.x overrides of a command line, as given."""
  config_arg, overrides, i = None, [], 0
  while i < len(argv):
    arg = argv[i]
    if re.match(r"^--?config(=|$)", arg):
      if "=" in arg:
        config_arg = arg.split("=", 1)[1]
      elif i + 1 < len(argv):
        config_arg, i = argv[i + 1], i + 1
    elif re.match(r"^--?(no)?config\.", arg):
      overrides.append(arg)
      name = re.sub(r"^--?(no)?", "", arg)
      is_bool = name in flags.FLAGS and flags.FLAGS[name].boolean
      if "=" not in arg and not is_bool and i + 1 < len(argv):
        overrides.append(argv[i + 1])
        i += 1
    i += 1
  return config_arg, overrides


def _run_json(cmd: list[str], what: str) -> dict:
  """Runs `cmd` from the repository root; returns the last JSON line of its stdout."""
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(
      f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}"
    )
  return json.loads(lines[-1])


def _checked_torch_python(torch_python: str, command: str = "compare") -> str:
  """`torch_python` made absolute; raises TorchMissingError if it cannot import torch."""
  if os.sep in torch_python and os.path.exists(torch_python):
    torch_python = os.path.abspath(torch_python)
  probe = subprocess.run(
    [torch_python, "-c", "import torch; print(torch.__version__)"],
    capture_output=True,
    text=True,
    check=False,
  )
  if probe.returncode != 0:
    raise TorchMissingError(
      f"{command} needs PyTorch, which {torch_python!r} cannot import. Install it with "
      f"`{torch_python} -m pip install torch==2.13.0` (CPU wheel), or pass "
      "--torch_python=/path/to/another/venv/bin/python that has it."
    )
  return torch_python


# config.teacher.model -> the torch reference's --network (same architecture, generator).
_TORCH_NETWORKS = {
  "resnet20_cifar": "resnet20",
  "resnet18": "resnet18",
  "mobilenetv2": "mobilenetv2",
}


def _torch_network(config) -> str:
  """The reference's --network for `config`, checked before any work (ValueError)."""
  if config.method != "adadfq":
    raise ValueError(
      f"compare times the AdaDFQ loop; the config's method is {config.method!r}: "
      "use the config argument 'adadfq' (e.g. configs/cifar10_resnet20.py:adadfq,w4a4)."
    )
  return _reference_network(config, "compare")


def _reference_network(config, command: str) -> str:
  """The torch references' --network for config.teacher.model (ValueError if none)."""
  if config.teacher.model not in _TORCH_NETWORKS:
    raise ValueError(
      f"the torch reference has no {config.teacher.model!r}: {command} runs "
      f"{', '.join(_TORCH_NETWORKS)} (configs cifar10_resnet20, imagenet_resnet18, "
      "imagenet_mobilenetv2)."
    )
  return _TORCH_NETWORKS[config.teacher.model]


# config.method -> the PTQ reference's --preset (config_base.PTQ_PRESETS).
_TORCH_PRESETS = {"zeroq_ptq": "zeroq", "dsg_ptq": "dsg"}


def _torch_preset(config) -> str:
  """The PTQ reference's --preset for `config`, checked before any work (ValueError)."""
  if config.method not in _TORCH_PRESETS:
    raise ValueError(
      f"synth times the PTQ image synthesis; the config's method is {config.method!r}: "
      "use the config argument 'zeroq_ptq' or 'dsg_ptq' (e.g. "
      "configs/imagenet_resnet18.py:zeroq_ptq,w4a4)."
    )
  return _TORCH_PRESETS[config.method]


def _absolute_config_arg(config_arg: str) -> str:
  """FILE[:args] with FILE made absolute if it exists (subprocesses run from _ROOT)."""
  path, colon, args = config_arg.partition(":")
  return os.path.abspath(path) + colon + args if os.path.exists(path) else config_arg


def _alternate(jax_cmd: list[str], torch_cmd: list[str], rounds: int, what: str):
  """Runs the JAX and torch commands alternately (J T J T ..., `rounds` pairs, each a
  fresh subprocess printing one JSON line). Returns (the timing fields `compare` and
  `synth` share, the JAX rows)."""
  jax_rows, torch_rows = [], []
  for _ in range(rounds):
    jax_rows.append(_run_json(jax_cmd, f"JAX {what}"))
    torch_rows.append(_run_json(torch_cmd, f"torch {what}"))
  jax_medians = [r["median_step_s"] for r in jax_rows]
  torch_medians = [r["median_step_s"] for r in torch_rows]
  jax_median, torch_median = statistics.median(jax_medians), statistics.median(torch_medians)
  batch = jax_rows[0]["batch"]
  return {
    "jax_round_median_step_s": jax_medians,
    "torch_round_median_step_s": torch_medians,
    "jax_median_step_s": jax_median,
    "torch_median_step_s": torch_median,
    "speedup": torch_median / jax_median,
    "jax_images_per_s": batch / jax_median,
    "torch_images_per_s": batch / torch_median,
    "jax_compile_s": statistics.median(r["compile_s"] for r in jax_rows),
    "flops_per_step": jax_rows[0]["flops_per_step"],
    "jax_gflops_per_s": jax_rows[0]["flops_per_step"] / jax_median / 1e9,
    "jax_device_kind": jax_rows[0]["device_kind"],
    "torch_version": torch_rows[0]["torch_version"],
    "torch_threads": torch_rows[0]["threads"],
    "torch_losses_step0": torch_rows[0]["losses_step0"],
  }, jax_rows


def synth(
  config,
  config_arg: str,
  overrides: list[str],
  batch: int | None,
  steps: int,
  warmup: int,
  rounds: int,
  torch_python: str = sys.executable,
) -> dict:
  """Our jitted PTQ synthesis step vs the eager torch reference, alternating J T J T ...

  Args:
    config: the parsed config (method zeroq_ptq | dsg_ptq, teacher model, ptq.*).
    config_arg, overrides: the --config value and --config.x=y arguments to pass on.
    batch: images per step (default config.ptq.batch_size); steps, warmup: timed and
      untimed steps, the same for both. rounds: the number of (JAX, torch) pairs.
    torch_python: a Python executable that can `import torch`.
  Returns:
    per-round and median step times of both, speedup = torch / JAX, JAX compile time
    and FLOPs per step, both step-0 loss terms.
  """
  if rounds < 1:
    raise ValueError(f"--rounds must be >= 1; got {rounds}")
  preset, network = _torch_preset(config), _reference_network(config, "synth")
  torch_python = _checked_torch_python(torch_python, "synth")
  batch = batch or config.ptq.batch_size
  jax_cmd = [sys.executable, "-m", "dfq_jax.bench", "synth_speed"]
  jax_cmd += [f"--config={_absolute_config_arg(config_arg)}", f"--batch={batch}"]
  jax_cmd += [f"--steps={steps}", f"--warmup={warmup}", *overrides]
  torch_cmd = [torch_python, "-m", _TORCH_PTQ_MODULE, "--network", network, "--preset", preset]
  torch_cmd += ["--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
  timing, jax_rows = _alternate(jax_cmd, torch_cmd, rounds, "synthesis benchmark")
  return {
    "config": config_arg,
    "overrides": overrides,
    "method": config.method,
    "preset": preset,
    "network": network,
    "compute_dtype": config.compute_dtype,
    "batch": batch,
    "steps": steps,
    "warmup": warmup,
    "rounds": rounds,
    **timing,
    "jax_losses_step0": jax_rows[0]["losses_step0"],
  }


def compare(
  config,
  config_arg: str,
  overrides: list[str],
  batch: int | None,
  steps: int,
  warmup: int,
  rounds: int,
  torch_python: str = sys.executable,
  peak_gflops: float | None = 209.0,
  torch_frozen_teacher: bool = False,
) -> dict:
  """JAX `speed` vs the eager torch reference, alternating fresh subprocesses J T J T ...

  Args:
    config: the parsed config (batch size and bit-widths are read from it).
    config_arg: the --config value to pass on (FILE[:args]).
    overrides: the --config.x=y arguments to pass on to the JAX subprocess.
    batch, steps, warmup: as `speed`; the same for both implementations.
    rounds: the number of (JAX, torch) pairs.
    torch_python: a Python executable that can `import torch`.
    peak_gflops: matmul peak for the JAX fraction of peak (None or <= 0: omitted).
  Returns:
    per-round and median step times of both, speedup = torch / JAX, JAX compile time,
    FLOPs per step and fraction of peak.
  """
  if rounds < 1:
    raise ValueError(f"--rounds must be >= 1; got {rounds}")
  # The subprocesses run from the repository root: make paths given relative to here absolute.
  given_config, config_arg = config_arg, _absolute_config_arg(config_arg)
  network = _torch_network(config)
  torch_python = _checked_torch_python(torch_python)
  batch = batch or config.batch_size
  w_bits, a_bits = config.quant.w_bits, config.quant.a_bits
  jax_cmd = [sys.executable, "-m", "dfq_jax.bench", "speed", f"--config={config_arg}"]
  jax_cmd += [f"--batch={batch}", f"--steps={steps}", f"--warmup={warmup}", *overrides]
  torch_cmd = [torch_python, _TORCH_REFERENCE, "--batch", str(batch), "--steps", str(steps)]
  torch_cmd += ["--warmup", str(warmup), "--bits", str(w_bits), "--abits", str(a_bits)]
  torch_cmd += ["--frozen-teacher"] if torch_frozen_teacher else []
  torch_cmd += ["--network", network]
  bf16 = config.compute_dtype == "bfloat16"  # then torch.autocast(cpu, bfloat16) too
  torch_cmd += ["--bf16"] if bf16 else []
  timing, _ = _alternate(jax_cmd, torch_cmd, rounds, "speed benchmark")
  peak = peak_gflops if peak_gflops and peak_gflops > 0 else None
  return {
    "config": given_config,
    "overrides": overrides,
    "method": config.method,
    "network": network,
    "compute_dtype": config.compute_dtype,
    "bits": f"w{w_bits}a{a_bits}",
    "batch": batch,
    "steps": steps,
    "warmup": warmup,
    "rounds": rounds,
    **timing,
    "peak_gflops": peak,
    "jax_peak_fraction": timing["jax_gflops_per_s"] / peak if peak else None,
    "torch_frozen_teacher": torch_frozen_teacher,
  }


def curves(runs: list[str], labels: list[str], out: str) -> list:
  """Reads every run's evaluations and writes the PNG `out`; returns the curves."""
  if not runs:
    raise app.UsageError("curves needs --runs DIR[,DIR...] (training workdirs).")
  if labels and len(labels) != len(runs):
    raise app.UsageError(f"--labels has {len(labels)} names for {len(runs)} runs.")
  found = [curves_lib.read_curve(r, labels[i] if labels else None) for i, r in enumerate(runs)]
  curves_lib.plot_curves(found, out)
  return found


def _print_row(fn, *args) -> None:
  """Prints fn(*args) as one JSON line; a refusal (ValueError, no torch) prints one
  `error: ...` line on stderr and exits 2."""
  try:
    row = fn(*args)
  except (TorchMissingError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(row))


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # runs print progress and results, not INFO
  xla_options.limit_host_blas_threads()
  commands = ("speed", "profile", "accuracy", "compare", "synth", "ptq", "mixed", "curves", "convs")
  if len(argv) != 2 or argv[1] not in commands + ("synth_speed",):
    raise app.UsageError(
      f"usage: python -m dfq_jax.bench {'|'.join(commands)} --config FILE[:args] ..."
    )
  if argv[1] == "convs":
    for row in conv_bench.conv_table(_STEPS.value):
      print(json.dumps(row), flush=True)
    return
  if argv[1] == "curves":
    for c in curves(_RUNS.value, _LABELS.value, _OUT.value):
      print(
        json.dumps(
          {
            "run": c.label,
            "steps": c.steps,
            "top1": c.top1,
            "fp_top1": c.fp_top1,
            "floor_top1": c.floor_top1,
          }
        )
      )
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. configs/cifar10_resnet20.py:adadfq,w4a4")
  if argv[1] == "speed":
    print(json.dumps(speed(config, _BATCH.value, _STEPS.value, _WARMUP.value)))
  elif argv[1] == "profile":
    out = _OUT.value if flags.FLAGS["out"].present else os.path.join("runs", "profile")
    _print_row(profile, config, _BATCH.value, _STEPS.value, _WARMUP.value, out, _TOP.value)
  elif argv[1] in ("compare", "synth"):
    config_arg, overrides = _config_args(sys.argv[1:])
    args = (config, config_arg, overrides, _BATCH.value, _STEPS.value, _WARMUP.value)
    args += (_ROUNDS.value, _TORCH_PYTHON.value)
    if argv[1] == "compare":
      _print_row(compare, *args, _PEAK_GFLOPS.value, _TORCH_FROZEN.value)
    else:
      _print_row(synth, *args)
  elif argv[1] == "synth_speed":  # one JAX round of `synth` (a fresh process)
    _print_row(synthesis_speed, config, _BATCH.value, _STEPS.value, _WARMUP.value)
  elif argv[1] == "mixed":
    mixed_grid.pareto(
      config,
      [int(b) for b in _UNIFORM.value],
      [float(b) for b in _BUDGETS.value],
      _SOURCES.value,
      _OUT.value,
    )
    with open(os.path.join(_OUT.value, "pareto.md")) as f:
      print(f.read())
  elif argv[1] == "ptq":
    ptq_grid.ptq_grid(config, _BITS.value, _OUT.value, observers=tuple(_OBSERVERS.value))
    with open(os.path.join(_OUT.value, "ptq_grid.md")) as f:
      print(f.read())
  else:
    accuracy(config, _METHODS.value, _BITS.value, _STEPS.value, _SEEDS.value, _OUT.value)
    with open(os.path.join(_OUT.value, "grid.md")) as f:
      print(f.read())


if __name__ == "__main__":
  app.run(main)
