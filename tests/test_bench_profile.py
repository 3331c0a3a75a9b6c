"""`bench profile`: XLA thunk times of traced training steps, by op kind and by thunk."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from dfq_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.bench",
      "profile",
      "--config=configs/demo.py:adadfq",
      "--batch=8",
      "--steps=2",
      "--warmup=1",
      "--top=5",
      f"--out={out}",
      "--config.generator.width=16",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["method"] == "adadfq" and row["batch"] == 8 and row["traced_steps"] == 2
  assert len(row["by_kind"]) == 5 and len(row["top_thunks"]) == 5
  assert row["thunk_ms_per_step"] > 0 and row["distinct_thunks"] >= 5
  # Shares are of the summed thunk time: each list sorted, all kinds together below 1.
  for rows in (row["by_kind"], row["top_thunks"]):
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
  hlo = (out / "step.hlo.txt").read_text()
  names = bench.hlo_op_names(hlo)
  for t in row["top_thunks"]:
    assert names[t["thunk"]] == t["op_name"]
  assert any("conv" in k["kind"] or "fusion" in k["kind"] for k in row["by_kind"])


def test_profile_cli_refuses_zero_steps_with_one_error_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.bench",
      "profile",
      "--config=configs/demo.py:adadfq",
      "--steps=0",
      f"--out={tmp_path}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --steps=0")
