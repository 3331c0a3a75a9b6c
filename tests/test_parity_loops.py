"""Step-level parity: dfq_jax's jitted training step vs the original loops, iteration by iteration.

For each method, the JAX trainer (`trainer.setup_training`, the step the CLI runs) and a
PyTorch transcription of the released code's loop (tests/torch_loops.py) start from the
same teacher, student, generator and activation ranges, and are fed the same z, labels
(and DSG's SCI noise) for 5 iterations of a schedule with 1 iteration per "epoch":

  iteration 0: generator-only warm-up, ranges update      (epoch < warmup_epochs = 1)
  iteration 1: student trained, ranges update             (epoch < range_epochs = 2)
  iteration 2: ranges frozen                              (the freeze this test guards)
  iteration 3: learning rates x0.1                        (milestone 3)
  iteration 4: learning rates x0.01                       (milestone 4)

In parity mode every loss and term, the generator and student parameters and the ranges
must match to a relative 1e-5 after every iteration. AdaDFQ runs both its default
(`student_forward=shared`: two forwards while ranges update, one shared after) and parity.

Setting: the tiny digits ResNet-8 teacher (16x16 RGB, W4A4) with a width-16 generator,
batch 8. The ranges start calibrated (one min/max batch, bias correction settled:
beta_t = 0.9^200), because from zero the bias-corrected EMA overshoots so far in its
first updates that every 4-bit activation is 0 and the logits no longer depend on the
quantizer. AdaDFQ's normalised entropy H' = (H - min H)/(log C - min H) is ill-conditioned
when the student's logits equal the teacher's (H ~ log C for every sample: 0/0); at W4A4
the student's logits differ enough from this trained teacher's that log C - min H is
0.13-0.25 nats on the first batch (checked below; the teacher is trained on the machine):
H' amplifies float noise of H by 4-8, not by the 1e4 of a W8A8 student. An activation
within float noise of a 4-bit rounding boundary may still land in different levels on the
two sides: one iteration per run may carry such a flip (FLIP_RTOL).

Parameters are compared per tensor by the relative l2 error |jax - torch| / |torch|: Adam
moves every element by about lr whatever its gradient, so an element of a zero-initialised
BN bias whose gradient is tiny carries float noise of both gradients into a full step
(up to 1.2e-5 of that tensor's largest element after two steps, 3e-6 in l2).
Excluded from the parameter comparison: the biases of the three generator layers that feed
a train-mode BN (`l1`, `conv1`, `conv2`): their true gradient is exactly 0, and Adam turns
float noise of either implementation into +-lr steps. They cannot change any output.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_loops  # noqa: E402  (tests/ is on sys.path)
from dfq_test_utils import tiny_config  # noqa: E402

from dfq_jax import losses, networks, trainer  # noqa: E402
from dfq_jax import step as step_lib  # noqa: E402
from dfq_jax.models import teacher as teacher_lib  # noqa: E402
from dfq_jax.reference import torch_adadfq as ref  # noqa: E402

ITERATIONS = 5
RTOL = 1e-5
BIASES_BEFORE_TRAIN_BN = ("l1", "conv1", "conv2")
SETTLED_BETA_T = np.float32(0.9) ** 200


def _config(teacher_dir, method, parity=True, **overrides):
  values = {
    "epochs": ITERATIONS,
    "iters_per_epoch": 1,
    "total_steps": 0,
    "warmup_epochs": 1,
    "range_update_epochs": 2,
    "min_phase_steps": 0,
    "generator.milestones": (3, 4),
    "student.milestones": (3, 4),
  }
  values.update(overrides)
  return tiny_config(teacher_dir, method, parity=parity, **values)


def _calibrated_ranges(models, state, teacher_vars, z, labels):
  """One min/max range per QuantAct from the initial generator's images, EMA settled."""
  images = models.generator.apply({"params": state["gen"]["params"]}, z, labels)
  variables = {
    "params": teacher_vars["params"],
    "batch_stats": teacher_vars["batch_stats"],
    "quant_stats": state["student"]["quant_stats"],
  }
  _, upd = models.student.apply(variables, images, mutable=["quant_stats"])  # x = batch min/max
  return jax.tree.map(lambda a: a, upd["quant_stats"]), images


