"""End-to-end tests of the shared trainer on a tiny configuration (digits, ResNet-8)."""

import json
import os

import jax
import numpy as np
import pytest
from dfq_test_utils import tiny_config

from dfq_jax import checkpoint as checkpoint_lib
from dfq_jax import networks, trainer
from dfq_jax import run as run_lib
from dfq_jax import step as step_lib
from dfq_jax.interfaces import NonFiniteError
from dfq_jax.models import teacher as teacher_lib


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore_latest(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir)
  state = ckpt.manager.restore(ckpt.latest_step())
  ckpt.close()
  return state


@pytest.mark.parametrize("method", ["gdfq", "dsg", "adadfq"])
def test_each_method_trains_and_writes_outputs(tiny_teacher_dir, tmp_path, method):
  workdir = str(tmp_path / method)
  results = run_lib.run(tiny_config(tiny_teacher_dir, method), workdir, log=lambda *a: None)
  for key in (
    "fp_top1",
    "quant_top1_before",
    "final_top1",
    "best_top1",
    "best_step",
    "method",
    "bits",
    "steps",
    "wall_s",
  ):
    assert key in results, key
  assert results["method"] == method and results["steps"] == 8 and results["bits"] == "W4A4"
  assert 0 <= results["final_top1"] <= 100 and results["best_step"] in (4, 8)
  rows = _read_metrics(workdir)
  train_rows = [r for r in rows if "generator/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
  expected_terms = {
    "gdfq": ("generator/ce", "generator/bns", "student/kd", "student/ce"),
    "dsg": ("generator/ce", "generator/sda", "generator/sci", "student/kd"),
    "adadfq": (
      "generator/margin",
      "generator/ds",
      "generator/as",
      "generator/bns",
      "student/entropy_loss",
    ),
  }[method]
  for term in expected_terms:
    assert all(np.isfinite(r[term]) for r in train_rows), term
  # Warm-up (2 steps): the student's learning rate is 0, then the paper's.
  assert train_rows[0]["lr/student"] == 0.0 and train_rows[1]["lr/student"] > 0.0
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
  from PIL import Image

  with Image.open(os.path.join(workdir, "curves.png")) as img:  # top-1 and losses vs steps
    assert img.size == (720, 272)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["final_top1"] == results["final_top1"]


def test_student_is_updated_only_after_warmup_and_ranges_freeze(tiny_teacher_dir, tmp_path):
  config = tiny_config(tiny_teacher_dir, total_steps=2, min_phase_steps=2, ckpt_every_steps=1)
  workdir = str(tmp_path / "w")
  run_lib.run(config, workdir, log=lambda *a: None)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  s1 = ckpt.manager.restore(1)
  s2 = ckpt.manager.restore(2)
  ckpt.close()
  # Student parameters are still the teacher's during warm-up; the generator moved.
  for a, b in zip(
    jax.tree.leaves(s1["student"]["params"]), jax.tree.leaves(s2["student"]["params"])
  ):
    np.testing.assert_array_equal(a, b)
  g1, g2 = jax.tree.leaves(s1["gen"]["params"]), jax.tree.leaves(s2["gen"]["params"])
  assert any(not np.array_equal(a, b) for a, b in zip(g1, g2))
  # Ranges moved in both steps (they update while step < 2).
  assert float(s2["student"]["quant_stats"]["act1"]["x_max"]) != float(
    s1["student"]["quant_stats"]["act1"]["x_max"]
  )


def test_killed_run_resumes_to_the_same_final_state(tiny_teacher_dir, tmp_path, monkeypatch):
  config = tiny_config(tiny_teacher_dir, "adadfq")
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = run_lib.run(config, ref_dir, log=lambda *a: None)

  real_make = step_lib.make_train_step

  def crashing_make(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def wrapped(state, *rest):
      if int(state["step"]) == 5:  # after the checkpoint at step 4, before step 6's
        raise KeyboardInterrupt("simulated kill")
      return step(state, *rest)

    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", crashing_make)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, cut_dir, log=lambda *a: None)
  assert not os.path.exists(os.path.join(cut_dir, "results.json"))
  monkeypatch.setattr(step_lib, "make_train_step", real_make)
  resumed = run_lib.run(config, cut_dir, log=lambda *a: None)

  for key in ("final_top1", "best_top1", "best_step", "fp_top1", "quant_top1_before"):
    assert resumed[key] == ref[key], key
  a, b = _restore_latest(ref_dir), _restore_latest(cut_dir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # metrics.jsonl of the resumed run equals the uninterrupted one (timings aside).
  strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
  assert strip(_read_metrics(cut_dir)) == strip(_read_metrics(ref_dir))


def test_workdir_with_another_config_is_refused_then_archived(tiny_teacher_dir, tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config(tiny_teacher_dir)
  run_lib.prepare_workdir(workdir, config, restart=False)
  open(os.path.join(workdir, "metrics.jsonl"), "w").close()  # the run has started
  run_lib.prepare_workdir(workdir, config, restart=False)  # same config: fine
  config.eval_every_steps = 2  # resumable key: fine
  run_lib.prepare_workdir(workdir, config, restart=False)
  other = tiny_config(tiny_teacher_dir, "dsg")
  with pytest.raises(run_lib.WorkdirConflictError, match="method"):
    run_lib.prepare_workdir(workdir, other, restart=False)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"] == "gdfq"  # untouched
  run_lib.prepare_workdir(workdir, other, restart=True)
  archived = [d for d in os.listdir(workdir) if d.startswith("previous-")]
  assert len(archived) == 1
  with open(os.path.join(workdir, archived[0], "config.json")) as f:
    assert json.load(f)["method"] == "gdfq"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"] == "dsg"


def test_non_finite_loss_stops_with_step_and_term(tiny_teacher_dir, tmp_path):
  config = tiny_config(tiny_teacher_dir, **{"generator.lr": float("nan")})
  with pytest.raises(NonFiniteError, match=r"step \d+: generator/"):
    run_lib.run(config, str(tmp_path / "nan"), log=lambda *a: None)


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tiny_teacher_dir, tmp_path):
  import signal
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "preempt"
  args = [
    sys.executable,
    "-m",
    "dfq_jax.main",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--config.teacher.layout=orbax",
    f"--config.teacher.weights={tiny_teacher_dir}",
    "--config.total_steps=400",
    "--config.ckpt_every_steps=1000",
    "--config.eval_every_steps=1000",
    "--config.log_every_steps=1",
    "--config.generator.width=16",
    "--config.batch_size=8",
    "--config.data.limit=64",
    "--config.sample_every_steps=0",
  ]
  proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "checkpoint written at step" in err
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  stopped_at = ckpt.latest_step()
  ckpt.close()
  assert 3 <= stopped_at < 400  # a checkpoint the periodic schedule would not have written
  # The same command resumes from that step and finishes.
  done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"at step {stopped_at}" in done.stdout
  with open(workdir / "results.json") as f:
    assert json.load(f)["steps"] == 400
  assert [r["step"] for r in _read_metrics(str(workdir)) if "generator/loss" in r] == list(
    range(1, 401)
  )


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny_teacher_dir, tmp_path):
  config = tiny_config(tiny_teacher_dir, total_steps=4, eval_every_steps=4)
  a = run_lib.run(config, str(tmp_path / "a"), log=lambda *a: None)
  b = run_lib.run(config, str(tmp_path / "b"), log=lambda *a: None)
  run_lib.run(
    tiny_config(tiny_teacher_dir, total_steps=4, eval_every_steps=4, seed=1),
    str(tmp_path / "c"),
    log=lambda *a: None,
  )
  for key in ("final_top1", "best_top1", "quant_top1_before"):
    assert a[key] == b[key], key
  sa, sb, sc = (_restore_latest(str(tmp_path / d)) for d in "abc")
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(
    sa["gen"]["params"]["conv3"]["kernel"], sc["gen"]["params"]["conv3"]["kernel"]
  )


def test_shared_student_forward_equals_two_forwards_once_ranges_freeze(tiny_teacher_dir):
  setups = {}
  for mode in ("separate", "shared"):
    config = tiny_config(tiny_teacher_dir, "adadfq", student_forward=mode)
    models = networks.build_models(config, teacher_lib.load_teacher(config))
    setups[mode] = trainer.setup_training(config, models)
  sep = setups["separate"]
  state = sep.state
  for _ in range(2):  # warm-up and range updates (min_phase_steps=2)
    state, _ = sep.step_fn(state, sep.teacher_vars, sep.constants, False, True)
  start = jax.device_get(state)
  out = {}
  for mode, setup in setups.items():
    s = jax.device_put(start)
    for _ in range(3):
      s, metrics = setup.step_fn(s, setup.teacher_vars, setup.constants, True, False)
    out[mode] = (jax.device_get(s), jax.device_get(metrics))
  (s_sep, m_sep), (s_sh, m_sh) = out["separate"], out["shared"]
  for key in m_sep:
    np.testing.assert_allclose(m_sh[key], m_sep[key], rtol=1e-4, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(s_sep["student"]), jax.tree.leaves(s_sh["student"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s_sh["step"]) == 5


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
def test_frozen_ranges_train_the_quantizer_that_is_evaluated(tiny_teacher_dir, method):
  """After the freeze, the training step's student forward is the evaluation forward.

  The student loss the step reports is recomputed from the evaluation path (the student
  applied with its stored, immutable ranges) on the same generated images; before the
  fix the step quantized with a batch-updated range and the loss differed by ~1 %.
  """
  from dfq_jax.methods import get_method

  # Plain EMA ranges: after only 2 range steps the bias-corrected EMA still overshoots so
  # far that every activation quantizes to 0 and the logits do not depend on the range.
  config = tiny_config(tiny_teacher_dir, method, **{"quant.range_mode": "ema"})
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  setup = trainer.setup_training(config, models)
  state = setup.state
  for i in range(2):  # warm-up and range updates (min_phase_steps=2)
    assert setup.timeline.phase(i) == (False, True)
    state, _ = setup.step_fn(state, setup.teacher_vars, setup.constants, False, True)
  assert setup.timeline.phase(2) == (True, False)
  before = jax.device_get(state)
  state, metrics = setup.step_fn(state, setup.teacher_vars, setup.constants, True, False)
  after = jax.device_get(state)
  # The stored ranges did not move.
  for a, b in zip(
    jax.tree.leaves(before["student"]["quant_stats"]),
    jax.tree.leaves(after["student"]["quant_stats"]),
  ):
    np.testing.assert_array_equal(a, b)
  # The same z, labels and images as the step drew (trainer.step_fn's key schedule).
  key = jax.random.fold_in(jax.random.wrap_key_data(before["rng"]), 2)
  z, labels = step_lib.sample_latents(
    jax.random.split(key)[0], config.batch_size, models.latent_dim, models.num_classes
  )
  images = models.generator.apply({"params": before["gen"]["params"]}, z, labels)
  t_logits = models.teacher.apply(models.teacher_vars, images)
  student_vars = {k: before["student"][k] for k in ("params", "batch_stats", "quant_stats")}
  s_logits = jax.jit(models.student.apply)(student_vars, images)  # = evaluation
  method_mod = get_method(method)
  loss, _ = method_mod.student_loss(
    method_mod.hparams(config), student_logits=s_logits, teacher_logits=t_logits, labels=labels
  )
  np.testing.assert_allclose(float(metrics["student/loss"]), float(loss), rtol=2e-6)
  # A forward with mutable ranges (what the buggy step ran) gives other logits here.
  mutated, _ = models.student.apply(student_vars, images, mutable=["quant_stats"])
  assert np.abs(np.asarray(mutated) - np.asarray(s_logits)).max() > 1e-3


def test_quant_act_frozen_range_quantizes_with_the_stored_range():
  """methods.md §2.3: frozen = quantize with the stored range; nothing of the batch enters."""
  import jax.numpy as jnp

  from dfq_jax.quant.layers import QuantAct, QuantPolicy

  act = QuantAct(QuantPolicy(w_bits=4, a_bits=4))
  x = jnp.linspace(0.0, 2.0, 64)
  stats = {
    "quant_stats": {
      "x_min": jnp.float32(0.0),
      "x_max": jnp.float32(1.0),
      "beta_t": jnp.float32(0.5),
    }
  }
  frozen = act.apply(stats, x)
  assert float(frozen.max()) == pytest.approx(1.0, abs=1e-6)
  updating, upd = act.apply(stats, x, mutable=["quant_stats"])
  # The range phase: one update of the bias-corrected EMA, then quantize with it.
  expected_max = (1.0 * np.float32(0.9) + 2.0 * (1 - np.float32(0.9))) / (1 - 0.5 * np.float32(0.9))
  np.testing.assert_allclose(float(upd["quant_stats"]["x_max"]), expected_max, rtol=1e-6)
  assert float(updating.max()) == pytest.approx(expected_max, rel=1e-5)


def test_workdir_of_a_run_that_never_started_takes_a_corrected_config(tiny_teacher_dir, tmp_path):
  workdir = str(tmp_path / "w")
  run_lib.prepare_workdir(workdir, tiny_config(tiny_teacher_dir), restart=False)
  os.makedirs(os.path.join(workdir, "teacher"))  # e.g. a converted teacher, then a failure
  fixed = tiny_config(tiny_teacher_dir, "dsg")
  run_lib.prepare_workdir(workdir, fixed, restart=False)  # nothing to protect: accepted
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"] == "dsg"
  archived = [d for d in os.listdir(workdir) if d.startswith("previous-")]
  assert len(archived) == 1  # the old config and its leftovers, kept together
  assert sorted(os.listdir(os.path.join(workdir, archived[0]))) == ["config.json", "teacher"]
