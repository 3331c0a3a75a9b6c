"""Data-free mixed precision: per-layer bit-widths from a sensitivity on synthetic images.

config.quant.mixed -> `MixedSpec` (budgets, candidate bits, where the images come from)
slots        every weight quantizer (a conv/dense kernel) and activation quantizer (a
             QuantAct) of the student, with its size: kernel elements, or activation
             elements per image
sensitivity  Ω(slot, b) = mean over images of KL(teacher ‖ network with only that slot
             at b bits), ZeroQ (Cai et al. 2020, §3.3), on synthetic images; one jitted
             map over every (slot, b) of a probe policy (bit-widths are inputs)
allocation   one bit-width per slot with Σ size·bits ≤ budget·Σ size minimising Σ Ω,
             solved exactly (dynamic programming over Pareto fronts); weights and
             activations have separate budgets
refinement   (quant.mixed.refine rounds) a local search on the measured whole-network KL:
             Ω measured again around the allocation (every other slot at its allocated
             width, not FP) proposes moves within one level and pair exchanges; the
             best measured one is taken while the KL falls, on the search images and
             (quant.mixed.refine_holdout) on a held-out set of as many images
rules        the allocation as quant.rules ('^layer1_0/conv1$=w3;...'), so every method
             (eval, PTQ, GDFQ, DSG, AdaDFQ) trains or calibrates with it and the export
             reads it back
<workdir>/mixed_precision.json (per layer: bits, size, sensitivity) and mixed_precision.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dfq_jax import metrics as metrics_lib
from dfq_jax import parallel, xla_options
from dfq_jax.config_base import apply_ptq_preset
from dfq_jax.data import eval_set as eval_set_lib
from dfq_jax.models.teacher import teacher_model
from dfq_jax.ptq import synthesis
from dfq_jax.quant import calibration, numerics
from dfq_jax.quant.config import policy_from_config
from dfq_jax.quant.layers import FULL_PRECISION, PROBE_BITS, QConv, QDense, QuantAct, QuantPolicy

REPORT_FILE = "mixed_precision.json"
PLOT_FILE = "mixed_precision.png"
IMAGES_FILE = "mixed_images.npz"  # the synthesised images (quant.mixed.samples_path of
# another run: e.g. the other budgets of `bench mixed`, which skip the synthesis)
# dsg / zeroq: images synthesised from the teacher's BN statistics with that PTQ preset;
# noise: N(0, 1) images; real: real images of calib.split (a reference, not data-free).
SOURCES = ("dsg", "zeroq", "noise", "real")
KINDS = {"w": "weight", "a": "activation"}


@dataclasses.dataclass(frozen=True)
class MixedSpec:
  """config.quant.mixed, validated (`spec_from_config`; the defaults live in the config
  only). A budget of 0 leaves that kind uniform."""

  budget_w_bits: float
  budget_a_bits: float
  w_candidates: tuple[int, ...]
  a_candidates: tuple[int, ...]
  source: str
  images: int
  samples_path: str
  sensitivity_path: str
  image_sets: int
  refine: int
  refine_holdout: bool

  def budget(self, kind: str) -> float:
    return self.budget_w_bits if kind == "w" else self.budget_a_bits

  def candidates(self, kind: str) -> tuple[int, ...]:
    return self.w_candidates if kind == "w" else self.a_candidates


@dataclasses.dataclass(frozen=True)
class Slot:
  """One quantizer: `path` of its layer, `name` of its probe bit-width ('w', 'w_first',
  'w_last' or 'a'), and `size` (kernel elements, or activation elements per image)."""

  path: str
  name: str
  size: int

  @property
  def kind(self) -> str:
    return self.name[0]

  @property
  def role(self) -> str:
    return self.name[2:]


def enabled(config) -> bool:
  """Whether config asks for a mixed-precision allocation."""
  m = config.quant.mixed
  return bool(m.budget_w_bits) or bool(m.budget_a_bits)


def _candidates(text, key: str) -> tuple[int, ...]:
  try:
    values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
  except ValueError:
    raise ValueError(
      f"{key}={text!r} must be comma-separated bit-widths, e.g. '2,3,4,5,6,8'."
    ) from None
  for v in values:
    numerics.check_bits(v, f"candidate {v} of {key}")
  if not values or len(set(values)) != len(values):
    raise ValueError(f"{key}={text!r} must name each bit-width once, e.g. '2,3,4,5,6,8'.")
  return tuple(sorted(values))


def spec_from_config(config) -> MixedSpec:
  """The validated MixedSpec of config.quant.mixed (ValueError/FileNotFoundError)."""
  m = config.quant.mixed
  spec = MixedSpec(
    budget_w_bits=float(m.budget_w_bits),
    budget_a_bits=float(m.budget_a_bits),
    w_candidates=_candidates(m.w_candidates, "quant.mixed.w_candidates"),
    a_candidates=_candidates(m.a_candidates, "quant.mixed.a_candidates"),
    source=m.source,
    images=int(m.images),
    samples_path=m.samples_path,
    sensitivity_path=m.sensitivity_path,
    image_sets=int(m.image_sets),
    refine=int(m.refine),
    refine_holdout=bool(m.refine_holdout),
  )
  for kind in KINDS:
    budget, cands, key = spec.budget(kind), spec.candidates(kind), f"quant.mixed.budget_{kind}_bits"
    if budget and not cands[0] <= budget <= cands[-1]:
      side = "below the smallest" if budget < cands[0] else "above the largest"
      raise ValueError(
        f"{key}={budget:g} lies {side} candidate bit-width of quant.mixed.{kind}_candidates "
        f"({','.join(map(str, cands))}): choose a budget in [{cands[0]}, {cands[-1]}] "
        "(or 0 for a uniform bit-width), or change the candidates."
      )
  if spec.source not in SOURCES:
    raise ValueError(f"quant.mixed.source={spec.source!r} is unknown: use one of {SOURCES}.")
  if spec.images <= 0:
    raise ValueError(f"quant.mixed.images={spec.images} must be positive.")
  if spec.refine < 0:
    raise ValueError(f"quant.mixed.refine={spec.refine} must be 0 (no refinement) or more rounds.")
  if spec.image_sets <= 0:
    raise ValueError(f"quant.mixed.image_sets={spec.image_sets} must be positive (1 = one set).")
  for key in ("samples_path", "sensitivity_path"):
    path = getattr(spec, key)
    if path and not os.path.exists(path):
      raise FileNotFoundError(f"quant.mixed.{key}={path!r} does not exist.")
  sets = images_needed(spec)
  if spec.samples_path and spec.images * sets > (count := _samples_count(spec.samples_path)):
    holdout = sets > spec.image_sets
    raise ValueError(
      f"quant.mixed.samples_path={spec.samples_path!r} holds {count} images, but "
      f"images={spec.images} x {sets} sets (image_sets={spec.image_sets}"
      + (" + 1 held-out set of refine_holdout" if holdout else "")
      + f") need {spec.images * sets}: lower quant.mixed.images"
      + (" or set quant.mixed.refine_holdout=False." if holdout else ".")
    )
  return spec


def images_needed(spec: MixedSpec) -> int:
  """How many sets of `images` images a run uses: image_sets, + 1 held-out set."""
  return spec.image_sets + int(bool(spec.refine and spec.refine_holdout))


def _samples_count(path: str) -> int:
  try:
    with np.load(path) as f:
      return len(f["images"])
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path!r} is not a synthetic set (.npz with 'images'): {e}") from e


def check_mixed_config(config) -> None:
  """Raises for a config.quant.mixed that cannot run (the layer-dependent checks, such as
  a budget the pinned layers already exceed, come with `plan`, before any work)."""
  if enabled(config):
    spec_from_config(config)


def probe_model(config) -> nn.Module:
  """The student with every bit-width an input (QuantPolicy.probe)."""
  user = policy_from_config(config)
  return teacher_model(config, QuantPolicy(probe=True, weight_mode=user.weight_mode))


def find_slots(model: nn.Module, image_shape) -> list[Slot]:
  """The quantizers of a probe `model`, in forward order."""
  order = []

  def record(module, method_name):
    if method_name == "__call__" and isinstance(module, (QConv, QDense, QuantAct)):
      order.append(module.scope.path)
    return isinstance(module, QuantAct)

  x = jnp.zeros((1, *image_shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  _, state = jax.eval_shape(
    lambda v: model.apply(v, x, capture_intermediates=record, mutable=["intermediates"]), variables
  )
  outputs = traverse_util.flatten_dict(state["intermediates"])
  params = traverse_util.flatten_dict(variables["params"])
  names = traverse_util.flatten_dict(variables[PROBE_BITS])
  slots, seen = [], set()
  for path in order:
    if path in seen:
      continue
    seen.add(path)
    for (*p, name), _ in names.items():
      if tuple(p) != path:
        continue
      if name == "a":
        size = math.prod(outputs[(*path, "__call__")][0].shape[1:])
      else:
        size = math.prod(params[(*path, "kernel")].shape)
      slots.append(Slot("/".join(path), name, int(size)))
  return slots


def probe_bits_tree(slots: list[Slot], bits) -> dict:
  """The `probe_bits` collection giving slot i the bit-width bits[i]."""
  return traverse_util.unflatten_dict(
    {(*s.path.split("/"), s.name): bits[i] for i, s in enumerate(slots)}
  )


def pinned_bits(config, slots: list[Slot]) -> list[int | None]:
  """Per slot, the bit-width the user's quant.rules / first_bits / last_bits fix (None:
  free for the allocation)."""
  user = policy_from_config(config)
  out = []
  for s in slots:
    out.append(
      user.explicit_weight_bits(s.path, s.role) if s.kind == "w" else user.explicit_act_bits(s.path)
    )
  return out


def slot_options(spec: MixedSpec, slots, pins, kind: str) -> list[tuple[int, list[int]]]:
  """(slot index, candidate bit-widths) of every slot of `kind` (a pin: its one width)."""
  return [
    (i, [pins[i]] if pins[i] is not None else list(spec.candidates(kind)))
    for i, s in enumerate(slots)
    if s.kind == kind
  ]


def plan(config, image_shape) -> tuple[MixedSpec, nn.Module, list[Slot], list]:
  """The spec, probe model, slots and pins of `config`, checked before any work: every
  budget must be reachable with the pinned layers (ValueError otherwise)."""
  spec = spec_from_config(config)
  model = probe_model(config)
  slots = find_slots(model, image_shape)
  pins = pinned_bits(config, slots)
  for kind, what in KINDS.items():
    budget = spec.budget(kind)
    if not budget:
      continue
    options = slot_options(spec, slots, pins, kind)
    if all(pins[i] is not None for i, _ in options):
      raise ValueError(
        f"quant.mixed.budget_{kind}_bits is set but quant.rules/first_bits/last_bits fix "
        f"every {what} quantizer: drop the budget or the rules."
      )
    total = sum(slots[i].size for i, _ in options)
    least = sum(slots[i].size * min(bits) for i, bits in options) / total
    if least > budget + 1e-9:
      fixed = [f"{slots[i].path} at {b[0]}" for i, b in options if pins[i] is not None]
      raise ValueError(
        f"quant.mixed.budget_{kind}_bits={budget:g} cannot be met: with the {what} bits "
        f"that quant.rules/first_bits/last_bits fix ({', '.join(fixed)}) the average is at "
        f"least {least:.3f} bits. Raise the budget or pin fewer layers."
      )
  return spec, model, slots, pins


def sensitivity_rows(slots: list[Slot], options) -> np.ndarray:
  """[R, S] bit-widths: one row per (slot, candidate), only that slot below FP."""
  rows = []
  for i, bits in options:
    for b in bits:
      row = np.full(len(slots), FULL_PRECISION, np.float32)
      row[i] = b
      rows.append(row)
  return np.stack(rows)


def kl_program(model: nn.Module, slots: list[Slot], chunk: int = 8):
  """The jitted map (variables, rows [R, S], images [N, H, W, C]) -> [R]: per bit-width
  row, the mean KL(FP ‖ probe) over the images, `chunk` rows at a time."""

  @jax.jit
  def kl_rows(variables, rows, images):
    full = jnp.full((len(slots),), FULL_PRECISION, jnp.float32)
    fp_logp = jax.nn.log_softmax(
      model.apply({**variables, PROBE_BITS: probe_bits_tree(slots, full)}, images)
    )

    def kl(row):
      logq = jax.nn.log_softmax(
        model.apply({**variables, PROBE_BITS: probe_bits_tree(slots, row)}, images)
      )
      return jnp.mean(jnp.sum(jnp.exp(fp_logp) * (fp_logp - logq), axis=-1))

    return jax.lax.map(kl, rows, batch_size=chunk)

  return kl_rows


def measure_sensitivity(
  model: nn.Module, variables: dict, slots: list[Slot], rows: np.ndarray, images, chunk: int = 8
) -> np.ndarray:
  """Mean KL(FP ‖ probe) over `images` [N, H, W, C] for each bit-width row [R, S] -> [R].

  `variables` hold the teacher's params/batch_stats and the probe's `quant_stats`; the
  whole map over rows is one compiled computation (`chunk` rows at a time).
  """
  kl_rows = kl_program(model, slots, chunk)
  return np.asarray(kl_rows(variables, jnp.asarray(rows), jnp.asarray(images)))


def probe_variables(model, teacher_vars, slots, images, config) -> dict:
  """The teacher's weights with the FP network's activation ranges on `images`."""
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *images.shape[1:]))))
  variables = {
    **teacher_vars,
    "quant_stats": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), fresh["quant_stats"]),
    PROBE_BITS: probe_bits_tree(slots, [jnp.float32(FULL_PRECISION)] * len(slots)),
  }
  batch = 64
  variables["quant_stats"] = calibration.calibrate_ranges(
    model,
    variables,
    (images[i : i + batch] for i in range(0, len(images), batch)),
    observer=config.calib.method,
    percentile=config.calib.percentile,
  )
  return variables


def allocate(options: list[list[tuple[int, float]]], budget: int) -> list[int]:
  """Exact multiple-choice knapsack: the option per slot minimising Σ sensitivity with
  Σ cost ≤ `budget`.

  Args:
    options: per slot, (integer cost, sensitivity) of each choice.
    budget: the largest total cost.
  Returns:
    The index of the chosen option of each slot. Partial assignments are pruned to their
    Pareto front (no other one is as cheap and as good), which keeps the result exact.
  """
  min_rest = np.concatenate([np.cumsum([min(c for c, _ in o) for o in options][::-1])[::-1], [0]])
  if min_rest[0] > budget:
    raise ValueError(f"no allocation fits the budget {budget}: the cheapest needs {min_rest[0]}.")
  cost, sens = np.zeros(1, np.int64), np.zeros(1, np.float64)
  parents, choices = [], []
  for i, opts in enumerate(options):
    c = np.array([o[0] for o in opts], np.int64)
    s = np.array([o[1] for o in opts], np.float64)
    new_cost = (cost[:, None] + c[None, :]).ravel()
    new_sens = (sens[:, None] + s[None, :]).ravel()
    parent = np.repeat(np.arange(len(cost)), len(c))
    choice = np.tile(np.arange(len(c)), len(cost))
    fits = new_cost + min_rest[i + 1] <= budget
    new_cost, new_sens, parent, choice = (a[fits] for a in (new_cost, new_sens, parent, choice))
    order = np.lexsort((new_sens, new_cost))  # by cost, then sensitivity
    new_cost, new_sens, parent, choice = (a[order] for a in (new_cost, new_sens, parent, choice))
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(new_sens)[:-1]])
    front = new_sens < best_before
    cost, sens = new_cost[front], new_sens[front]
    parents.append(parent[front])
    choices.append(choice[front])
  k = int(np.argmin(sens))
  picked = []
  for parent, choice in zip(parents[::-1], choices[::-1]):
    picked.append(int(choice[k]))
    k = int(parent[k])
  return picked[::-1]


def allocation_rules(slots: list[Slot], bits: dict[int, int]) -> str:
  """quant.rules text fixing slot i at bits[i]: '^conv1$=w8;^layer1_0/act1$=a4;...'."""
  items = []
  for i, b in sorted(bits.items()):
    s = slots[i]
    items.append(f"^{re.escape(s.path)}$={s.kind}{'fp' if b == FULL_PRECISION else b}")
  return ";".join(items)


def sensitivity_images(
  config,
  spec: MixedSpec,
  teacher_vars,
  image_shape,
  norm,
  log=print,
  image_set: int = 0,
  held_out: bool = False,
):
  """The images of set `image_set` the sensitivity is measured on, float32 [N, H, W, C] in
  the model's input space, and the seconds their synthesis took. Set j of a run of seed s
  is the set a one-set run of seed s * image_sets + j draws (its noise, its synthesis); of
  real images and samples_path, the j-th block of `images` images. `held_out`: the
  refinement's held-out set, drawn from other random streams (synthesis, noise) or the
  block after the last set (real images, samples_path)."""
  t0 = time.perf_counter()
  n, first = spec.images, (spec.image_sets if held_out else image_set) * spec.images
  seed = config.seed * spec.image_sets + image_set
  what = "the held-out set" if held_out else f"set {image_set + 1}/{spec.image_sets}"
  if spec.samples_path:
    images = synthesis.load_samples(spec.samples_path, image_shape)[0][first : first + n]
  elif spec.source == "noise":
    key = jax.random.fold_in(jax.random.key(seed), 31 if held_out else 13)
    images = np.asarray(jax.random.normal(key, (n, *image_shape), jnp.float32))
  elif spec.source == "real":
    images = eval_set_lib.real_images(config, norm, config.calib.split, first + n)[first:]
  else:
    preset = copy.deepcopy(config)
    apply_ptq_preset(preset, f"{spec.source}_ptq")  # the PTQ method's synthesis settings
    hp = synthesis.PtqHparams.from_config(preset)
    hp = dataclasses.replace(hp, batches=-(-n // hp.batch_size))
    key = jax.random.fold_in(jax.random.key(seed), 29 if held_out else 17)
    synth = synthesis.make_synthesizer(
      hp,
      teacher_model(config),
      teacher_vars,
      jax.random.fold_in(key, 0),
      image_shape,
      config.num_classes,
      compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
    )
    batches = []
    for b in range(hp.batches):
      x, _, last = synth.run_batch(jax.random.fold_in(key, b + 1))
      batches.append(parallel.global_to_host(x))
      log(
        f"Mixed precision: synthetic batch {b + 1}/{hp.batches} of {what} ({spec.source}), "
        f"loss {last['loss']:.4g}."
      )
    images = np.concatenate(batches)[:n]
  if len(images) < n:
    holdout = " + 1 held-out set (quant.mixed.refine_holdout)" if held_out else ""
    raise ValueError(
      f"quant.mixed.images={n} x (image_sets={spec.image_sets}{holdout}) needs "
      f"{first + n} images but only {first + len(images)} are available: lower them"
      + (", or set quant.mixed.refine_holdout=False." if held_out else ".")
    )
  return np.asarray(images, np.float32), time.perf_counter() - t0


def _measured_rows(spec, slots, pins) -> list[tuple[int, list[int]]]:
  """(slot, bit-widths to measure) of every allocated kind: a pin below FP is measured too."""
  rows = []
  for kind in KINDS:
    if spec.budget(kind):
      for i, bits in slot_options(spec, slots, pins, kind):
        bits = [b for b in bits if b != FULL_PRECISION]
        if bits:
          rows.append((i, bits))
  return rows


def _reused_sensitivity(path: str, slots, measured) -> dict[tuple[int, int], float]:
  with open(path) as f:
    layers = {
      (layer["path"], layer["name"]): layer["sensitivity"] for layer in json.load(f)["layers"]
    }
  out = {}
  for i, bits in measured:
    known = layers.get((slots[i].path, slots[i].name), {})
    for b in bits:
      if str(b) not in known:
        raise ValueError(
          f"quant.mixed.sensitivity_path={path!r} has no sensitivity of "
          f"{slots[i].path} ({KINDS[slots[i].kind]}) at {b} bits: drop the path to measure it."
        )
      out[(i, b)] = float(known[str(b)])
  return out


def measurement_sets(config, planned, teacher_vars, image_shape, norm, log=print):
  """Per image set of quant.mixed (image_sets of `images` images), (probe variables with
  the FP network's ranges on its images, images), and the seconds synthesis took."""
  spec, model, slots, _ = planned
  sets, synthesis_s = [], 0.0
  for j in range(spec.image_sets):
    images, seconds = sensitivity_images(
      config, spec, teacher_vars, image_shape, norm, log, image_set=j
    )
    sets.append((probe_variables(model, teacher_vars, slots, images, config), images))
    synthesis_s += seconds
  return sets, synthesis_s


def held_out_set(config, planned, teacher_vars, image_shape, norm, log=print):
  """(probe variables, images) of the refinement's held-out set, and its synthesis seconds."""
  spec, model, slots, _ = planned
  images, seconds = sensitivity_images(
    config, spec, teacher_vars, image_shape, norm, log, held_out=True
  )
  return (probe_variables(model, teacher_vars, slots, images, config), images), seconds


def _mean_kl(kl_rows, sets, rows: np.ndarray) -> np.ndarray:
  """[R] KL of each bit-width row, the mean over the image sets."""
  values = [np.asarray(kl_rows(v, jnp.asarray(rows), jnp.asarray(x)), np.float64) for v, x in sets]
  return np.mean(values, axis=0)


def sensitivities(planned, sets, log=print) -> tuple[dict[tuple[int, int], float], float]:
  """{(slot, bits): Ω} for every bit-width the allocation may choose (the mean over the
  image sets; measured at the W3 budget three sets did not make the allocation better or
  steadier: README), and the seconds it took."""
  spec, model, slots, pins = planned
  measured = _measured_rows(spec, slots, pins)
  keys = [(i, b) for i, bits in measured for b in bits]
  t0 = time.perf_counter()
  values = _mean_kl(kl_program(model, slots), sets, sensitivity_rows(slots, measured))
  seconds = time.perf_counter() - t0
  log(
    f"Mixed precision: {len(keys)} sensitivities on {spec.image_sets} x {spec.images} "
    f"{spec.source} images in {seconds:.1f} s."
  )
  return dict(zip(keys, (float(v) for v in values))), seconds


def allocation_row(config, slots: list[Slot], bits: dict[int, int]) -> np.ndarray:
  """[S] the bit-width of every slot in the network of allocation `bits` (the slots it
  does not allocate at the config's own widths)."""
  policy = policy_from_config(with_rules(config, allocation_rules(slots, bits)))
  return np.array([_policy_bits(policy, s) for s in slots], np.float32)


def _budget_units(spec, slots, pins, kind: str) -> int:
  """The integer Σ size·bits an allocation of `kind` may spend (as `allocate_bits`)."""
  total = sum(slots[i].size for i, _ in slot_options(spec, slots, pins, kind))
  return math.floor(spec.budget(kind) * total + 1e-6)


def _exchanges(spec, slots, pins, current, delta, count: int) -> list[dict[int, int]]:
  """The `count` single moves and pair exchanges (one slot a candidate level up, another
  one down) that fit the budget, of best predicted change Σ delta[(slot, bits)] < 0."""
  scored = []
  for kind in KINDS:
    if not spec.budget(kind):
      continue
    options = slot_options(spec, slots, pins, kind)
    slack = _budget_units(spec, slots, pins, kind) - sum(
      slots[i].size * current[i] for i, _ in options
    )
    ups, downs = [], []  # ({slot: bits}, cost change)
    for i, bits in options:
      k = bits.index(current[i])
      if k + 1 < len(bits):
        ups.append(({i: bits[k + 1]}, slots[i].size * (bits[k + 1] - current[i])))
      if k:
        downs.append(({i: bits[k - 1]}, slots[i].size * (bits[k - 1] - current[i])))
    pairs = [({**u, **d}, cu + cd) for u, cu in ups for d, cd in downs if set(u) != set(d)]
    for change, cost in downs + ups + pairs:
      predicted = sum(delta[(i, b)] for i, b in change.items())
      if cost <= slack and predicted < 0:
        scored.append((predicted, change))
  scored.sort(key=lambda item: item[0])
  return [{**current, **change} for _, change in scored[:count]]


def refine_allocation(
  config, planned, sets, bits: dict[int, int], log=print, proposals: int = 8, held_kl=None
):
  """quant.mixed.refine rounds of a local search on the measured whole-network KL.

  Round r measures, around the current allocation, the KL of the network and of the
  network with one allocated slot i at each other candidate b: Δ(i, b) = KL(i at b) −
  KL. It proposes the exact allocation under these in-context sensitivities within one
  candidate level of the current one (first-order model KL + Σ_i Δ(i, b_i)) and the
  `proposals` best predicted single moves and pair exchanges (one slot up, one down)
  that fit the budget, measures them, and moves to the best if its KL is smaller; else it
  stops. The KL falls monotonically; an undamped re-solve (every slot free) oscillated.
  With `held_kl` (allocation -> KL on a held-out set: `held_out_kl`, quant.mixed.
  refine_holdout) the move is taken only if it lowers that KL as well: on 64 images the
  search KL falls further than the network improves (README).

  Returns:
    (the final allocation, the rounds [{round, kl, bits[, held_kl]}] of every allocation
    moved through, in order, seconds, why it stopped: 'rounds', 'search KL', 'held-out KL'
    or 'no proposal').
  """
  spec, model, slots, pins = planned
  kl_rows, t0 = kl_program(model, slots), time.perf_counter()
  widths = _measured_rows(spec, slots, pins)

  def record(r):
    entry = {"round": r, "kl": kl, "bits": [current[i] for i in sorted(current)]}
    return {**entry, "held_kl": held_now} if held_kl is not None else entry

  rounds, current, kl, stop = [], bits, None, "rounds"
  held_now = held_kl(current) if held_kl is not None and spec.refine else None
  for r in range(spec.refine):
    base = allocation_row(config, slots, current)
    keys = [(i, b) for i, bs in widths for b in bs if b != base[i]]
    rows = [base] + [_with(base, {i: b}) for i, b in keys]
    values = _mean_kl(kl_rows, sets, np.stack(rows))
    kl = float(values[0])
    rounds.append(record(r))
    delta = {key: float(v) - kl for key, v in zip(keys, values[1:])}
    near = {
      (i, b): delta.get((i, b), 0.0) if abs(bs.index(b) - bs.index(current[i])) <= 1 else 1e9
      for i, bs in widths
      for b in bs
    }
    candidates = [allocate_bits(spec, slots, pins, near)]
    candidates += _exchanges(spec, slots, pins, current, delta, proposals)
    candidates = [c for k, c in enumerate(candidates) if c != current and c not in candidates[:k]]
    if not candidates:
      stop = "no proposal"
      break
    rows = [allocation_row(config, slots, c) for c in candidates]
    rows += [rows[-1]] * (proposals + 1 - len(rows))  # one shape every round: one compile
    measured = _mean_kl(kl_rows, sets, np.stack(rows))[: len(candidates)]
    best = int(np.argmin(measured))
    log(
      f"Mixed precision: refinement round {r}, KL {kl:.5f} -> {measured[best]:.5f} "
      f"(best of {len(candidates)} proposals)."
    )
    if measured[best] >= kl:
      stop = "search KL"
      break
    if held_kl is not None:
      held_next = held_kl(candidates[best])
      if held_next >= held_now:
        log(
          f"Mixed precision: the held-out KL would rise ({held_now:.5f} -> {held_next:.5f}): "
          "the refinement stops."
        )
        stop = "held-out KL"
        break
      held_now = held_next
    current, kl = candidates[best], float(measured[best])
  else:
    if spec.refine:
      rounds.append(record(spec.refine))
  return current, rounds, time.perf_counter() - t0, stop


def held_out_kl(config, planned, held):
  """allocation -> the whole network's KL on the held-out set `held` (probe variables,
  images), for `refine_allocation`."""
  _, model, slots, _ = planned
  kl_rows = kl_program(model, slots)

  def kl(allocation: dict[int, int]) -> float:
    row = allocation_row(config, slots, allocation)[None]
    return float(_mean_kl(kl_rows, [held], row)[0])

  return kl


def _with(row: np.ndarray, changes: dict[int, int]) -> np.ndarray:
  out = row.copy()
  for i, b in changes.items():
    out[i] = b
  return out


def allocate_bits(spec, slots, pins, sens) -> dict[int, int]:
  """{slot: bits} of every slot of an allocated kind (exact, see `allocate`)."""
  bits = {}
  for kind in KINDS:
    if not spec.budget(kind):
      continue
    opts = slot_options(spec, slots, pins, kind)
    total = sum(slots[i].size for i, _ in opts)
    budget = math.floor(spec.budget(kind) * total + 1e-6)
    options = [[(slots[i].size * b, sens.get((i, b), 0.0)) for b in widths] for i, widths in opts]
    for (i, widths), pick in zip(opts, allocate(options, budget)):
      bits[i] = widths[pick]
  return bits


def with_rules(config, rules: str):
  """A copy of `config` whose quant.rules start with `rules` (then the user's own)."""
  c = copy.deepcopy(config)
  c.quant.rules = rules + (";" + config.quant.rules if config.quant.rules else "")
  return c


def _policy_bits(policy: QuantPolicy, slot: Slot) -> int:
  bits = (
    policy.weight_bits(slot.path, slot.role) if slot.kind == "w" else policy.act_bits(slot.path)
  )
  return FULL_PRECISION if bits is None else bits


def average_bits(policy: QuantPolicy, slots: list[Slot], kind: str) -> float:
  """Size-weighted average bit-width `policy` gives the `kind` quantizers (FP = 32)."""
  chosen = [s for s in slots if s.kind == kind]
  return sum(s.size * _policy_bits(policy, s) for s in chosen) / sum(s.size for s in chosen)


def weight_size_kib(policy: QuantPolicy, slots: list[Slot]) -> float:
  """The kernels' size at `policy`'s bit-widths, KiB (biases and BN not counted)."""
  return sum(s.size * _policy_bits(policy, s) for s in slots if s.kind == "w") / 8 / 1024


def build_report(config, planned, sens, bits, timings) -> dict:
  """mixed_precision.json: the allocation, its rules and every layer's sensitivity."""
  spec, _, slots, pins = planned
  rules = allocation_rules(slots, bits)
  policy = policy_from_config(with_rules(config, rules))
  for i, b in bits.items():  # the rules give every slot its allocated width
    assert _policy_bits(policy, slots[i]) == b, (slots[i], b)
  layers = [
    {
      "path": s.path,
      "name": s.name,
      "kind": KINDS[s.kind],
      "size": s.size,
      "bits": _policy_bits(policy, s),
      "allocated": i in bits,
      "pinned": pins[i] is not None,
      "sensitivity": {str(b): v for (j, b), v in sorted(sens.items()) if j == i},
    }
    for i, s in enumerate(slots)
  ]
  uniform = {
    str(b): sum(s.size for s in slots if s.kind == "w") * b / 8 / 1024 for b in spec.w_candidates
  }
  return {
    **dataclasses.asdict(spec),
    "avg_w_bits": average_bits(policy, slots, "w"),
    "avg_a_bits": average_bits(policy, slots, "a"),
    "weight_size_kib": weight_size_kib(policy, slots),
    "uniform_weight_size_kib": uniform,
    "objective": sum(sens.get((i, b), 0.0) for i, b in bits.items()),
    **timings,
    "rules": rules,
    "layers": layers,
  }


def summary(report: dict) -> dict:
  """What results.json says about the allocation."""
  keys = ("budget_w_bits", "budget_a_bits", "source", "avg_w_bits", "avg_a_bits")
  return {**{k: report[k] for k in keys}, "weight_size_kib": report["weight_size_kib"]}


def write_plot(path: str, report: dict) -> None:
  """Per-layer bit-widths (bars) and sensitivities (log scale, one line per bit-width) of
  the allocated quantizers."""
  layers = [layer for layer in report["layers"] if layer["allocated"]]
  fig = Figure(figsize=(max(8.0, 0.32 * len(layers)), 7.0))
  FigureCanvasAgg(fig)
  top, bottom = fig.subplots(2, 1, sharex=True)
  x = np.arange(len(layers))
  colors = ["tab:blue" if layer["kind"] == "weight" else "tab:orange" for layer in layers]
  top.bar(x, [min(layer["bits"], 9) for layer in layers], color=colors)
  top.set_ylabel("bits (FP drawn as 9)")
  top.set_title(
    f"mixed precision: W {report['avg_w_bits']:.2f} / A {report['avg_a_bits']:.2f} average bits "
    f"(blue weights, orange activations), {report['source']} images"
  )
  widths = sorted({int(b) for layer in layers for b in layer["sensitivity"]})
  for b in widths:
    y = [layer["sensitivity"].get(str(b), np.nan) for layer in layers]
    bottom.semilogy(x, np.maximum(np.asarray(y, float), 1e-8), marker="o", ms=3, label=f"{b} bits")
  bottom.set_ylabel("KL(FP ‖ one layer quantized)")
  bottom.legend(fontsize=7, ncol=len(widths) or 1)
  bottom.set_xticks(x)
  bottom.set_xticklabels(
    [f"{layer['path']} ({layer['kind'][0]})" for layer in layers], rotation=90, fontsize=6
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def resolve(config, workdir: str, planned, teacher_vars, image_shape, norm, log=print):
  """(config with the allocation as quant.rules, the report): read from
  <workdir>/mixed_precision.json if a run wrote it, else measured, solved and written."""
  path = os.path.join(workdir, REPORT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
    log(f"Mixed precision: the allocation of {path} (W {report['avg_w_bits']:.2f} bits).")
    return with_rules(config, report["rules"]), report
  spec, _, slots, pins = planned
  sets, held, timings = [], None, {}
  if not spec.sensitivity_path or spec.refine:
    sets, timings["synthesis_s"] = measurement_sets(
      config, planned, teacher_vars, image_shape, norm, log
    )
    if spec.refine and spec.refine_holdout:
      held, seconds = held_out_set(config, planned, teacher_vars, image_shape, norm, log)
      timings["synthesis_s"] += seconds
    _save_synthesised(os.path.join(workdir, IMAGES_FILE), spec, sets + ([held] if held else []))
  if spec.sensitivity_path:
    sens = _reused_sensitivity(spec.sensitivity_path, slots, _measured_rows(spec, slots, pins))
    timings["reused"] = True
  else:
    sens, timings["sensitivity_s"] = sensitivities(planned, sets, log)
  bits = allocate_bits(spec, slots, pins, sens)
  refinement = None
  if spec.refine:
    held_kl = held_out_kl(config, planned, held) if held else None
    bits, rounds, seconds, stop = refine_allocation(
      config, planned, sets, bits, log, held_kl=held_kl
    )
    refinement = {"rounds": rounds, "refine_s": seconds, "stopped_by": stop}
  report = build_report(config, planned, sens, bits, timings)
  if refinement:
    report["refinement"] = refinement
  if metrics_lib.is_writer():
    metrics_lib.write_json_atomic(path, report)
    write_plot(os.path.join(workdir, PLOT_FILE), report)
  log(
    f"Mixed precision: W {report['avg_w_bits']:.2f} / A {report['avg_a_bits']:.2f} average "
    f"bits, kernels {report['weight_size_kib']:.1f} KiB (rules in {path})."
  )
  return with_rules(config, report["rules"]), report


def _save_synthesised(path: str, spec: MixedSpec, sets) -> None:
  """Writes the synthesised images of every set (in set order, the held-out set last) for
  reuse: a run reading them as samples_path finds each set at its block."""
  if spec.samples_path or spec.source not in ("dsg", "zeroq") or not metrics_lib.is_writer():
    return
  images = np.concatenate([x for _, x in sets])
  synthesis.save_samples(path, images, np.zeros(len(images), np.int32), source=spec.source)


def resolved_config(config, workdir: str):
  """`config` of the finished run in `workdir` with its allocation applied (for export)."""
  if not enabled(config):
    return config
  path = os.path.join(workdir, REPORT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"the mixed-precision run in {workdir!r} has no {REPORT_FILE}: resume the run first."
    )
  with open(path) as f:
    return with_rules(config, json.load(f)["rules"])