def _hparams(config, constants, num_classes):
  hp = {
    "lr_g": config.generator.lr,
    "lr_q": config.student.lr,
    "betas": (config.generator.b1, config.generator.b2),
    "momentum": config.student.momentum,
    "weight_decay": config.student.weight_decay,
    "milestones_g": config.generator.milestones,
    "milestones_q": config.student.milestones,
    "warmup_epochs": config.warmup_epochs,
    "range_epochs": config.range_update_epochs,
  }
  if config.method == "adadfq":
    a = config.adadfq
    hp.update(
      lambda_l=a.lambda_l,
      lambda_u=a.lambda_u,
      alpha_ds=a.alpha_ds,
      alpha_as=a.alpha_as,
      beta=a.beta,
      gamma=a.gamma,
      temperature=a.temperature,
    )
  else:
    hp.update(
      bns_weight=config.gdfq.bns_weight,
      temperature=config.gdfq.kd_temperature,
      alpha=config.gdfq.kd_alpha,
      sda_weight=config.dsg.sda_weight,
    )
  if config.method == "dsg":  # the m.npy / n.npy the code loads: ours, from the spec's recipe
    hp["margins"] = [
      (float(node["mean"]), float(node["var"]))
      for _, node in losses.layer_items(jax.device_get(constants["margins"]))
    ]
  return hp


def _assert_tree_close(jax_tree, torch_tree, what, skip=(), rtol=RTOL):
  flat_j = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(jax_tree)[0]
  }
  flat_t = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(torch_tree)[0]
  }
  assert set(flat_j) == set(flat_t), (what, set(flat_j) ^ set(flat_t))
  for key, a in flat_j.items():
    if any(f"['{s}']['bias']" == key for s in skip):
      continue
    a, b = np.asarray(a, np.float64), np.asarray(flat_t[key], np.float64)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= rtol, f"{what} {key}: |jax - torch| / |torch| = {err:.2e}"


def run_both(teacher_dir, method, **overrides):
  """Runs ITERATIONS iterations of the JAX step and of the torch loop; yields per-iteration
  (jax metrics, torch losses, jax state, torch loop)."""
  config = _config(teacher_dir, method, **overrides)
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  setup = trainer.setup_training(config, models)
  timeline = setup.timeline
  assert [timeline.phase(i) for i in range(ITERATIONS)] == [
    (False, True),
    (True, True),
    (True, False),
    (True, False),
    (True, False),
  ]
  assert timeline.student_milestones == (3, 4)
  state = jax.device_get(setup.state)
  teacher_vars = jax.device_get(models.teacher_vars)

  def latents(step):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_latent, k_loss = jax.random.split(key)
    z, labels = step_lib.sample_latents(
      k_latent, config.batch_size, models.latent_dim, models.num_classes
    )
    return z, labels, k_loss

  z0, y0, _ = latents(0)
  quant_stats, _ = _calibrated_ranges(models, state, teacher_vars, z0, y0)
  quant_stats = jax.tree.map(np.asarray, jax.device_get(quant_stats))
  for node in jax.tree.leaves(quant_stats, is_leaf=lambda n: isinstance(n, dict) and "beta_t" in n):
    node["beta_t"] = np.asarray(SETTLED_BETA_T, np.float32)
  state["student"]["quant_stats"] = quant_stats

  torch.manual_seed(0)
  teacher = torch_loops.load_resnet(ref.ResNet20(models.num_classes, depth=8), teacher_vars)
  generator = torch_loops.load_generator(
    ref.Generator(
      models.num_classes,
      models.latent_dim,
      config.image_size,
      config.channels,
      width=config.generator.width,
    ),
    state["gen"]["params"],
  )
  loop = torch_loops.OriginalLoop(
    method,
    teacher,
    generator,
    (config.quant.w_bits, config.quant.a_bits),
    _hparams(config, setup.constants, models.num_classes),
  )
  torch_loops.load_ranges(loop.student, quant_stats)
  # The starting points are equal.
  _assert_tree_close(state["gen"]["params"], torch_loops.generator_arrays(loop.generator), "G0")
  _assert_tree_close(
    state["student"]["params"], torch_loops.resnet_arrays(loop.student)["params"], "Q0"
  )

  device_state = jax.device_put(state, setup.replicated)
  for step in range(ITERATIONS):
    z, labels, k_loss = latents(step)
    noise = None
    if method == "dsg":
      shape = (config.batch_size, config.image_size, config.image_size, config.channels)
      noise = torch.tensor(np.asarray(jax.random.normal(k_loss, shape, jnp.float32))).permute(
        0, 3, 1, 2
      )
    device_state, metrics = setup.step_fn(
      device_state, setup.teacher_vars, setup.constants, *timeline.phase(step)
    )
    metrics = jax.device_get(metrics)
    torch_losses = loop.iteration(
      step, torch.tensor(np.asarray(z)), torch.tensor(np.asarray(labels), dtype=torch.long), noise
    )
    host_state = jax.device_get(device_state)
    yield step, metrics, torch_losses, host_state, loop
    # The next iteration starts from a common point: the torch parameters are set to the
    # JAX ones (they differ by ~1e-7). A 4-bit quantizer turns a 1e-8 difference of a
    # weight that sits on a rounding boundary into a whole quantization step, and inside
    # AdaDFQ's generator loss such a flip grows to 1e-3 in one iteration (measured). The
    # optimizer states are NOT synchronised: momentum and Adam moments carry each
    # implementation's own history, so their wiring across iterations is still tested.
    torch_loops.load_generator(loop.generator, host_state["gen"]["params"])
    torch_loops.load_resnet(
      loop.student,
      {
        "params": host_state["student"]["params"],
        "batch_stats": host_state["student"]["batch_stats"],
      },
    )


