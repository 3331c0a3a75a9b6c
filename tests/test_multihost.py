"""Two processes on one machine train, evaluate and checkpoint like one (jax.distributed).

The demo config, shrunk, runs as 2 processes x 2 CPU devices (gloo collectives, a local
coordinator) and as 1 process x 4 devices, each into its own workdir. Same global batch,
stats_scope=global: the same losses and top-1, one metrics.jsonl / results.json / sample
grid, written by process 0; the 2-process checkpoint resumes in 1 process.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dfq_jax.parallel import peer_lost_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(teacher_dir, workdir):
  return [
    sys.executable,
    "-m",
    "dfq_jax.main",
    "--config=configs/demo.py:gdfq,w4a4",
    f"--workdir={workdir}",
    "--config.teacher.layout=orbax",
    f"--config.teacher.weights={teacher_dir}",
    "--config.total_steps=8",
    "--config.min_phase_steps=2",
    "--config.eval_every_steps=4",
    "--config.ckpt_every_steps=4",
    "--config.sample_every_steps=4",
    "--config.log_every_steps=1",
    "--config.generator.width=16",
    "--config.batch_size=8",
    "--config.data.limit=64",
  ]


def _env(devices):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {os.environ.get('XLA_FLAGS', '')}",
  )
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no cache shared between the layouts
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(commands, timeout=600):
  """Runs commands[i] as process i of a 2-process job (2 CPU devices each); returns the
  processes and their (stdout, stderr)."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      [*cmd, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT,
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, cmd in enumerate(commands)
  ]
  return procs, [p.communicate(timeout=timeout) for p in procs]


def _one_process(args, devices=4, cache_dir=None):
  """Runs dfq_jax.main `args` as one process with `devices` CPU devices; asserts success.
  `cache_dir`: a compilation cache shared by the one-process runs of one test."""
  env = _env(devices)
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tiny_teacher_dir, tmp_path):
  one = tmp_path / "one"
  _one_process(_args(tiny_teacher_dir, one), cache_dir=tmp_path / "cache")

  two = tmp_path / "two"
  procs, outs = _two_processes([_args(tiny_teacher_dir, two)] * 2)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Process 0 prints the results; process 1 works silently.
  assert "after gdfq (final)" in outs[0][0] and "after gdfq" not in outs[1][0]

  a, b = (
    json.loads((one / "results.json").read_text()),
    json.loads((two / "results.json").read_text()),
  )
  for key in ("fp_top1", "quant_top1_before", "final_top1", "best_top1", "steps"):
    assert a[key] == b[key], key
  ra, rb = _rows(one), _rows(two)
  assert [r["step"] for r in ra] == [r["step"] for r in rb]
  for x, y in zip(ra, rb):
    for key in x:
      if key != "images_per_s":
        np.testing.assert_allclose(
          y[key], x[key], rtol=1e-4, atol=1e-6, err_msg=f"step {x['step']} {key}"
        )
  assert sorted(os.listdir(two / "samples")) == ["step_0000004.png", "step_0000008.png"]
  assert (two / "curves.png").exists() and (two / "checkpoints").is_dir()

  # The 2-process checkpoint of step 4 resumes in 1 process x 4 devices to the same end.
  resumed = tmp_path / "resumed"
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")
  (resumed / "results.json").unlink()
  proc = _one_process(_args(tiny_teacher_dir, resumed), cache_dir=tmp_path / "cache")
  assert "Resumed from" in proc.stdout and "at step 4" in proc.stdout
  c = json.loads((resumed / "results.json").read_text())
  for key in ("final_top1", "best_top1", "best_step"):
    assert c[key] == b[key], key
  for x, y in zip(_rows(two), _rows(resumed)):
    for key in x:
      if key != "images_per_s":
        np.testing.assert_allclose(
          y[key], x[key], rtol=1e-4, atol=1e-6, err_msg=f"resumed step {x['step']} {key}"
        )


