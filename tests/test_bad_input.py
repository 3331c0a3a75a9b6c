"""Bad input that must be answered by a clear error, with nothing written lost."""

import json
import os
import re
import stat

import jax
import pytest
from dfq_test_utils import cli_error, tiny_cli_args, tiny_config

from dfq_jax import run as run_lib


def test_read_only_workdir_is_refused(tiny_teacher_dir, tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root ignores directory permissions")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
  with pytest.raises(PermissionError, match="not writable"):
    run_lib.run(tiny_config(tiny_teacher_dir), str(ro / "w"), log=lambda *a: None)
  assert "not writable" in cli_error(ro / "w", *tiny_cli_args(tiny_teacher_dir))


def test_workdir_path_through_a_file_is_refused(tiny_teacher_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(OSError, match="cannot create workdir"):
    run_lib.run(tiny_config(tiny_teacher_dir), str(blocker / "w"), log=lambda *a: None)
  assert "cannot create workdir" in cli_error(blocker / "w", *tiny_cli_args(tiny_teacher_dir))


def test_corrupted_teacher_file_names_the_problem(tiny_teacher_dir, tmp_path):
  pytest.importorskip("torch")
  bad = tmp_path / "teacher.th"
  bad.write_bytes(b"this is not a pytorch checkpoint")
  config = tiny_config(tiny_teacher_dir)
  config.teacher.weights, config.teacher.layout = str(bad), "akamaster"
  with pytest.raises(Exception, match="teacher.th"):
    run_lib.run(config, str(tmp_path / "w"), log=lambda *a: None)
  args = [*tiny_cli_args(tiny_teacher_dir), f"--config.teacher.weights={bad}"]
  assert "teacher.th" in cli_error(tmp_path / "cli", *args, "--config.teacher.layout=akamaster")


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tiny_teacher_dir, tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config(tiny_teacher_dir, total_steps=4, ckpt_every_steps=2)
  run_lib.run(config, workdir, log=lambda *a: None)
  # Truncate every data file of the step-4 checkpoint.
  step4 = os.path.join(workdir, "checkpoints", "4")
  for dirpath, _, files in os.walk(step4):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 64 and not name.endswith(".json"):
        with open(path, "r+b") as f:
          f.truncate(16)
  config.total_steps = 6
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  saved["total_steps"] = 6
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  messages = []
  results = run_lib.run(config, workdir, log=messages.append)
  assert any("cannot be restored" in m for m in messages), messages
  assert any("at step 2" in m for m in messages), messages
  assert results["steps"] == 6
  # The unreadable checkpoint was kept aside, not deleted.
  assert os.path.isdir(os.path.join(workdir, "checkpoints.unreadable", "4"))


@pytest.mark.parametrize(
  "override, message",
  [
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"total_steps": -1}, "total_steps=-1"),
    ({"stats_scope": "node"}, "stats_scope"),
    ({"calib.source": "web"}, "calib.source"),
    ({"data.source": "lmdb"}, "data.source"),
    ({"teacher.model": "vgg16"}, "vgg16"),
    ({"num_classes": 100}, "classes"),
    ({"image_size": 32}, "expects 32x32"),
    ({"dsg.sci": "sometimes"}, "dsg.sci"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"generator.conv_impl": "fft"}, "generator.conv_impl"),
    ({"cpu_conv_kernels": "onednn"}, "cpu_conv_kernels"),
  ],
)
def test_invalid_settings(tiny_teacher_dir, tmp_path, override, message):
  config = tiny_config(tiny_teacher_dir, "dsg", **override)
  with pytest.raises(Exception, match=message):
    run_lib.run(config, str(tmp_path / "w"), log=lambda *a: None)
  assert not os.path.exists(tmp_path / "w" / "results.json")
  # Through the CLI: one error line naming it, exit code 2.
  args = [f"--config.{k}={v}" for k, v in override.items()]
  line = cli_error(tmp_path / "cli", *tiny_cli_args(tiny_teacher_dir), *args)
  assert re.search(message, line), line
  assert not os.path.exists(tmp_path / "cli" / "results.json")


def test_batch_not_divisible_by_devices_message():
  from dfq_test_utils import load_config

  config = load_config("demo.py")
  config.batch_size = jax.device_count() * 3 + (1 if jax.device_count() > 1 else 0)
  if jax.device_count() == 1:
    pytest.skip("every batch divides one device (covered by the 8-device tests)")
  with pytest.raises(ValueError, match="not divisible"):
    run_lib.validate_config(config)


def test_full_disk_keeps_the_previous_results_file(tmp_path, monkeypatch):
  import errno

  from dfq_jax import metrics as metrics_lib

  path = tmp_path / "results.json"
  metrics_lib.write_json_atomic(str(path), {"final_top1": 50.0})

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(metrics_lib.os, "replace", no_space)
  with pytest.raises(OSError, match="No space"):
    metrics_lib.write_json_atomic(str(path), {"final_top1": 99.0})
  assert json.loads(path.read_text()) == {"final_top1": 50.0}  # old file intact
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_sigkill_at_an_arbitrary_point_then_resume_matches(tiny_teacher_dir, tmp_path):
  import signal
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def args(workdir):
    return [
      sys.executable,
      "-m",
      "dfq_jax.main",
      "--config=configs/demo.py:adadfq",
      f"--workdir={workdir}",
      "--config.teacher.layout=orbax",
      f"--config.teacher.weights={tiny_teacher_dir}",
      "--config.total_steps=60",
      "--config.ckpt_every_steps=7",
      "--config.eval_every_steps=30",
      "--config.log_every_steps=1",
      "--config.generator.width=16",
      "--config.batch_size=8",
      "--config.data.limit=64",
      "--config.sample_every_steps=0",
      "--config.min_phase_steps=10",
    ]

  ref = subprocess.run(
    args(tmp_path / "ref"), cwd=root, capture_output=True, text=True, timeout=600
  )
  assert ref.returncode == 0, ref.stderr[-2000:]
  cut = tmp_path / "cut"
  proc = subprocess.Popen(args(cut), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = cut / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # no handler can run: mid-step or mid-checkpoint
  proc.wait(timeout=60)
  assert not (cut / "results.json").exists()
  again = subprocess.run(args(cut), cwd=root, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resumed from" in again.stdout
  a = json.loads((tmp_path / "ref" / "results.json").read_text())
  b = json.loads((cut / "results.json").read_text())
  for key in ("final_top1", "best_top1", "best_step", "quant_top1_before", "fp_top1"):
    assert a[key] == b[key], key
