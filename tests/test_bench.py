"""The benchmark commands run and report what they promise."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from dfq_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
  """`python -m dfq_jax.bench ARGS` in a fresh process on the CPU."""
  return subprocess.run(
    [sys.executable, "-m", "dfq_jax.bench", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


# The demo's AdaDFQ step at batch 8: the smallest training step the CLI runs.
_DEMO_STEP = ("--config=configs/demo.py:adadfq", "--batch=8", "--config.generator.width=16")


def test_speed_prints_one_json_line_with_flops():
  proc = _bench("speed", *_DEMO_STEP, "--steps=2", "--warmup=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["method"] == "adadfq" and row["batch"] == 8 and row["timed_steps"] == 2
  assert row["median_step_s"] > 0 and row["compile_s"] > 0
  assert row["flops_per_step"] > 1e8 and row["gflops_per_s"] > 0
  assert row["device_count"] >= 1 and row["peak_host_memory_mb"] > 0


def test_accuracy_grid_writes_tables(tiny_teacher_dir, tmp_path):
  from dfq_test_utils import tiny_config

  from dfq_jax import bench

  config = tiny_config(tiny_teacher_dir, total_steps=4, eval_every_steps=4, sample_every_steps=0)
  table = bench.accuracy(config, ["gdfq"], ["w3a3"], 4, 2, str(tmp_path))
  assert set(table) == {"gdfq,w3a3"}
  cell = table["gdfq,w3a3"]
  assert cell["seeds"] == 2 and cell["steps"] == 4 and len(cell["final_top1"]) == 2
  md = (tmp_path / "grid.md").read_text()
  assert "| gdfq | W3A3 |" in md and "±" in md
  assert json.loads((tmp_path / "grid.json").read_text())["gdfq,w3a3"]["seeds"] == 2


def test_accuracy_grid_reads_finished_cells_back(tiny_teacher_dir, tmp_path, monkeypatch):
  from dfq_test_utils import tiny_config

  from dfq_jax import bench
  from dfq_jax import run as run_lib

  config = tiny_config(tiny_teacher_dir, total_steps=2, eval_every_steps=2, sample_every_steps=0)
  first = bench.accuracy(config, ["gdfq"], ["w4a4"], 2, 1, str(tmp_path))

  def no_rerun(*args, **kwargs):
    raise AssertionError("a finished cell was run again")

  monkeypatch.setattr(run_lib, "run", no_rerun)
  again = bench.accuracy(config, ["gdfq"], ["w4a4"], 2, 1, str(tmp_path))
  assert again == first
  # Another config in the same directory is refused, not mixed in.
  other = tiny_config(
    tiny_teacher_dir, total_steps=2, eval_every_steps=2, sample_every_steps=0, **{"student.lr": 0.5}
  )
  with pytest.raises(run_lib.WorkdirConflictError):
    bench.accuracy(other, ["gdfq"], ["w4a4"], 2, 1, str(tmp_path))


def test_accuracy_grid_keeps_the_cells_of_an_earlier_grid(tiny_teacher_dir, tmp_path):
  """A second grid into the same folder (another bit-width) adds its cells to grid.json
  and grid.md instead of dropping the first grid's; an unreadable grid.json is refused
  before anything trains."""
  from dfq_test_utils import tiny_config

  from dfq_jax import bench

  config = tiny_config(tiny_teacher_dir, total_steps=2, eval_every_steps=2, sample_every_steps=0)
  first = bench.accuracy(config, ["gdfq"], ["w4a4"], 2, 1, str(tmp_path))
  both = bench.accuracy(config, ["gdfq"], ["w3a3"], 2, 1, str(tmp_path))
  assert set(both) == {"gdfq,w4a4", "gdfq,w3a3"} and both["gdfq,w4a4"] == first["gdfq,w4a4"]
  written = json.loads((tmp_path / "grid.json").read_text())
  assert set(written) == {"gdfq,w4a4", "gdfq,w3a3"}
  md = (tmp_path / "grid.md").read_text()
  assert "| gdfq | W4A4 |" in md and "| gdfq | W3A3 |" in md
  before = sorted(os.listdir(tmp_path))
  for text in ("[1, 2", "[1, 2]", '{"gdfq,w8a8": 3}'):  # broken JSON, not a table
    (tmp_path / "grid.json").write_text(text)
    with pytest.raises(ValueError, match="grid.json is not a grid table.*move it away"):
      bench.accuracy(config, ["gdfq"], ["w8a8"], 2, 1, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before  # nothing ran, nothing was written
    assert (tmp_path / "grid.json").read_text() == text


def test_curves_draws_top1_against_iterations(tmp_path):
  from PIL import Image

  runs = []
  for name, values in (("a", [50.0, 60.5]), ("b", [40.0, 45.0, 70.25])):
    d = tmp_path / name
    d.mkdir()
    rows = [{"step": 500 * (i + 1), "eval/top1": v} for i, v in enumerate(values)]
    if name == "b":  # still training: the levels of its evaluation rows (the trainer's)
      rows[-1].update({"eval/fp_top1": 81.0, "eval/floor_top1": 30.5})
    rows.insert(1, {"step": 600, "generator/loss": 1.0})  # a training row: ignored
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    runs.append(str(d))
  (tmp_path / "a" / "results.json").write_text(
    json.dumps({"fp_top1": 81.03, "quant_top1_before": 31.2})
  )
  out = tmp_path / "plot" / "curves.png"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.bench",
      "curves",
      f"--runs={','.join(runs)}",
      "--labels=A,B",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert rows[0] == {
    "run": "A",
    "steps": [500, 1000],
    "top1": [50.0, 60.5],
    "fp_top1": 81.03,
    "floor_top1": 31.2,
  }
  assert rows[1]["steps"] == [500, 1000, 1500]
  assert (rows[1]["fp_top1"], rows[1]["floor_top1"]) == (81.0, 30.5)
  with Image.open(out) as img:
    assert img.size == (800, 480)
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.bench",
      "curves",
      f"--runs={runs[0]}",
      "--labels=A,B",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert bad.returncode != 0 and "--labels has 2 names for 1 runs" in bad.stderr


# bench profile: XLA thunk times of traced training steps, by op kind and by thunk.

_HLO = "\n".join(
  [
    "ENTRY %main (p: f32[4]) -> f32[4] {",
    '  %p = f32[4]{0} parameter(0), metadata={op_name="x"}',
    "  %transpose_copy_fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c, "
    'metadata={op_name="jit(f)/transpose(jvp())/conv"}',
    "  ROOT %convolution.12 = f32[4]{0} convolution(%transpose_copy_fusion.3)",
    "}",
  ]
)


def _write_trace(path, events):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_thunk_times_sum_durations_of_the_step_instructions_only(tmp_path):
  names = bench.hlo_op_names(_HLO)
  assert names == {
    "p": "x",
    "transpose_copy_fusion.3": "jit(f)/transpose(jvp())/conv",
    "convolution.12": "",
  }
  _write_trace(
    str(tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"),
    [
      {"ph": "X", "name": "transpose_copy_fusion.3", "dur": 10.0},
      {"ph": "X", "name": "transpose_copy_fusion.3", "dur": 5.5},  # the other thread
      {"ph": "X", "name": "convolution.12", "dur": 2.0},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 100.0},  # not an instruction
      {"ph": "i", "name": "convolution.12"},  # an instant event, no duration
    ],
  )
  assert bench.thunk_times(str(tmp_path), names) == {
    "transpose_copy_fusion.3": 15.5,
    "convolution.12": 2.0,
  }


def test_thunk_times_without_a_trace_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no \\*.trace.json.gz under"):
    bench.thunk_times(str(tmp_path), {"a": ""})


def test_profile_cli_reports_thunks_of_the_compiled_step(tmp_path):
  out = tmp_path / "prof"
  proc = _bench("profile", *_DEMO_STEP, "--steps=2", "--warmup=1", "--top=5", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["method"] == "adadfq" and row["batch"] == 8 and row["traced_steps"] == 2
  assert len(row["by_kind"]) == 5 and len(row["top_thunks"]) == 5
  assert row["thunk_ms_per_step"] > 0 and row["distinct_thunks"] >= 5
  # Shares are of the summed thunk time: each list sorted, all kinds together below 1.
  for rows in (row["by_kind"], row["top_thunks"]):
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
  names = bench.hlo_op_names((out / "step.hlo.txt").read_text())
  for t in row["top_thunks"]:
    assert names[t["thunk"]] == t["op_name"]
  assert any("conv" in k["kind"] or "fusion" in k["kind"] for k in row["by_kind"])


def test_profile_cli_refuses_zero_steps_with_one_error_line(tmp_path):
  proc = _bench("profile", "--config=configs/demo.py:adadfq", "--steps=0", f"--out={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --steps=0")