def test_ptq_across_two_processes_equals_one(tiny_teacher_dir, tmp_path):
  def args(workdir):
    return [
      sys.executable,
      "-m",
      "dfq_jax.main",
      "--config=configs/demo.py:dsg_ptq,w4a4",
      f"--workdir={workdir}",
      "--config.teacher.layout=orbax",
      f"--config.teacher.weights={tiny_teacher_dir}",
      "--config.ptq.steps=5",
      "--config.ptq.batch_size=16",
      "--config.data.limit=64",
      "--config.calib.split=test",
    ]

  _one_process(args(tmp_path / "one"))
  procs, outs = _two_processes([args(tmp_path / "two")] * 2)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
  for key in ("fp_top1", "quant_top1_before", "final_top1", "synthetic_images"):
    assert a[key] == b[key], key
  x, y = (np.load(tmp_path / d / "synthetic.npz") for d in ("one", "two"))
  np.testing.assert_array_equal(x["labels"], y["labels"])
  np.testing.assert_allclose(y["images"], x["images"], rtol=1e-4, atol=1e-4)


def test_a_process_started_with_another_config_is_refused_by_name(tiny_teacher_dir, tmp_path):
  """No hang at the first collective: every process stops with one error line, exit 2."""
  workdir = tmp_path / "w"
  args = _args(tiny_teacher_dir, workdir)
  procs, outs = _two_processes([args, [*args, "--config.seed=1"]], timeout=300)
  errors = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    errors.append(lines[0])
  assert all("process(es) [1] were started with another config" in e for e in errors)
  assert "differing: config.seed" in errors[1]
  assert not (workdir / "config.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_a_rerun_resumes(tiny_teacher_dir, tmp_path):
  """launch/local_multihost.sh: kill process 1 after the step-8 checkpoint; the launcher
  stops process 0 at once with one error line, and rerunning the command resumes to the
  results of an uninterrupted run (1 process x 4 devices: the same numbers)."""

  def flags(workdir):
    return [
      *_args(tiny_teacher_dir, workdir)[3:],
      "--config.total_steps=16",
      "--config.eval_every_steps=8",
      "--config.sample_every_steps=8",
      "--heartbeat_timeout_s=10",
    ]

  ref = tmp_path / "ref"
  _one_process([sys.executable, "-m", "dfq_jax.main", *flags(ref)])

  workdir = tmp_path / "w"
  env = dict(_env(2), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")  # the launcher adds the device count
  cmd = ["bash", "launch/local_multihost.sh", "--", *flags(workdir)]
  launcher = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 400
  while not (workdir / "checkpoints" / "8").is_dir():
    assert time.time() < deadline and launcher.poll() is None, "no step-8 checkpoint"
    time.sleep(0.5)
  victim = subprocess.run(
    ["pgrep", "-f", "--", f"--workdir={workdir} .*--process_id=1"], capture_output=True, text=True
  ).stdout.split()
  assert len(victim) == 1, victim
  os.kill(int(victim[0]), signal.SIGKILL)
  killed = time.time()
  _, err = launcher.communicate(timeout=120)
  stopped_after = time.time() - killed
  print(f"launcher stopped {stopped_after:.1f} s after the kill")
  assert launcher.returncode != 0 and stopped_after < 30, (stopped_after, err[-2000:])
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "process 1 exited with code 137" in lines[0], err[-2000:]
  assert "resume from step" in lines[0]
  assert not (workdir / "results.json").exists()

  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from" in proc.stdout
  a, b = (json.loads((d / "results.json").read_text()) for d in (ref, workdir))
  for key in ("final_top1", "best_top1", "best_step", "steps"):
    assert a[key] == b[key], key
  # Rows logged after step 8 by the killed run come again from the resumed one (last wins).
  resumed = {(r["step"], frozenset(r)): r for r in _rows(workdir)}
  for x in _rows(ref):
    y = resumed[(x["step"], frozenset(x))]
    for key in x:
      if key != "images_per_s":
        np.testing.assert_allclose(
          y[key], x[key], rtol=1e-4, atol=1e-6, err_msg=f"step {x['step']} {key}"
        )


def test_a_lost_peer_is_one_error_line_naming_the_resume_step(tmp_path):
  # What a process prints when its collective fails in a multi-process run: the last
  # complete checkpoint (orbax's unfinished temporary directories do not count).
  for d in ("4", "8", "12.orbax-checkpoint-tmp-3"):
    (tmp_path / "checkpoints" / d).mkdir(parents=True)
  message = peer_lost_message(RuntimeError("Gloo AllGather failed: reset\nmore"), str(tmp_path))
  assert message.startswith("error: process 0 of 1 lost its peers (Gloo AllGather failed")
  assert message.endswith("resumes from step 8.") and "more" not in message
  assert "from the start" in peer_lost_message(RuntimeError(""), str(tmp_path / "none"))
