"""launch/gpu_check.sh: clear errors on bad arguments; the CPU form end to end (slow)."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gpu_check.sh")


@pytest.mark.parametrize(
  "args, message",
  [
    (["--bogus"], "unknown argument"),
    (["--cuda", "11"], "--cuda takes 12 or 13"),
    (["--wheels", "/nonexistent"], "--wheels needs a directory"),
  ],
)
def test_bad_arguments_are_one_error_line(args, message):
  proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_cpu_form_runs_and_writes_its_json(tmp_path):
  out = tmp_path / "gpu_check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    ["bash", SCRIPT, "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["tests_passed"] and not result["gpu"]
  assert len(result["speed"]) == 1 and result["speed"][0]["median_step_s"] > 0
  assert result["convs"] == []  # the conv table runs on a GPU only
