"""Data-free PTQ: range observers, the synthesis objective and optimiser, and the run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dfq_test_utils import load_config, set_values, tiny_config

from dfq_jax import config_base, losses, networks, ptq_grid
from dfq_jax import run as run_lib
from dfq_jax.models import get_model
from dfq_jax.models import teacher as teacher_lib
from dfq_jax.ptq import pipeline, synthesis
from dfq_jax.quant import QuantPolicy, numerics
from dfq_jax.quant.calibration import calibrate_ranges

# ---- range observers (methods.md §4.1) ------------------------------------------------


def test_observer_minmax_and_sample_mean_known_values():
  x = jnp.asarray([[0.0, 1.0], [2.0, 4.0]])
  assert [float(v) for v in numerics.observe_range(x, observer="minmax")] == [0.0, 4.0]
  # Per-sample minima 0, 2 and maxima 1, 4, averaged over the batch.
  assert [float(v) for v in numerics.observe_range(x, observer="sample_mean")] == [1.0, 2.5]


def test_observer_percentile_known_values():
  x = jnp.arange(101.0).reshape(1, 101)  # 0..100: the p-th percentile is p
  lo, hi = numerics.observe_range(x, observer="percentile", percentile=99.0)
  np.testing.assert_allclose([float(lo), float(hi)], [1.0, 99.0], atol=1e-4)
  lo, hi = numerics.observe_range(x, observer="percentile", percentile=100.0)
  assert (float(lo), float(hi)) == (0.0, 100.0)
  with pytest.raises(ValueError, match="percentile"):
    numerics.observe_range(x, observer="percentile", percentile=30.0)


def test_observer_mse_keeps_an_exact_grid_and_clips_an_outlier():
  # 0..3 is exactly representable at 2 bits with the full range: no shrinking.
  exact = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  assert [float(v) for v in numerics.observe_range(exact, observer="mse", bits=2)] == [0.0, 3.0]
  # 1000 values in [0, 1] and one outlier at 10: the search shrinks the max, and the
  # chosen range has a smaller quantization error than the full one.
  x = jnp.concatenate([jnp.linspace(0.0, 1.0, 1000), jnp.asarray([10.0])])[None]
  lo, hi = numerics.observe_range(x, observer="mse", bits=4)
  assert float(lo) == 0.0 and float(hi) < 10.0
  err = lambda h: float(jnp.sum(jnp.square(x - numerics.asym_fake_quant(x, 4, lo, h))))
  assert err(hi) < err(jnp.asarray(10.0))
  # The candidates are max - k * 1 % of the range, k < 80.
  k = (10.0 - float(hi)) / 0.1
  assert abs(k - round(k)) < 1e-3 and 0 < round(k) < 80


def test_unknown_observer_is_refused():
  with pytest.raises(ValueError, match="observer"):
    numerics.observe_range(jnp.zeros((1, 2)), observer="kl")
  with pytest.raises(ValueError, match="observer"):
    QuantPolicy(observer="kl")


def test_calibration_observer_changes_the_ranges_of_the_student():
  student = get_model("resnet8_cifar", num_classes=10, quant=QuantPolicy(w_bits=4, a_bits=4))
  variables = student.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  batch = [jax.random.normal(jax.random.key(1), (16, 8, 8, 3))]
  ranges = {
    obs: calibrate_ranges(student, variables, batch, observer=obs)
    for obs in ("minmax", "sample_mean", "percentile", "mse")
  }
  top = {obs: float(r["act1"]["x_max"]) for obs, r in ranges.items()}
  # The stem activation: min/max is the widest; the others are strictly inside it.
  assert top["minmax"] > 0
  for obs in ("sample_mean", "percentile", "mse"):
    assert top[obs] < top["minmax"], (obs, top)


# ---- the synthesis optimiser ------------------------------------------------------------


def test_plateau_update_matches_torch_reduce_lr_on_plateau():
  """torch ReduceLROnPlateau(patience=2, min_lr=1e-3): lr drops after 3 bad steps."""
  lr, best, bad = jnp.float32(0.5), jnp.float32(jnp.inf), jnp.int32(0)
  lrs = []
  for loss in [1.0, 0.9, 0.95, 0.89995, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
    lr, best, bad = synthesis.plateau_update(
      lr, best, bad, jnp.float32(loss), patience=2, min_lr=1e-3
    )
    lrs.append(round(float(lr), 6))
  # After the best 0.9: 0.95, 0.89995 (not below 0.9·(1 − 1e-4): too small a gain), 0.91
  # are 3 bad steps > patience: lr x0.1; 0.5 improves; then every 3rd 0.6 cuts lr, and the
  # second cut is floored at min_lr.
  assert lrs == [
    0.5,
    0.5,
    0.5,
    0.5,
    0.05,
    0.05,
    0.05,
    0.05,
    0.005,
    0.005,
    0.005,
    0.001,
    0.001,
    0.001,
  ]


def test_bn_positions_are_the_spatial_sizes_of_each_bn_input():
  model = get_model("resnet8_cifar", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  positions = synthesis.bn_positions(model, variables, (16, 16, 3))
  assert positions == {
    "bn1": 256,
    "layer1_0": {"bn1": 256, "bn2": 256},
    "layer2_0": {"bn1": 64, "bn2": 64},
    "layer3_0": {"bn1": 16, "bn2": 16},
  }


def _tiny_teacher():
  model = get_model("resnet8_cifar", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  # Non-trivial running statistics, so margins and gaps are not all zero.
  stats = jax.tree.map(
    lambda v: v + 0.3 * jax.random.uniform(jax.random.key(3), v.shape), variables["batch_stats"]
  )
  return model, {**variables, "batch_stats": stats}


def _loss_parts(hp, x, labels, key, model, variables, margins):
  positions = synthesis.bn_positions(model, variables, x.shape[1:])

  def teacher_apply(x):
    logits, state = model.apply(variables, x, mutable=["bn_stats"])
    return logits, state["bn_stats"]

  return synthesis.synthesis_loss(
    hp,
    x,
    labels,
    key,
    teacher_apply=teacher_apply,
    running=variables["batch_stats"],
    margins=margins,
    positions=positions,
    num_layers=7,
  )


def test_zeroq_objective_is_bn_statistics_and_input_prior_only():
  model, variables = _tiny_teacher()
  hp = synthesis.PtqHparams(**config_base.PTQ_PRESETS["zeroq_ptq"])
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  total, terms = _loss_parts(
    hp, x, jnp.zeros(4, jnp.int32), jax.random.key(2), model, variables, (0.0, 0.0)
  )
  assert set(terms) == {"bn", "input_prior"}
  np.testing.assert_allclose(float(total), float(terms["bn"] + terms["input_prior"]), rtol=1e-6)
  # The ZeroQ loss by hand: Σ_l (1/B)(‖μ_b − μ_run‖² + ‖σ_b − σ_run‖²), σ from the
  # unbiased spatial variance + 1e-6.
  _, state = model.apply(variables, x, mutable=["bn_stats"])
  positions = synthesis.bn_positions(model, variables, (8, 8, 3))
  expected = 0.0
  for path, node in losses.layer_items(state["bn_stats"]):
    run = losses.lookup_layer(variables["batch_stats"], path)
    n = positions
    for key in path:
      n = n[key]
    mean, var = np.asarray(node["mean"]), np.asarray(node["var"]) * n / (n - 1)
    expected += (
      np.sum((mean - np.asarray(run["mean"])) ** 2)
      + np.sum((np.sqrt(var + 1e-6) - np.sqrt(np.asarray(run["var"]) + 1e-6)) ** 2)
    ) / 4
  np.testing.assert_allclose(float(terms["bn"]), expected, rtol=1e-5)


def test_dsg_objective_adds_each_term_with_its_weight():
  model, variables = _tiny_teacher()
  hp = synthesis.PtqHparams(**config_base.PTQ_PRESETS["dsg_ptq"])
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.asarray([0, 1, 2, 3])
  total, terms = _loss_parts(hp, x, labels, jax.random.key(2), model, variables, (0.1, 0.1))
  assert set(terms) == {"bn", "input_prior", "sci", "ce", "tv_l2", "l2"}
  expected = (
    terms["bn"]
    + terms["input_prior"]
    + terms["sci"] / 7
    + 2 * terms["ce"]
    + 0.01 * terms["tv_l2"]
    + 0.01 * terms["l2"]
  )
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
  # The slack: a margin larger than every gap leaves no alignment loss.
  _, wide = _loss_parts(hp, x, labels, jax.random.key(2), model, variables, (1e3, 1e3))
  assert float(wide["bn"]) == 0.0 and float(terms["bn"]) > 0.0


def test_logged_sci_carries_no_gradient_and_differentiable_does():
  model, variables = _tiny_teacher()
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.zeros(4, jnp.int32)
  base = dict(config_base.PTQ_PRESETS["dsg_ptq"], sci_weight=1.0)

  def grad(**kw):
    hp = synthesis.PtqHparams(**dict(base, **kw))
    return jax.grad(
      lambda x: _loss_parts(hp, x, labels, jax.random.key(2), model, variables, (0.1, 0.1))[0]
    )(x)

  np.testing.assert_array_equal(grad(sci="logged"), grad(sci="off"))
  assert float(jnp.max(jnp.abs(grad(sci="differentiable") - grad(sci="off")))) > 0


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(steps=0), "ptq.steps"),
    (dict(lse="row"), "ptq.lse"),
    (dict(sci="on"), "ptq.sci"),
    (dict(init="zeros"), "ptq.init"),
    (dict(lr=-1.0), "ptq.lr"),
    (dict(margin_percentile=101.0), "margin_percentile"),
    (dict(ce_weight=-2.0), "ce_weight"),
  ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthesis.PtqHparams(**kwargs)


@pytest.mark.parametrize("method", ["zeroq_ptq", "dsg_ptq"])
def test_synthesis_reduces_the_alignment_loss(method):
  model, variables = _tiny_teacher()
  hp = synthesis.PtqHparams(**dict(config_base.PTQ_PRESETS[method], steps=40, batch_size=8))
  synth = synthesis.make_synthesizer(hp, model, variables, jax.random.key(0), (8, 8, 3), 10)
  seen = []
  images, labels, last = synth.run_batch(
    jax.random.key(1), log=lambda t, m: seen.append(m), log_every=1
  )
  assert images.shape == (8, 8, 8, 3) and labels.shape == (8,)
  assert len(seen) == 40 and last == seen[-1]
  for term in ("loss", "bn"):
    assert seen[-1][term] < 0.75 * seen[0][term], (term, seen[0][term], seen[-1][term])


# ---- the run --------------------------------------------------------------------------


def test_ptq_run_writes_results_samples_and_diagnostics(tiny_teacher_dir, tmp_path):
  config = tiny_config(tiny_teacher_dir, "dsg_ptq")
  config.ptq.steps, config.ptq.batch_size, config.ptq.log_every_steps = 6, 16, 3
  workdir = str(tmp_path / "dsg")
  results = run_lib.run(config, workdir, log=lambda *a: None)
  for key in (
    "fp_top1",
    "quant_top1_before",
    "final_top1",
    "best_top1",
    "method",
    "bits",
    "steps",
    "wall_s",
    "synthesis_s",
    "calibration_s",
    "diversity",
  ):
    assert key in results, key
  assert results["method"] == "dsg_ptq" and results["synthetic_images"] == 16
  assert results["final_top1"] == results["best_top1"] and not results["best_is_test_selected"]
  assert results["calibration_method"] == "sample_mean"  # the DSG code's 'ema'
  assert set(results["diversity"]) == {"dsg_ptq", "real"}
  for name in (
    "results.json",
    "diversity.json",
    "diversity.png",
    "synthetic.npz",
    os.path.join("samples", "synthetic.png"),
  ):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [3, 6] and "synthesis/bn" in rows[0]


def test_synthesis_resumes_at_the_next_batch_and_matches(tiny_teacher_dir, tmp_path, monkeypatch):
  config = tiny_config(tiny_teacher_dir, "zeroq_ptq")
  config.ptq.steps, config.ptq.batch_size, config.ptq.batches = 4, 8, 2
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  quiet = lambda *a: None
  os.makedirs(tmp_path / "a")
  whole, whole_labels, _ = pipeline.synthesize(config, models, str(tmp_path / "a"), log=quiet)
  assert whole.shape == (16, 16, 16, 3)

  calls = []
  real_run_batch = synthesis.Synthesizer.run_batch

  def dies_on_the_second_batch(self, key, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return real_run_batch(self, key, **kw)

  monkeypatch.setattr(synthesis.Synthesizer, "run_batch", dies_on_the_second_batch)
  workdir = str(tmp_path / "b")
  os.makedirs(workdir)
  with pytest.raises(KeyboardInterrupt):
    pipeline.synthesize(config, models, workdir, log=quiet)
  with np.load(os.path.join(workdir, pipeline.SAMPLES_FILE)) as f:
    assert int(f["batches_done"]) == 1 and f["images"].shape[0] == 8
  messages = []
  resumed, resumed_labels, _ = pipeline.synthesize(config, models, workdir, log=messages.append)
  assert any("Resumed the synthetic set: 1/2" in m for m in messages), messages
  np.testing.assert_array_equal(resumed, whole)
  np.testing.assert_array_equal(resumed_labels, whole_labels)


def test_samples_path_is_reused_and_checked(tiny_teacher_dir, tmp_path):
  path = str(tmp_path / "set.npz")
  synthesis.save_samples(path, np.ones((4, 16, 16, 3)), np.arange(4))
  images, labels = synthesis.load_samples(path, (16, 16, 3))
  assert images.shape == (4, 16, 16, 3) and list(labels) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="made for another model"):
    synthesis.load_samples(path, (32, 32, 3))
  with pytest.raises(FileNotFoundError, match="ptq.samples_path"):
    synthesis.load_samples(str(tmp_path / "missing.npz"), (16, 16, 3))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a synthetic set"):
    synthesis.load_samples(str(tmp_path / "junk.npz"), (16, 16, 3))


def test_ptq_configs_apply_the_code_presets():
  zeroq = load_config("cifar10_resnet20.py", "zeroq_ptq,w4a4")
  dsg = load_config("cifar10_resnet20.py", "dsg_ptq,w6a6")
  assert zeroq.ptq.objective == "zeroq_ptq" and not zeroq.ptq.slack and zeroq.ptq.lr == 0.5
  assert zeroq.ptq.ce_weight == 0 and zeroq.ptq.lse == "off" and zeroq.calib.method == "minmax"
  # ZeroQ's code: one batch of 32 (uniform_test.py) started near zero (UniformDataset).
  assert zeroq.ptq.batch_size == 32 and zeroq.ptq.init == "zeroq"
  assert dsg.ptq.batch_size == 64 and dsg.ptq.init == "uniform"
  assert dsg.ptq.objective == "dsg_ptq" and dsg.ptq.slack and dsg.ptq.lr == 0.9
  assert dsg.ptq.ce_weight == 2.0 and dsg.quant.w_bits == 6 and dsg.calib.method == "sample_mean"
  for name in ("imagenet_resnet18.py", "imagenet_resnet50.py", "imagenet_mobilenetv2.py"):
    assert load_config(name, "dsg_ptq,w4a4").ptq.objective == "dsg_ptq"


@pytest.mark.parametrize(
  "override, message",
  [
    ({"method": "dsg_ptq"}, "with the config argument"),
    ({"calib.method": "kl"}, "calib.method"),
    ({"calib.percentile": 10.0}, "calib.percentile"),
  ],
)
def test_bad_ptq_settings_stop_before_work(tiny_teacher_dir, tmp_path, override, message):
  config = set_values(tiny_config(tiny_teacher_dir, "gdfq"), **override)
  with pytest.raises(ValueError, match=message):
    run_lib.run(config, str(tmp_path / "w"), log=lambda *a: None)
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_ptq_grid_tables_every_set_and_observer(tiny_teacher_dir, tmp_path):
  config = tiny_config(tiny_teacher_dir, "gdfq")
  config.ptq.steps, config.ptq.batch_size = 4, 16
  observers = ("sample_mean", "mse")
  table = ptq_grid.ptq_grid(
    config, ["w4a4"], str(tmp_path), observers=observers, log=lambda *a: None
  )
  assert set(table["cells"]) == {f"w4a4,{s},{o}" for s in ptq_grid.SOURCES for o in observers}
  assert table["calibration_images"] == 16 and set(table["diversity"]) == {"real", "zeroq", "dsg"}
  # The PTQ runs' own results agree with the grid's cell of the same setting.
  with open(tmp_path / "dsg_ptq" / "results.json") as f:
    dsg_run = json.load(f)
  assert dsg_run["bits"] == "W4A4" and dsg_run["calibration_method"] == "sample_mean"
  assert table["cells"]["w4a4,dsg,sample_mean"]["top1"] == dsg_run["final_top1"]
  md = (tmp_path / "ptq_grid.md").read_text()
  assert "| W4A4 | DSG samples |" in md and "**" in md
  assert os.path.getsize(tmp_path / "diversity.png") > 0
  assert "zeroq" in (tmp_path / "diversity.md").read_text()


def test_zeroq_initial_images_are_the_codes_255_levels_near_zero():
  hp = synthesis.PtqHparams(**config_base.PTQ_PRESETS["zeroq_ptq"])
  x = np.asarray(synthesis.initial_images(hp, jax.random.key(0), (32, 32, 3)))
  assert x.shape == (32, 32, 32, 3)
  levels = x * 5418.75 + 127.5  # (randint(0, 255) - 127.5) / 5418.75
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  assert levels.min() >= -1e-3 and levels.max() <= 254 + 1e-3
  assert -0.0236 < x.min() < -0.0230 and 0.0230 < x.max() < 0.0236
  assert abs(x.mean()) < 1e-3  # U(-0.0235, 0.0235): the code's "mean 0" (var ~1.8e-4)


def test_synthesis_step_takes_the_teacher_weights_as_an_argument():
  # Not a closure: XLA compiles closed-over weights as constants (a ResNet-50: ~100 s).
  # Other weights through the same compiled step give another gradient, with no recompile.
  model, variables = _tiny_teacher()
  hp = synthesis.PtqHparams(**dict(config_base.PTQ_PRESETS["zeroq_ptq"], steps=1, batch_size=8))
  synth = synthesis.make_synthesizer(hp, model, variables, jax.random.key(0), (8, 8, 3), 10)
  labels = jnp.zeros((8,), jnp.int32)
  other = jax.tree.map(lambda a: a * 1.5, variables)
  outs = []
  for weights in (variables, other):
    carry = synth.init_carry(jax.random.key(1))
    outs.append(np.asarray(synth.step(carry, weights, labels, jax.random.key(2))[0]["x"]))
  assert synth.step._cache_size() == 1
  assert np.abs(outs[0] - outs[1]).max() > 1e-3
