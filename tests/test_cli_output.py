"""What a CLI user sees: a quiet run by default, the libraries' INFO records on request."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tiny_teacher_dir, workdir, *extra):
  args = [
    sys.executable,
    "-m",
    "dfq_jax.main",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--config.teacher.layout=orbax",
    f"--config.teacher.weights={tiny_teacher_dir}",
    "--config.total_steps=6",
    "--config.ckpt_every_steps=3",
    "--config.eval_every_steps=6",
    "--config.generator.width=16",
    "--config.batch_size=8",
    "--config.data.limit=64",
    "--config.sample_every_steps=6",
    "--config.min_phase_steps=2",
    *extra,
  ]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def _info_records(text):
  """absl INFO lines ('I1201 08:16:01.803190 ...') such as orbax's checkpoint records."""
  return [
    line for line in text.splitlines() if len(line) > 5 and line[0] == "I" and line[1:5].isdigit()
  ]


def test_default_run_has_no_library_info_records(tiny_teacher_dir, tmp_path):
  quiet = _run(tiny_teacher_dir, tmp_path / "quiet")
  assert _info_records(quiet.stderr + quiet.stdout) == []
  assert "after gdfq (final)" in quiet.stdout  # the results table is still there
  assert "lift of gdfq (final - before)" in quiet.stdout
  assert f"Curves: {tmp_path / 'quiet' / 'curves.png'}" in quiet.stdout
  assert f"Samples: {tmp_path / 'quiet' / 'samples' / 'step_0000006.png'}" in quiet.stdout
  loud = _run(tiny_teacher_dir, tmp_path / "loud", "--verbosity=0")
  assert any("checkpoint" in line.lower() for line in _info_records(loud.stderr))


def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path):
  cases = [
    (["--config=configs/demo.py:gdfq,w9a9"], "quant.w_bits=9"),
    (
      [
        "--config=configs/demo.py",
        "--config.teacher.layout=akamaster",
        "--config.teacher.weights=README.md",
      ],
      "README.md",
    ),
    (
      [
        "--config=configs/demo.py",
        "--config.data.source=imagefolder",
        f"--config.data.root={tmp_path}",
      ],
      "Split folder",
    ),
  ]
  for args, needle in cases:
    proc = subprocess.run(
      [sys.executable, "-m", "dfq_jax.main", *args, f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
  # --verbosity=1: the traceback, for a bug report.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.main",
      *cases[0][0],
      "--verbosity=1",
      f"--workdir={tmp_path / 'w'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_show_config_lists_every_key_with_its_value_and_comment(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfq_jax.main",
      "--config=configs/cifar10_resnet20.py:adadfq,w3a3",
      "--show_config",
      f"--workdir={tmp_path / 'w'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert "quant.w_bits = 3" in lines and "method = 'adadfq'" in lines
  assert any(
    line.startswith("range_update_epochs = 4    # activation ranges update") for line in lines
  )
  assert len(lines) > 100 and not (tmp_path / "w").exists()