@pytest.fixture(autouse=True)
def _single_threaded_torch():
  """torch on one thread: with 2 threads on a loaded 2-core machine its CPU kernels gave
  the same iteration-0 loss 1.7e-5 apart between runs of the same process (measured)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


# AdaDFQ's margin h = mean relu(lambda_l - H') + mean relu(H' - lambda_u) is a small sum of
# differences of H' in [0, 1], which carries the 1/(log C - min H) amplification: it is
# compared in absolute terms, 1e-5 of H''s unit range.
ABSOLUTE_TERMS = {"generator/margin": 1e-5}


# A rounding flip: an activation within float noise of a 4-bit rounding boundary lands in
# different levels on the two sides, and that iteration's losses and updates differ by up
# to ~5e-4 (measured on the AMD EPYC machine: GDFQ's student loss 2.3e-4 and AdaDFQ's
# generator loss 2.2e-4 apart at iteration 2 of seed 0; seeds 1 and 2 matched to 1.3e-6
# everywhere). Where it happens is chance, so one flip per run is allowed: its iteration and
# the next (the optimizer states carry it on) are checked to FLIP_RTOL; the learning rates
# and the ranges stay at RTOL, and every other iteration too.
FLIP_RTOL = 2e-3
EXACT_KEYS = ("lr/generator", "lr/student")


def _check_iteration(step, metrics, torch_losses, state, loop, skip_terms=(), rtol=RTOL):
  for key, value in torch_losses.items():
    if key in skip_terms:
      continue
    if key in ABSOLUTE_TERMS:
      assert abs(float(metrics[key]) - value) <= ABSOLUTE_TERMS[key] * rtol / RTOL, (
        f"iteration {step}: {key} {float(metrics[key])} vs {value}"
      )
      continue
    np.testing.assert_allclose(
      float(metrics[key]),
      value,
      rtol=RTOL if key in EXACT_KEYS else rtol,
      atol=1e-7,
      err_msg=f"iteration {step}: {key}",
    )
  _assert_tree_close(
    state["gen"]["params"],
    torch_loops.generator_arrays(loop.generator),
    f"iteration {step}: generator",
    skip=BIASES_BEFORE_TRAIN_BN,
    rtol=rtol,
  )
  _assert_tree_close(
    state["student"]["params"],
    torch_loops.resnet_arrays(loop.student)["params"],
    f"iteration {step}: student",
    rtol=rtol,
  )
  jr, tr = state["student"]["quant_stats"], torch_loops.ranges_arrays(loop.student)
  for path in torch_loops.quant_acts(loop.student):
    a = torch_loops._get(jr, path)
    b = torch_loops._get(tr, path)
    for name in ("x_min", "x_max"):
      np.testing.assert_allclose(
        a[name], b[name], rtol=RTOL, atol=1e-7, err_msg=f"iteration {step}: range {path} {name}"
      )


@pytest.mark.parametrize(
  "method, overrides",
  [
    ("gdfq", {}),
    ("dsg", {}),
    ("adadfq", {}),
    ("adadfq", {"parity": False}),  # the fast default: shared forward once frozen
  ],
)
def test_training_step_matches_the_original_loop(tiny_teacher_dir, method, overrides):
  ranges_seen, flips = [], []
  for step, metrics, torch_losses, state, loop in run_both(tiny_teacher_dir, method, **overrides):
    # DSG's SCI term is logged only (zero gradient in the code and in parity); its value
    # depends on eigenvectors of near-degenerate spectra, computed by two LAPACK paths.
    skip = ("generator/sci", "generator/loss") if method == "dsg" else ()
    try:
      _check_iteration(step, metrics, torch_losses, state, loop, skip_terms=skip)
    except AssertionError:
      flips.append(step)
      # One flip, and its echo in the next iteration through the unsynchronised optimizer
      # states (SGD momentum carries the flipped gradient: student bn1 bias 1.3e-5 there).
      assert flips == list(range(flips[0], flips[0] + len(flips))) and len(flips) <= 2, (
        f"iterations {flips} beyond {RTOL}: more than one rounding flip"
      )
      _check_iteration(step, metrics, torch_losses, state, loop, skip_terms=skip, rtol=FLIP_RTOL)
    if method == "dsg":
      sci = float(metrics["generator/sci"]) / 7  # weight 1/L, L = 7 BN layers of ResNet-8
      np.testing.assert_allclose(
        float(metrics["generator/loss"]) - sci,
        torch_losses["generator/loss"] - torch_losses["generator/sci"] / 7,
        rtol=RTOL,
        err_msg=f"iteration {step}: loss without SCI",
      )
      np.testing.assert_allclose(
        float(metrics["generator/sci"]),
        torch_losses["generator/sci"],
        rtol=1e-3,
        err_msg=f"iteration {step}: SCI value",
      )
    ranges_seen.append(copy.deepcopy(jax.device_get(state["student"]["quant_stats"])))
  # The ranges moved while they were updating and not after the freeze (iteration 2 on).
  x_max = [float(r["act1"]["x_max"]) for r in ranges_seen]
  assert x_max[0] != x_max[1] and x_max[1] == x_max[2] == x_max[3] == x_max[4]


def test_adadfq_parity_setting_is_well_conditioned(tiny_teacher_dir):
  """The normalised entropy's denominator log C - min H stays far from 0 in this setting."""
  config = _config(tiny_teacher_dir, "adadfq")
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  setup = trainer.setup_training(config, models)
  state = jax.device_get(setup.state)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
  z, labels = step_lib.sample_latents(
    jax.random.split(key)[0], config.batch_size, models.latent_dim, models.num_classes
  )
  quant_stats, images = _calibrated_ranges(models, state, models.teacher_vars, z, labels)
  t = models.teacher.apply(models.teacher_vars, images)
  q = models.student.apply({**models.teacher_vars, "quant_stats": quant_stats}, images)
  h = losses.entropy(t - q)
  # Measured 0.25 on the AMX Xeon and 0.13 on the AMD EPYC machine (the fixture's teacher
  # is trained on the machine itself): an amplification of float noise by at most ~10.
  assert float(np.log(10) - h.min()) > 0.1
