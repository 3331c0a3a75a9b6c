"""The launch scripts, run against stand-in gcloud / srun / python / pip on PATH.

The stand-ins record their arguments; gcloud's `--command` and srun's command are then
executed for real (by bash and the stand-in python), so a quoting or argument bug of a
script shows here and not on a pod.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORDER = f"""#!{sys.executable}
import json, os, subprocess, sys
prog = os.path.basename(sys.argv[0])
with open(os.environ["RECORD"], "a") as f:
  f.write(json.dumps({{"prog": prog, "argv": sys.argv[1:],
                      "distributed": os.environ.get("DFQ_DISTRIBUTED")}}) + "\\n")
args = sys.argv[1:]
if prog == "gcloud" and "--command" in args:
  sys.exit(subprocess.run(["bash", "-c", args[args.index("--command") + 1]]).returncode)
if prog == "srun":
  sys.exit(subprocess.run(args).returncode)
"""


@pytest.fixture
def stand_ins(tmp_path):
  """(env, read_records): PATH starts with the stand-ins, HOME is a fresh directory with
  the ~/dfq_venv and ~/dfq_jax a TPU worker has after tpu_setup.sh."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  (home / "dfq_venv" / "bin").mkdir(parents=True)
  (home / "dfq_venv" / "bin" / "activate").write_text("")
  (home / "dfq_jax").mkdir()
  for prog in ("gcloud", "srun", "python", "python3", "pip"):
    path = bin_dir / prog
    path.write_text(RECORDER)
    path.chmod(0o755)
  record = tmp_path / "record.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home))
  env["RECORD"] = str(record)
  env.pop("DFQ_DISTRIBUTED", None)

  def records():
    if not record.exists():
      return []
    return [json.loads(line) for line in record.read_text().splitlines()]

  return env, records


def _launch(script, *args, env):
  return subprocess.run(
    ["bash", os.path.join(ROOT, "launch", script), *args],
    env=env,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=60,
  )


# Values that break naive quoting: ';' and '$' (a rules string), a space, a quote.
TRICKY = [
  "--config.quant.rules=^conv1$=w8;layer3=w4",
  "--config.data.root=/data/my images",
  "--config.x=it's",
]


def test_tpu_run_starts_main_on_every_worker_with_the_arguments_intact(stand_ins):
  env, records = stand_ins
  proc = _launch(
    "tpu_run.sh", "my-tpu", "us-z1", "configs/demo.py:adadfq,w4a4", "gs://b/run", *TRICKY, env=env
  )
  assert proc.returncode == 0, proc.stderr
  gcloud, python = records()
  assert gcloud["prog"] == "gcloud"
  assert gcloud["argv"][:7] == [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-tpu",
    "--zone=us-z1",
    "--worker=all",
  ]
  assert python == {
    "prog": "python",
    "argv": [
      "-m",
      "dfq_jax.main",
      "--config",
      "configs/demo.py:adadfq,w4a4",
      "--workdir",
      "gs://b/run",
      *TRICKY,
    ],
    "distributed": "1",
  }
  # A non-gs:// workdir warns; missing arguments are a usage error.
  proc = _launch("tpu_run.sh", "t", "z", "configs/demo.py", "/local/dir", env=env)
  assert proc.returncode == 0 and "not a gs:// path" in proc.stderr
  proc = _launch("tpu_run.sh", "t", "z", env=env)
  assert proc.returncode == 2 and "usage:" in proc.stderr


def test_tpu_run_reports_the_workers_failure(stand_ins, tmp_path):
  env, _ = stand_ins
  failing = tmp_path / "bin" / "python"
  failing.write_text("#!/usr/bin/env bash\necho boom >&2\nexit 3\n")
  proc = _launch("tpu_run.sh", "t", "z", "configs/demo.py", "gs://b/run", env=env)
  assert proc.returncode != 0  # not hidden by the log pipe


@pytest.mark.parametrize("project", [None, "my-project"])
def test_tpu_setup_copies_the_checkout_and_installs_on_every_worker(stand_ins, project):
  env, records = stand_ins
  proc = _launch("tpu_setup.sh", "my-tpu", "us-z1", *([project] if project else []), env=env)
  assert proc.returncode == 0, proc.stderr
  calls = records()
  scp = calls[0]["argv"]
  extra = [f"--project={project}"] if project else []
  assert scp == [
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    "--recurse",
    ROOT,
    "my-tpu:dfq_jax",
    "--zone=us-z1",
    "--worker=all",
    *extra,
  ]
  assert (
    calls[1]["argv"][:8]
    == [
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      "my-tpu",
      "--zone=us-z1",
      "--worker=all",
      *extra,
      "--command",
    ][:8]
  )
  # The remote command ran: venv, pip upgrade, the install of dfq_jax with JAX for TPU.
  progs = [(c["prog"], c["argv"]) for c in calls[2:]]
  assert progs[0] == ("python3", ["-m", "venv", os.path.join(env["HOME"], "dfq_venv")])
  assert ("pip", ["install", "jax[tpu]", "-e", os.path.join(env["HOME"], "dfq_jax")]) in progs


def test_slurm_script_runs_main_once_per_task_with_the_arguments_intact(stand_ins):
  env, records = stand_ins
  env = dict(env, CONFIG="configs/demo.py:gdfq,w4a4", WORKDIR="/shared/run one")
  proc = _launch("slurm_gpu.sbatch", *TRICKY, env=env)
  assert proc.returncode == 0, proc.stderr
  srun, python = records()
  assert srun["argv"][:3] == ["python", "-m", "dfq_jax.main"] and srun["distributed"] == "1"
  assert python["argv"] == [
    "-m",
    "dfq_jax.main",
    "--config",
    "configs/demo.py:gdfq,w4a4",
    "--workdir",
    "/shared/run one",
    *TRICKY,
  ]
  env.pop("CONFIG")
  proc = _launch("slurm_gpu.sbatch", env=env)
  assert proc.returncode != 0 and "set CONFIG" in proc.stderr
