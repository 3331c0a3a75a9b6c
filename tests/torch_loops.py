"""PyTorch transcriptions of the original GDFQ, DSG-QAT and AdaDFQ training loops.

Written by us from ../shared/docs/methods.md (§2.1 control flow, §2.3 quantizer, §2.4
optimisers, §2.5 L_BNS, §3 GDFQ, §4.2-§4.4 DSG-QAT code form, §5.1 AdaDFQ code form), not
copied from the released code. The models, the quantizer and the AdaDFQ losses are those
of `dfq_jax/reference/torch_adadfq.py` (the speed baseline, checked against the §0 known
values in test_torch_reference.py). One `OriginalLoop.iteration` is what one iteration
of the released code does, in its order:

  set lr_Q, lr_G by multistep on the epoch; QuantAct ranges run while epoch < R
  x = G(z, y); t = P(x) (hooks: batch mean / biased var of every BN input of P)
  L_G (method); Adam step on G (AdaDFQ: q = Q(x) inside L_G, Q's grads discarded)
  s = Q(x.detach()); L_Q (method) with t.detach(); SGD-Nesterov step if epoch >= warm-up

z, y and (DSG) the SCI noise are inputs, so a test can feed the numbers the JAX step drew.
`load_*` copy dfq_jax variables (NHWC / HWIO) into the torch modules (NCHW / OIHW);
`*_arrays` read them back in the dfq_jax layout for comparison.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfq_jax.reference import torch_adadfq as ref


def _t(a) -> torch.Tensor:
  return torch.tensor(np.asarray(a), dtype=torch.float32)


# --------------------------------------------------------------------------- layouts
def _resnet_entries(model: ref.ResNet20):
  """(jax collection, jax path, torch tensor, kind) of a torch CIFAR ResNet (option A)."""
  entries = []

  def conv(path, m):
    entries.append(("params", path + ("kernel",), m.weight, "conv"))

  def bn(path, m):
    entries.extend(
      [
        ("params", path + ("scale",), m.weight, "vec"),
        ("params", path + ("bias",), m.bias, "vec"),
        ("batch_stats", path + ("mean",), m.running_mean, "vec"),
        ("batch_stats", path + ("var",), m.running_var, "vec"),
      ]
    )

  conv(("conv1",), model.conv1)
  bn(("bn1",), model.bn1)
  per_stage = len(model.blocks) // 3
  for i, block in enumerate(model.blocks):
    name = f"layer{i // per_stage + 1}_{i % per_stage}"
    conv((name, "conv1"), block.conv1)
    bn((name, "bn1"), block.bn1)
    conv((name, "conv2"), block.conv2)
    bn((name, "bn2"), block.bn2)
  entries += [
    ("params", ("linear", "kernel"), model.fc.weight, "dense"),
    ("params", ("linear", "bias"), model.fc.bias, "vec"),
  ]
  return entries


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _to_torch(a, kind):
  a = _t(a)
  if kind == "conv":  # HWIO -> OIHW
    return a.permute(3, 2, 0, 1)
  if kind == "dense":  # [in, out] -> [out, in]
    return a.t()
  return a


def _to_jax(t: torch.Tensor, kind) -> np.ndarray:
  t = t.detach()
  if kind == "conv":
    t = t.permute(2, 3, 1, 0)
  elif kind == "dense":
    t = t.t()
  return t.numpy().copy()


@torch.no_grad()
def load_resnet(model: ref.ResNet20, variables) -> ref.ResNet20:
  """Copies dfq_jax ResNet variables {'params', 'batch_stats'} into `model`."""
  for collection, path, tensor, kind in _resnet_entries(model):
    tensor.copy_(_to_torch(_get(variables[collection], path), kind))
  return model


def resnet_arrays(model: ref.ResNet20) -> dict:
  """{'params': tree, 'batch_stats': tree} of `model` in the dfq_jax layout."""
  out = {"params": {}, "batch_stats": {}}
  for collection, path, tensor, kind in _resnet_entries(model):
    node = out[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _to_jax(tensor, kind)
  return out


def quant_acts(student: nn.Module) -> dict:
  """dfq_jax quant_stats path -> the QuantAct after that ReLU in the torch student."""
  acts = {("act1",): student.relu[1]}
  per_stage = len(student.blocks) // 3
  for i, block in enumerate(student.blocks):
    name = f"layer{i // per_stage + 1}_{i % per_stage}"
    acts[(name, "act1")] = block.relu1[1]
    acts[(name, "act2")] = block.relu2[1]
  return acts


@torch.no_grad()
def load_ranges(student: nn.Module, quant_stats) -> None:
  for path, act in quant_acts(student).items():
    node = _get(quant_stats, path)
    act.x_min.copy_(_t(node["x_min"]))
    act.x_max.copy_(_t(node["x_max"]))
    act.beta_t.copy_(_t(node["beta_t"]))


def ranges_arrays(student: nn.Module) -> dict:
  out = {}
  for path, act in quant_acts(student).items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = {
      "x_min": act.x_min.numpy().copy(),
      "x_max": act.x_max.numpy().copy(),
      "beta_t": act.beta_t.numpy().copy(),
    }
  return out


def _generator_entries(gen: ref.Generator):
  e = [
    (("label_emb", "embedding"), gen.embed.weight, "vec"),
    (("l1", "kernel"), gen.fc.weight, "fc_kernel"),
    (("l1", "bias"), gen.fc.bias, "fc_bias"),
    (("bn0", "scale"), gen.bn0.weight, "vec"),
    (("bn0", "bias"), gen.bn0.bias, "vec"),
  ]
  for name in ("conv1", "conv2", "conv3"):
    m = getattr(gen, name)
    e += [((name, "kernel"), m.weight, "conv"), ((name, "bias"), m.bias, "vec")]
  for name in ("bn1", "bn2"):
    m = getattr(gen, name)
    e += [((name, "scale"), m.weight, "vec"), ((name, "bias"), m.bias, "vec")]
  return e


def _fc_perm(gen: ref.Generator) -> np.ndarray:
  """torch feature index (c, i, k) of each dfq_jax feature index (i, k, c) of `l1`."""
  s0, w = gen.s0, gen.width
  return np.arange(w * s0 * s0).reshape(w, s0, s0).transpose(1, 2, 0).reshape(-1)


@torch.no_grad()
def load_generator(gen: ref.Generator, params) -> ref.Generator:
  """Copies dfq_jax GeneratorCifar params into `gen` (l1's features NHWC -> NCHW order)."""
  perm = _fc_perm(gen)
  for path, tensor, kind in _generator_entries(gen):
    a = np.asarray(_get(params, path))
    if kind == "fc_kernel":  # [latent, s0*s0*w] (i, k, c) -> [w*s0*s0 (c, i, k), latent]
      out = np.empty((a.shape[1], a.shape[0]), np.float32)
      out[perm] = a.T
      tensor.copy_(_t(out))
    elif kind == "fc_bias":
      out = np.empty_like(a)
      out[perm] = a
      tensor.copy_(_t(out))
    else:
      tensor.copy_(_to_torch(a, kind))
  return gen


def generator_arrays(gen: ref.Generator) -> dict:
  perm = _fc_perm(gen)
  out = {}
  for path, tensor, kind in _generator_entries(gen):
    t = tensor.detach().numpy()
    if kind == "fc_kernel":
      a = t[perm].T.copy()
    elif kind == "fc_bias":
      a = t[perm].copy()
    else:
      a = _to_jax(tensor, kind)
    out.setdefault(path[0], {})[path[1]] = a
  return out


# --------------------------------------------------------------------------- losses
def kd_loss_gdfq(s, t, y, temperature: float, alpha: float) -> torch.Tensor:
  """§3 code: CE(s, y) + alpha T^2 nn.KLDivLoss()(log_softmax(s/T), softmax(t/T)).

  nn.KLDivLoss's default reduction is the mean over all B*C elements.
  """
  kl = F.kl_div(
    F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="mean"
  )
  return alpha * temperature**2 * kl + F.cross_entropy(s, y)


def dsg_qat_sda(stats, margins) -> torch.Tensor:
  """§4.2 QAT code form with its channel "LSE" (§4.3): per layer l with margins (m_l, n_l)

    g_mu = max(| |mu - mu_run| - m_l |, 0), g_var likewise with n_l,
    channel l of both gaps x sqrt(2), loss_l = ||g_mu||^2 + ||g_var||^2,
  averaged over the layers.
  """
  total = 0.0
  for num, ((mu, var, rm, rv), (m, n)) in enumerate(zip(stats, margins)):
    g_mu = torch.clamp(((mu - rm).abs() - m).abs(), min=0.0)
    g_var = torch.clamp(((var - rv).abs() - n).abs(), min=0.0)
    if num < g_mu.shape[0]:
      scale = torch.ones_like(g_mu)
      scale[num] = math.sqrt(2.0)
      g_mu, g_var = g_mu * scale, g_var * scale
    total = total + g_mu.norm() ** 2 + g_var.norm() ** 2
  return total / len(stats)


def _spectrum(x: torch.Tensor):
  """§4.4 with the spec's resolution: eigh of the cosine Gram, descending, sign-fixed."""
  phi = F.normalize(x.reshape(x.shape[0], -1), p=2, dim=1)
  s = phi @ phi.t()
  w, v = torch.linalg.eigh(0.5 * (s + s.t()))
  w, v = w.flip(0), v.flip(1)
  pivot = v.abs().argmax(dim=0)
  signs = torch.sign(v[pivot, torch.arange(v.shape[1])])
  signs[signs == 0] = 1.0
  return w, v * signs[None, :]


@torch.no_grad()
def sci_value(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
  """§4.4 L_SCI; detached, as the released code's Variable(...) makes it (zero gradient)."""
  w, v = _spectrum(x.double())
  w_r, v_r = _spectrum(noise.double())
  magnitude = 1e-4 * torch.mean((w - w_r) ** 2)
  w_r_norm = (w_r - w_r.min()) / (w_r.max() - w_r.min())
  structure = torch.sum(w_r_norm * -torch.sum(v * v_r, dim=0)).abs()
  return (magnitude + structure).float()


# --------------------------------------------------------------------------- the loop
class OriginalLoop:
  """Teacher P, quantized student Q and generator G with the original loop's optimisers.

  Args:
    method: 'gdfq' | 'dsg' | 'adadfq' (the released codes; DSG is its QAT path).
    teacher: torch ResNet (FP, eval mode); the student is its quantized deep copy.
    generator: torch generator (train mode).
    bits: (w_bits, a_bits).
    hp: dict with lr_g, lr_q, betas, momentum, weight_decay, milestones_g, milestones_q
      (epochs), warmup_epochs, range_epochs, and the method's constants (bns_weight,
      temperature, alpha; lambda_l, lambda_u, alpha_ds, alpha_as, beta, gamma; margins).
  """

  def __init__(self, method: str, teacher: nn.Module, generator: nn.Module, bits, hp: dict):
    self.method, self.hp = method, hp
    self.teacher = teacher.eval()
    self.student = ref.quantize_model(copy.deepcopy(teacher), *bits).eval()
    self.generator = generator.train()
    self._stats = []
    for m in self.teacher.modules():  # hooks on the teacher only, after the copy
      if isinstance(m, nn.BatchNorm2d):
        m.register_forward_hook(self._hook)
    self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp["lr_g"], betas=hp["betas"])
    self.opt_q = torch.optim.SGD(
      self.student.parameters(),
      lr=hp["lr_q"],
      momentum=hp["momentum"],
      nesterov=True,
      weight_decay=hp["weight_decay"],
    )

  def _hook(self, module, inputs, output):
    del output
    x = inputs[0]
    self._stats.append(
      (x.mean([0, 2, 3]), x.var([0, 2, 3], unbiased=False), module.running_mean, module.running_var)
    )

  @staticmethod
  def _multistep(base, epoch, milestones):
    return base * 0.1 ** sum(epoch >= m for m in milestones)

  def _set_epoch(self, epoch):
    lr_g = self._multistep(self.hp["lr_g"], epoch, self.hp["milestones_g"])
    lr_q = self._multistep(self.hp["lr_q"], epoch, self.hp["milestones_q"])
    for group in self.opt_g.param_groups:
      group["lr"] = lr_g
    for group in self.opt_q.param_groups:
      group["lr"] = lr_q
    for act in quant_acts(self.student).values():  # `if epoch < 4: unfix()` ... fix()
      act.running_stat = epoch < self.hp["range_epochs"]
    return lr_g, lr_q

  def _generator_loss(self, x, t, y, noise):
    hp = self.hp
    if self.method == "gdfq":
      bns = ref.bn_stat_loss(self._stats)
      ce = F.cross_entropy(t, y)
      return ce + hp["bns_weight"] * bns, {"ce": ce, "bns": bns}
    if self.method == "dsg":
      ce = F.cross_entropy(t, y)
      sda = dsg_qat_sda(self._stats, hp["margins"])
      sci = sci_value(x, noise)
      return (
        ce + hp["sda_weight"] * sda + sci / len(self._stats),
        {"ce": ce, "sda": sda, "sci": sci},
      )
    q = self.student(x)
    terms = ref.adadfq_generator_terms(t, q, y, hp["lambda_l"], hp["lambda_u"])
    bns = ref.bn_stat_loss(self._stats)
    loss = (
      terms["margin"]
      + hp["beta"] * (hp["alpha_ds"] * terms["ds"] + hp["alpha_as"] * terms["as"])
      + hp["gamma"] * bns
    )
    return loss, {"margin": terms["margin"], "ds": terms["ds"], "as": terms["as"], "bns": bns}

  def _student_loss(self, s, t, y):
    if self.method == "adadfq":
      return ref.adadfq_q_loss(t, s, self.hp["temperature"])
    return kd_loss_gdfq(s, t, y, self.hp["temperature"], self.hp["alpha"])

  def iteration(
    self, epoch: int, z: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None
  ) -> dict:
    """One iteration of epoch `epoch` on latents z [B, d], labels y [B]; returns losses."""
    lr_g, lr_q = self._set_epoch(epoch)
    self._stats.clear()
    x = self.generator(z, y)
    t = self.teacher(x)
    loss_g, g_terms = self._generator_loss(x, t, y, noise)
    self.opt_g.zero_grad()
    loss_g.backward()
    self.opt_g.step()
    s = self.student(x.detach())
    loss_q = self._student_loss(s, t.detach(), y)
    if epoch >= self.hp["warmup_epochs"]:
      self.opt_q.zero_grad()  # drops the student grads of AdaDFQ's generator backward
      loss_q.backward()
      self.opt_q.step()
    self._stats.clear()
    out = {
      "generator/loss": float(loss_g),
      "student/loss": float(loss_q),
      "lr/generator": lr_g,
      "lr/student": lr_q if epoch >= self.hp["warmup_epochs"] else 0.0,
    }
    out.update({f"generator/{k}": float(v) for k, v in g_terms.items()})
    return out
