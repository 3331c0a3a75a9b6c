"""Data parallelism on 8 simulated CPU devices (run in a subprocess: the device count is
fixed when JAX starts). See parallel_check.py for what each check asserts."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(devices):
  flags = f"--xla_force_host_platform_device_count={devices} {os.environ.get('XLA_FLAGS', '')}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


@pytest.mark.parametrize(
  "check",
  ["global", pytest.param("global_gdfq", marks=pytest.mark.slow), "per_device", "topology", "ptq"],
)
def test_multi_device(tiny_teacher_dir, check):
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, "parallel_check.py"), tiny_teacher_dir, check],
    capture_output=True,
    text=True,
    env=_env(8),
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{check} OK" in proc.stdout


def test_local_launcher_runs_demo_on_8_devices(tiny_teacher_dir, tmp_path):
  workdir = tmp_path / "local"
  proc = subprocess.run(
    [
      "bash",
      os.path.join(ROOT, "launch", "local_cpu.sh"),
      "--devices",
      "8",
      "--",
      "--config",
      "configs/demo.py",
      f"--workdir={workdir}",
      "--config.teacher.layout=orbax",  # the session's digits teacher, not a new one
      f"--config.teacher.weights={tiny_teacher_dir}",
      "--config.total_steps=4",
      "--config.min_phase_steps=2",
      "--config.eval_every_steps=4",
      "--config.generator.width=16",
      "--config.batch_size=16",
      "--config.data.limit=64",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ),
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 device(s)" in proc.stdout + proc.stderr
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["steps"] == 4 and results["fp_top1"] > 90


def test_local_launcher_rejects_bad_arguments():
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "local_cpu.sh"), "--devices"],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2 and "--devices needs a number" in proc.stderr
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "tpu_run.sh"), "x"], capture_output=True, text=True
  )
  assert proc.returncode == 2 and "usage" in proc.stderr
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")],
    capture_output=True,
    text=True,
    env={"PATH": os.environ["PATH"]},
  )
  assert proc.returncode != 0 and "set CONFIG" in proc.stderr
