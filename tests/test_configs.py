"""Every config file loads for every method and bit-width; bad configs stop before work."""

import glob
import json
import os
import subprocess
import sys

import pytest
from dfq_test_utils import load_config

from dfq_jax import config_base
from dfq_jax.quant import QuantPolicy
from dfq_jax.quant.config import parse_rules, policy_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path, arg):
  import importlib.util

  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize(
  "arg", ["gdfq,w4a4", "dsg,w3a3", "adadfq,w5a5", "eval,w8a8", "adadfq,w4a4,parity"]
)
def test_config_files_load(path, arg):
  c = _load(path, arg)
  method, bits = arg.split(",")[:2]
  assert c.method == method
  assert f"w{c.quant.w_bits}a{c.quant.a_bits}" == bits
  assert isinstance(policy_from_config(c), QuantPolicy)
  assert c.parity == arg.endswith("parity")


def test_paper_defaults():
  c10 = _load(os.path.join(ROOT, "configs", "cifar10_resnet20.py"), "gdfq,w4a4")
  assert (c10.batch_size, c10.student.lr, c10.warmup_epochs) == (200, 1e-4, 4)
  assert _load(os.path.join(ROOT, "configs", "cifar10_resnet20.py"), "adadfq").batch_size == 16
  r50 = _load(os.path.join(ROOT, "configs", "imagenet_resnet50.py"), "adadfq,w3a3")
  assert (r50.warmup_epochs, r50.adadfq.lambda_l, r50.adadfq.temperature) == (100, 0.4, 5.0)
  assert r50.student.milestones == (150, 300, 400)


@pytest.mark.parametrize("arg", ["w9a4", "w1a1", "foo", "w4a4,teacher=nope"])
def test_bad_config_arguments(arg):
  path = os.path.join(ROOT, "configs", "cifar10_resnet20.py")
  if arg.startswith("w9") or arg.startswith("w1"):
    c = _load(path, arg)
    with pytest.raises(ValueError, match="not supported"):
      policy_from_config(c)
  else:
    with pytest.raises(ValueError, match="unknown"):
      _load(path, arg)


def test_quant_rules_parse():
  assert parse_rules("conv1=w8; linear=w8a8;act=afp") == (
    ("conv1", 8, None),
    ("linear", 8, 8),
    ("act", None, 32),
  )
  for bad in ("conv1", "conv1=x8", "conv1="):
    with pytest.raises(ValueError, match="quant rule"):
      parse_rules(bad)


def _cli(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "dfq_jax.main", *args, f"--workdir={tmp_path / 'w'}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/cifar10_resnet20.py:sgd"], "config argument 'sgd' is unknown"),
    (
      [
        "--config=configs/cifar10_resnet20.py:eval,w9a9",
        "--config.teacher.weights=/nonexistent.th",
      ],
      "w_bits=9 is not supported",
    ),
    (
      [
        "--config=configs/cifar10_resnet20.py:eval",
        "--config.teacher.weights=/nonexistent.th",
        "--config.data.root=.",
      ],
      "does not exist",
    ),
    (["--config=configs/cifar10_resnet20.py:eval"], "teacher.weights is empty"),
    (["--config=configs/demo.py", "--config.no_such_key=1"], "no_such_key"),
    (["--config=configs/demo.py", "--config.quant.range_mode=foo"], "range_mode"),
    # Spellings of earlier versions name their replacement.
    (["--config=configs/demo.py", "--config.quant.range_mode=parity"], "'bias_corrected'"),
    (["--config=configs/demo.py:dsg", "--config.dsg.lse=sample"], "'modulo'"),
    (["--config=configs/demo.py", "--config.generator.dtype=bfloat16"], "'compute_dtype'"),
    # Parity is the ':parity' argument (it sets keys); the flag alone would set none.
    (["--config=configs/demo.py:adadfq", "--config.parity=True"], "not with --config.parity"),
    (["--config=configs/demo.py:dsg", "--config.dsg.lse=channel"], "dsg.sda_form"),
  ],
)
def test_cli_rejects_bad_input_before_work(tmp_path, args, message):
  proc = _cli(tmp_path, *args)
  # One `error:` line naming the problem, exit code 2, no traceback.
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  # Nothing was written: the workdir was not even created.
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_parity_is_plain_keys_that_can_be_overridden():
  c = load_config("cifar10_resnet20.py", "dsg,w4a4,parity")
  assert c.parity and c.dsg.sda_form == "batch" and c.dsg.lse == "channel"
  assert c.student_forward == "separate" and c.eval_every_steps == 0
  for key, value in config_base.PARITY.items():
    node = c
    for part in key.split("."):
      node = node[part]
    assert node == value, key
  # One quirk switched back: still a valid parity config.
  c.dsg.sci = "differentiable"
  config_base.check_config_keys(c)
  assert not load_config("cifar10_resnet20.py", "dsg,w4a4").parity


def test_a_config_saved_by_an_earlier_version_reads_in_todays_schema(tmp_path):
  """config.json of a run started before the renames: it resumes and exports."""
  from dfq_jax import run as run_lib

  now = load_config("cifar10_resnet20.py", "dsg,w4a4,parity")
  old = json.loads(load_config("cifar10_resnet20.py", "dsg,w4a4").to_json())
  old["parity"] = True  # the old meaning: every quirk, decided in the methods
  old["quant"]["range_mode"] = "parity"
  old["generator"]["dtype"] = "float32"
  del old["dsg"]["sda_form"], old["compute_dtype"]
  old["dsg"]["lse"] = "sample"
  read = config_base.from_saved(old)
  assert json.loads(read.to_json()) == json.loads(now.to_json())
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints").mkdir()
  run_lib.prepare_workdir(str(tmp_path), now, restart=False)  # no conflict
