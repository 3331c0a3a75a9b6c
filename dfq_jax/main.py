r"""Command line: python -m dfq_jax.main --config configs/<file>.py[:args] --workdir DIR.

With no arguments it runs the embedded demo (configs/demo.py) in ./runs/demo: a small
teacher trained on scikit-learn's digits, quantized to W2A2 without data, offline.

Overrides: --config.key=value (unknown keys are an error). --restart moves an existing
run in --workdir aside (to DIR/previous-<time>/) instead of refusing a changed config.
Compiled steps are cached in ~/.cache/dfq_jax/xla (JAX_COMPILATION_CACHE_DIR overrides).
On the CPU backend the host BLAS/LAPACK runs one thread beside XLA's (OPENBLAS_NUM_THREADS
or OMP_NUM_THREADS override; dfq_jax.xla_options.limit_host_blas_threads).
Multi-host: set DFQ_DISTRIBUTED=1 (the launch/ scripts do) to call
jax.distributed.initialize() first.
Logging: the libraries' INFO records (orbax's checkpoint bookkeeping, absl) are off unless
--verbosity / -v is given (e.g. -v 0 for INFO); warnings and errors always show. Bad input
ends in one `error:` line and exit code 2; --verbosity=1 shows its traceback instead.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dfq_jax import config_base, parallel, xla_options
from dfq_jax import run as run_lib
from dfq_jax.interfaces import NonFiniteError, Preempted

_DEMO_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
)

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/cifar10_resnet20.py:adadfq,w4a4.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results are written.")
_RESTART = flags.DEFINE_bool(
  "restart", False, "Move an existing run in --workdir aside and start afresh."
)
_SHOW_CONFIG = flags.DEFINE_bool(
  "show_config",
  False,
  "Print every key of the resolved config, its value and its "
  "comment (what --config.key=value may override), then exit.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("DFQ_COORDINATOR_ADDRESS"),
  "Multi-process run started by hand: host:port of process 0 (env DFQ_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes",
  int(os.environ.get("DFQ_NUM_PROCESSES", "0")) or None,
  "Multi-process run started by hand: the number of processes (env DFQ_NUM_PROCESSES).",
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id",
  int(os.environ["DFQ_PROCESS_ID"]) if "DFQ_PROCESS_ID" in os.environ else None,
  "Multi-process run started by hand: this process's index (env DFQ_PROCESS_ID).",
)

_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  int(os.environ.get("DFQ_HEARTBEAT_TIMEOUT_S", "100")),
  "Multi-process runs: a process whose peers stop answering for this long aborts "
  "(env DFQ_HEARTBEAT_TIMEOUT_S; JAX's default 100). Restart all to resume.",
)


def _initialize_distributed() -> None:
  """jax.distributed.initialize from the flags, or from the cluster's environment.

  With --coordinator_address/--num_processes/--process_id (or their DFQ_* variables) the
  processes were started by hand (launch/local_multihost.sh); with DFQ_DISTRIBUTED=1 alone
  JAX detects the cluster (TPU pod, SLURM, ...).
  """
  manual = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in manual):
    if any(v is None for v in manual):
      raise app.UsageError(
        "a multi-process run needs --coordinator_address, --num_processes "
        "and --process_id together (or DFQ_COORDINATOR_ADDRESS, "
        "DFQ_NUM_PROCESSES, DFQ_PROCESS_ID)."
      )
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      heartbeat_timeout_seconds=_HEARTBEAT.value,
    )
  elif os.environ.get("DFQ_DISTRIBUTED") == "1":
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # a quiet run: progress bar and results
  if _SHOW_CONFIG.value:
    print(config_base.describe(_CONFIG.value))
    return
  _initialize_distributed()
  xla_options.limit_host_blas_threads()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Resumed and repeated runs reuse compiled steps (compilation takes 10-60 s on CPU).
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser(os.path.join("~", ".cache", "dfq_jax", "xla"))
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", "demo")
  primary = jax.process_index() == 0  # one process prints (all of them work)
  say = print if primary else (lambda *a, **k: None)
  try:
    results = run_lib.run(config, workdir, restart=_RESTART.value, log=say)
  except Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(143)
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1 or flags.FLAGS.verbosity >= 1:
      raise
    print(parallel.peer_lost_message(e, workdir), file=sys.stderr, flush=True)
    # Skip jax.distributed's shutdown barrier: with a peer gone it would wait out the
    # heartbeat timeout and then abort the process.
    os._exit(1)
  except Exception as e:
    if not run_lib.is_bad_input(e) or flags.FLAGS.verbosity >= 1:
      raise  # a bug, or --verbosity=1 (the traceback for a bug report)
    message = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:
      message = str(e.args[0])
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  say(format_results(results))
  say(f"Results: {os.path.join(workdir, 'results.json')}")
  for name, path in output_paths(workdir):
    say(f"{name}: {path}")


def format_results(results: dict) -> str:
  """A small table of FP / before / after accuracy."""
  rows = [("full precision (teacher)", results["fp_top1"])]
  if "quant_top1" in results:
    rows.append((f"{results['bits']} no training", results["quant_top1"]))
  if "quant_top1_before" in results:
    rows.append((f"{results['bits']} before {results['method']}", results["quant_top1_before"]))
    rows.append((f"{results['bits']} after {results['method']} (final)", results["final_top1"]))
    rows.append((f"{results['bits']} best during training*", results["best_top1"]))
    rows.append(
      (
        f"lift of {results['method']} (final - before)",
        results["final_top1"] - results["quant_top1_before"],
      )
    )
  width = max(len(r[0]) for r in rows)
  lines = [f"{'model'.ljust(width)}  top-1 %", f"{'-' * width}  -------"]
  lines += [f"{name.ljust(width)}  {value:7.2f}" for name, value in rows]
  if "best_top1" in results:
    lines.append("* selected on the evaluation set, as the papers report; 'final' is not.")
  return "\n".join(lines)


def output_paths(workdir: str) -> list[tuple[str, str]]:
  """(what, path) of the pictures a run leaves: the curves and the newest sample grid."""
  out = []
  curves = os.path.join(workdir, "curves.png")
  if os.path.exists(curves):
    out.append(("Curves", curves))
  samples = os.path.join(workdir, "samples")
  if os.path.isdir(samples):
    grids = sorted(f for f in os.listdir(samples) if f.endswith(".png"))
    if grids:
      out.append(("Samples", os.path.join(samples, grids[-1])))
  return out


def _parse_flags(argv):
  """absl's flag parsing, with a bad config file argument or override as one error line."""
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].removeprefix("--config.").removeprefix("--noconfig.")
    if arg.startswith(("--config.", "--noconfig.")) and key in config_base.RENAMED_KEYS:
      print(
        f"error: config key {key!r} is now {config_base.RENAMED_KEYS[key]!r}: pass "
        f"--config.{config_base.RENAMED_KEYS[key]}=... instead.",
        file=sys.stderr,
      )
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if any(a in ("-v", "--verbosity=1", "--verbosity=2") for a in argv):
      raise
    # config_flags puts the config file's exception last in its message.
    message = str(e).strip().splitlines()[-1].strip() or type(e).__name__
    message = re.sub(r"^[A-Za-z]*Error: ", "", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, ValueError, TypeError) as e:  # --config.x=y overrides
    text = str(e.args[0]) if isinstance(e, (AttributeError, KeyError)) and e.args else str(e)
    print(
      f"error: bad config override ({text.strip(chr(34) + chr(39))}): check the key and "
      "value against the config file (every key is listed in its get_config).",
      file=sys.stderr,
    )
    sys.exit(2)


def cli():
  if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(1, f"--config={_DEMO_CONFIG}")
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
