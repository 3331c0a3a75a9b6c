r"""Eager PyTorch reference of one AdaDFQ training iteration (CIFAR-10 ResNet-20; ImageNet
ResNet-18 and MobileNetV2 with `--network`).

This is the speed baseline of `python -m dfq_jax.bench compare`: what a PyTorch user of the
original (GDFQ-lineage) code runs today. It is NOT a dependency of dfq_jax and nothing in
the package imports it; it needs `pip install torch` (tested with torch==2.13.0, CPU).
It was written from the project's spec (../shared/docs/methods.md §2.1-§2.5 and §5.1) and
../shared/docs/speed-notes.md, not from the papers' code. It uses only torch and the
standard library, so it can also run from a separate torch-only virtual environment.

What one iteration does (methods.md §2.1, AdaDFQ losses §5.1), in torch's eager NCHW
layout with torch's default initialisation:
  z ~ N(0, I) [B, 100], y ~ U{0..9};  x = G(z, y)                 (G in train mode)
  t = P(x)   forward hooks on every BN of P read the batch mean and biased variance of the
             BN input (L_BNS, §2.5); P is in eval mode. As in the original code
             (which only calls `model_teacher.eval()`), P's parameters still require
             grad, so every generator backward also computes (and accumulates) P's
             weight gradients; `--frozen-teacher` skips them (a faster PyTorch than
             the original)
  q = Q(x)   student with the gradient flowing through the STE into G (its own weight
             gradients are computed too and discarded, as in the original loop)
  L_G = h + beta (alpha_ds L_ds + alpha_as L_as) + gamma L_BNS;  Adam step on G only
  q' = Q(x.detach());  L_Q = -T^2 mean_b H(softmax((t.detach() - q') / T)), T = 20
  SGD (Nesterov, momentum 0.9, weight decay 1e-4) step on Q
Two student forwards per iteration. The warm-up iterations update the activation ranges
(two EMA updates per iteration, as in the first 4 epochs of a run); the timed ones run
with frozen ranges, the state of 99 % of a run's iterations, which is also what
`bench speed` times on the JAX side (its post-freeze step).

Models:
  G: the GDFQ CIFAR generator (§2.2): label embedding * z -> Linear(100, 128*8*8) -> BN ->
     up x2 -> conv3x3 128->128 -> BN(eps 0.8) -> LReLU(.2) -> up x2 -> conv3x3 128->64 ->
     BN(eps 0.8) -> LReLU(.2) -> conv3x3 64->3 -> tanh -> BN(3, affine=False).
  P: CIFAR ResNet-20 with option-A shortcuts (subsample + zero-padded channels), random
     init: the weights do not change the speed.
  Q: a deep copy of P; every Conv2d/Linear fake-quantizes its weight per output channel
     (min/max of the current weight, STE); a per-tensor QuantAct follows every ReLU module
     (GDFQ's bias-corrected EMA range, asymmetric fake quant of §2.3, STE). Eval mode.

ImageNet (`--network resnet18|mobilenetv2`, 1000 classes, 224x224, T = 5, §2.2, §5.2):
  G: GDFQ's ImageNet generator: Linear(100, 128*56*56) (no label embedding on z) ->
     CCBN(128) -> up x2 -> conv 128->128 -> CCBN(128, eps 0.8) -> LReLU -> up x2 ->
     conv 128->64 -> CCBN(64, eps 0.8) -> LReLU -> conv 64->3 -> tanh -> BN(3, affine=False);
     CCBN = affine-free BN, then scale[y] / shift[y] from embeddings initialised 1 / 0.
  P: pytorchcv-layout ResNet-18 (7x7/2 stem + BN + ReLU + 3x3/2 max pool, 4 stages of 2
     basic blocks, 1x1-conv + BN projection shortcuts, each ReLU its own module), or
     pytorchcv MobileNetV2 w1 (expansion conv also in the first block, ReLU6, 1x1-conv
     classifier without bias). Q quantized as above (a QuantAct after every ReLU/ReLU6).

Run:
  python -m dfq_jax.reference.torch_adadfq --batch 16 --steps 10 --warmup 3 \
      [--bits 4] [--threads N] [--channels-last] [--network resnet20|resnet18|mobilenetv2]
      [--bf16]
prints one JSON line: median/min/max step time (a step is timed from sampling z to after
the Q optimizer step), images/s, torch version and threads, and the step-0 losses.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

LATENT = 100
NUM_CLASSES = 10
TEMPERATURE = 20.0  # AdaDFQ's Q-loss temperature, hard-coded 20 for CIFAR (§5.1)
IMAGENET_TEMPERATURE = 5.0  # and 5 for ImageNet
NETWORKS = ("resnet20", "resnet18", "mobilenetv2")
ADADFQ = dict(lambda_l=0.1, lambda_u=0.8, alpha_ds=0.2, alpha_as=0.1, beta=1.0, gamma=1.0)


# ----------------------------------------------------------------------------- quantizer
def asym_fake_quant(x: torch.Tensor, k: int, lo, hi) -> torch.Tensor:
  """Asymmetric k-bit fake quantization in the op order of methods.md §2.3.

  s = (2^k - 1) / max(hi - lo, 1e-8);  zp = round(s lo) + 2^(k-1);
  q = clip(round(s x - zp), -2^(k-1), 2^(k-1) - 1);  x_hat = (q + zp) / s.
  torch.round rounds half to even. `lo`/`hi` broadcast against x (per tensor or channel).
  """
  lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
  hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
  half = 2 ** (k - 1)
  scale = (2**k - 1) / torch.clamp(hi - lo, min=1e-8)
  zero_point = torch.round(scale * lo) + half
  q = torch.clamp(torch.round(scale * x - zero_point), -half, half - 1)
  return (q + zero_point) / scale


class FakeQuantSTE(torch.autograd.Function):
  """Forward: asym_fake_quant. Backward: identity for x (no clip mask), nothing for ranges."""

  @staticmethod
  def forward(ctx, x, k, lo, hi):
    del ctx
    return asym_fake_quant(x, k, lo, hi)

  @staticmethod
  def backward(ctx, grad_output):
    del ctx
    return grad_output, None, None, None


def fake_quant_ste(x, k, lo, hi):
  return FakeQuantSTE.apply(x, k, lo, hi)


def _weight_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
  """Per-output-channel min/max of the current weight (detached), fake-quantized, STE."""
  flat = w.detach().reshape(w.shape[0], -1)
  lo, hi = torch.aminmax(flat, dim=1)
  shape = (-1,) + (1,) * (w.dim() - 1)
  return fake_quant_ste(w, bits, lo.view(shape), hi.view(shape))


class QuantConv2d(nn.Conv2d):
  """Conv2d whose weight is fake-quantized per output channel at every forward; FP bias."""

  bits: int = 4

  @classmethod
  def from_float(cls, conv: nn.Conv2d, bits: int) -> "QuantConv2d":
    m = cls(
      conv.in_channels,
      conv.out_channels,
      conv.kernel_size,
      conv.stride,
      conv.padding,
      conv.dilation,
      conv.groups,
      conv.bias is not None,
      conv.padding_mode,
    )
    m.load_state_dict(conv.state_dict())
    m.bits = bits
    return m

  def forward(self, x):
    return self._conv_forward(x, _weight_fake_quant(self.weight, self.bits), self.bias)


class QuantLinear(nn.Linear):
  """Linear whose weight is fake-quantized per output row at every forward; FP bias."""

  bits: int = 4

  @classmethod
  def from_float(cls, linear: nn.Linear, bits: int) -> "QuantLinear":
    m = cls(linear.in_features, linear.out_features, linear.bias is not None)
    m.load_state_dict(linear.state_dict())
    m.bits = bits
    return m

  def forward(self, x):
    return F.linear(x, _weight_fake_quant(self.weight, self.bits), self.bias)


class QuantAct(nn.Module):
  """Per-tensor activation fake quant with GDFQ's bias-corrected EMA range (§2.3).

  While `running_stat`: beta_t <- beta_t * beta; x_min <- (beta x_min + (1-beta) min(x)) /
  (1 - beta_t), likewise x_max (the correction is applied to the already-corrected state:
  the original code's quirk, kept). The range is updated before quantizing, at every forward.
  """

  def __init__(self, bits: int, beta: float = 0.9):
    super().__init__()
    self.bits = bits
    self.running_stat = True
    # A float32 buffer as in the original: (1 - beta) is then 0.100000024, not 0.1.
    self.register_buffer("beta", torch.tensor(beta, dtype=torch.float32))
    self.register_buffer("x_min", torch.zeros(()))
    self.register_buffer("x_max", torch.zeros(()))
    self.register_buffer("beta_t", torch.ones(()))

  @torch.no_grad()
  def update_range(self, x: torch.Tensor) -> None:
    lo, hi = torch.aminmax(x.detach())
    self.beta_t.mul_(self.beta)
    self.x_min.copy_((self.beta * self.x_min + (1 - self.beta) * lo) / (1 - self.beta_t))
    self.x_max.copy_((self.beta * self.x_max + (1 - self.beta) * hi) / (1 - self.beta_t))

  def forward(self, x):
    if self.running_stat:
      self.update_range(x)
    return fake_quant_ste(x, self.bits, self.x_min, self.x_max)


def quantize_model(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
  """In place: Conv2d/Linear -> weight fake-quant layers; ReLU -> ReLU followed by QuantAct."""
  for name, child in model.named_children():
    if isinstance(child, nn.Conv2d):
      setattr(model, name, QuantConv2d.from_float(child, w_bits))
    elif isinstance(child, nn.Linear):
      setattr(model, name, QuantLinear.from_float(child, w_bits))
    elif isinstance(child, (nn.ReLU, nn.ReLU6)):
      setattr(model, name, nn.Sequential(child, QuantAct(a_bits)))
    else:
      quantize_model(child, w_bits, a_bits)
  return model


# ----------------------------------------------------------------------------- models
class Generator(nn.Module):
  """GDFQ's CIFAR generator (methods.md §2.2), torch default init, used in train mode."""

  def __init__(
    self,
    num_classes: int = NUM_CLASSES,
    latent: int = LATENT,
    image_size: int = 32,
    channels: int = 3,
    channels_last: bool = False,
    width: int = 128,
  ):
    super().__init__()
    self.s0 = image_size // 4
    self.width = width
    self.channels_last = channels_last
    self.embed = nn.Embedding(num_classes, latent)
    self.fc = nn.Linear(latent, width * self.s0 * self.s0)
    self.bn0 = nn.BatchNorm2d(width)
    self.conv1 = nn.Conv2d(width, width, 3, padding=1)
    self.bn1 = nn.BatchNorm2d(width, eps=0.8)  # the positional "0.8" of the original is eps
    self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
    self.bn2 = nn.BatchNorm2d(width // 2, eps=0.8)
    self.conv3 = nn.Conv2d(width // 2, channels, 3, padding=1)
    self.bn_out = nn.BatchNorm2d(channels, affine=False)

  def forward(self, z, y):
    h = self.fc(self.embed(y) * z).view(z.shape[0], self.width, self.s0, self.s0)
    if self.channels_last:
      h = h.contiguous(memory_format=torch.channels_last)
    h = self.bn0(h)
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
    return self.bn_out(torch.tanh(self.conv3(h)))


class CondBatchNorm2d(nn.Module):
  """Categorical conditional BN (§2.2): affine-free BN, then scale[y] and shift[y]."""

  def __init__(self, num_classes: int, channels: int, eps: float = 1e-5):
    super().__init__()
    self.bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
    self.scale = nn.Embedding(num_classes, channels)
    self.shift = nn.Embedding(num_classes, channels)
    nn.init.ones_(self.scale.weight)
    nn.init.zeros_(self.shift.weight)

  def forward(self, x, y):
    return self.bn(x) * self.scale(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


class GeneratorImagenet(nn.Module):
  """GDFQ's ImageNet generator (methods.md §2.2), torch default init, train mode."""

  def __init__(self, num_classes: int = 1000, latent: int = LATENT, image_size: int = 224):
    super().__init__()
    self.s0, self.width = image_size // 4, 128
    self.fc = nn.Linear(latent, self.width * self.s0 * self.s0)
    self.bn0 = CondBatchNorm2d(num_classes, self.width)
    self.conv1 = nn.Conv2d(self.width, self.width, 3, padding=1)
    self.bn1 = CondBatchNorm2d(num_classes, self.width, eps=0.8)
    self.conv2 = nn.Conv2d(self.width, self.width // 2, 3, padding=1)
    self.bn2 = CondBatchNorm2d(num_classes, self.width // 2, eps=0.8)
    self.conv3 = nn.Conv2d(self.width // 2, 3, 3, padding=1)
    self.bn_out = nn.BatchNorm2d(3, affine=False)

  def forward(self, z, y):
    h = self.fc(z).view(z.shape[0], self.width, self.s0, self.s0)
    h = F.interpolate(self.bn0(h, y), scale_factor=2, mode="nearest")
    h = F.leaky_relu(self.bn1(self.conv1(h), y), 0.2)
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    h = F.leaky_relu(self.bn2(self.conv2(h), y), 0.2)
    return self.bn_out(torch.tanh(self.conv3(h)))


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut, then ReLU (each ReLU its own module)."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu1 = nn.ReLU()
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu2 = nn.ReLU()
    self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

  def forward(self, x):
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    if self.pad:  # option A: subsample by 2, zero-pad planes // 4 channels on each side
      x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
    return self.relu2(out + x)


class ResNet20(nn.Module):
  """CIFAR ResNet-20, akamaster layout: widths 16/32/64, 3 x 3 blocks, 19 BN layers.

  `depth` = 6n + 2 gives n blocks per stage (8: one block, as the demo's ResNet-8).
  """

  def __init__(self, num_classes: int = NUM_CLASSES, depth: int = 20):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.relu = nn.ReLU()
    blocks, in_planes = [], 16
    for stage, planes in enumerate((16, 32, 64)):
      for i in range((depth - 2) // 6):
        blocks.append(BasicBlock(in_planes, planes, 2 if (stage and i == 0) else 1))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.blocks(self.relu(self.bn1(self.conv1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ImagenetBasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + identity or conv1x1-BN projection, then ReLU."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu1 = nn.ReLU()
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu2 = nn.ReLU()
    self.shortcut = None
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    return self.relu2(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
  """ImageNet ResNet-18, pytorchcv layout: 7x7/2 stem, 3x3/2 max pool, widths 64-512."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    blocks, in_planes = [], 64
    for stage, planes in enumerate((64, 128, 256, 512)):
      for i in range(2):
        blocks.append(ImagenetBasicBlock(in_planes, planes, 2 if (stage and i == 0) else 1))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = F.max_pool2d(self.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act=True):
  layers = [
    nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
    nn.BatchNorm2d(cout),
  ]
  return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
  """conv1x1-BN-ReLU6 - dw3x3-BN-ReLU6 - conv1x1-BN (+ input at stride 1, equal widths)."""

  def __init__(self, cin: int, cout: int, expansion: int, stride: int):
    super().__init__()
    mid = cin * expansion
    self.body = nn.Sequential(
      _conv_bn(cin, mid, 1),
      _conv_bn(mid, mid, 3, stride, groups=mid),
      _conv_bn(mid, cout, 1, act=False),
    )
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
  """pytorchcv `mobilenetv2_w1`: expansion conv in every block (the first's 32->32 too),
  head conv1x1 1280 + BN + ReLU6, 1x1-conv classifier without bias."""

  SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
  SETTING += ((6, 160, 3, 2), (6, 320, 1, 1))

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    layers, cin = [_conv_bn(3, 32, 3, 2)], 32
    for t, c, n, s in self.SETTING:
      for i in range(n):
        layers.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
        cin = c
    layers.append(_conv_bn(cin, 1280, 1))
    self.features = nn.Sequential(*layers)
    self.output = nn.Conv2d(1280, num_classes, 1, bias=False)

  def forward(self, x):
    x = F.adaptive_avg_pool2d(self.features(x), 1)
    return torch.flatten(self.output(x), 1)


def build_networks(network: str, channels_last: bool = False):
  """(generator, teacher, num_classes, Q-loss temperature) of `network` (NETWORKS)."""
  if network == "resnet20":
    return Generator(channels_last=channels_last), ResNet20(), NUM_CLASSES, TEMPERATURE
  if network == "resnet18":
    teacher = ResNet18()
  elif network == "mobilenetv2":
    teacher = MobileNetV2()
  else:
    raise ValueError(f"unknown --network {network!r}: use one of {', '.join(NETWORKS)}.")
  return GeneratorImagenet(), teacher, 1000, IMAGENET_TEMPERATURE


# ----------------------------------------------------------------------------- losses
def bn_stat_loss(stats) -> torch.Tensor:
  """GDFQ L_BNS (§2.5): mean over layers of MSE_c(mu, mu_run) + MSE_c(var, var_run)."""
  terms = [F.mse_loss(mu, rm) + F.mse_loss(var, rv) for mu, var, rm, rv in stats]
  return torch.stack(terms).mean()


def _entropy(logits: torch.Tensor) -> torch.Tensor:
  logp = F.log_softmax(logits, dim=1)
  return -(logp.exp() * logp).sum(dim=1)


def adadfq_generator_terms(t, q, y, lambda_l: float, lambda_u: float) -> dict:
  """AdaDFQ (§5.1): entropy H of softmax(t - q), its batch normalisation H', margin h,
  L_ds = CE(t - q, y), L_as = CE(t + q, y). The batch min of H is not detached."""
  ent = _entropy(t - q)
  ent_min = ent.min()
  ent_norm = (ent - ent_min) / (math.log(t.shape[1]) - ent_min)
  margin = F.relu(lambda_l - ent_norm).mean() + F.relu(ent_norm - lambda_u).mean()
  return {
    "entropy": ent,
    "entropy_norm": ent_norm,
    "margin": margin,
    "ds": F.cross_entropy(t - q, y),
    "as": F.cross_entropy(t + q, y),
  }


def adadfq_q_loss(t, q, temperature: float = TEMPERATURE) -> torch.Tensor:
  """-T^2 * mean_b H(softmax((t - q) / T)) (the code form of §5.1)."""
  return -(temperature**2) * _entropy((t - q) / temperature).mean()


# ----------------------------------------------------------------------------- iteration
class AdaDFQStep:
  """Models, hooks and optimisers of the AdaDFQ loop; `step()` runs one iteration."""

  def __init__(
    self,
    batch: int,
    w_bits: int = 4,
    a_bits: int = 4,
    channels_last: bool = False,
    seed: int = 0,
    frozen_teacher: bool = False,
    network: str = "resnet20",
    bf16: bool = False,
  ):
    torch.manual_seed(seed)
    self.batch = batch
    self.bf16 = bf16
    generator, teacher, self.num_classes, self.temperature = build_networks(network, channels_last)
    self.generator = generator.train()
    teacher = teacher.eval()
    self.student = quantize_model(copy.deepcopy(teacher), w_bits, a_bits).eval()
    if frozen_teacher:
      teacher.requires_grad_(False)
    self.teacher = teacher
    if channels_last:
      for m in (self.generator, self.teacher, self.student):
        m.to(memory_format=torch.channels_last)
    self._bn_stats = []
    for m in teacher.modules():  # hooks on the teacher only (registered after the copy)
      if isinstance(m, nn.BatchNorm2d):
        m.register_forward_hook(self._bn_hook)
    self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    self.opt_q = torch.optim.SGD(
      self.student.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4
    )

  def _bn_hook(self, module, inputs, output):
    del output
    var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3), correction=0)
    self._bn_stats.append((mean, var, module.running_mean, module.running_var))

  def _autocast(self):
    """bf16: torch.autocast (CPU, bfloat16) around the networks' forwards (convs and
    matmuls in bfloat16, as torch decides; BN and fake quant then see bfloat16 inputs);
    the losses and optimizers stay float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

  def step(self) -> dict:
    hp = ADADFQ
    z = torch.randn(self.batch, LATENT)
    y = torch.randint(0, self.num_classes, (self.batch,))
    self._bn_stats.clear()
    with self._autocast():
      x = self.generator(z, y)
      self._bn_stats.clear()
      t, q = self.teacher(x).float(), self.student(x).float()
    terms = adadfq_generator_terms(t, q, y, hp["lambda_l"], hp["lambda_u"])
    bns = bn_stat_loss(self._bn_stats)
    loss_g = (
      terms["margin"]
      + hp["beta"] * (hp["alpha_ds"] * terms["ds"] + hp["alpha_as"] * terms["as"])
      + hp["gamma"] * bns
    )
    self.opt_g.zero_grad()
    loss_g.backward()
    self.opt_g.step()

    with self._autocast():
      q2 = self.student(x.detach()).float()
    loss_q = adadfq_q_loss(t.detach(), q2, self.temperature)
    self.opt_q.zero_grad()  # drops the student grads left by the generator's backward
    loss_q.backward()
    self.opt_q.step()
    self._bn_stats.clear()
    return {
      "margin": terms["margin"].detach(),
      "ce_ds": terms["ds"].detach(),
      "ce_as": terms["as"].detach(),
      "bns": bns.detach(),
      "loss_G": loss_g.detach(),
      "loss_Q": loss_q.detach(),
    }


def benchmark(
  batch: int,
  steps: int,
  warmup: int,
  w_bits: int = 4,
  a_bits: int = 4,
  threads: int | None = None,
  channels_last: bool = False,
  seed: int = 0,
  frozen_teacher: bool = False,
  network: str = "resnet20",
  bf16: bool = False,
) -> dict:
  if steps < 1 or warmup < 0 or batch < 2:
    raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 2; got {steps}, {warmup}, {batch}")
  if threads:
    torch.set_num_threads(threads)
  runner = AdaDFQStep(batch, w_bits, a_bits, channels_last, seed, frozen_teacher, network, bf16)
  losses0, times = None, []
  for i in range(warmup + steps):
    if i == max(warmup, 1):  # ranges freeze (after >= 1 update), as after a run's first epochs
      for m in runner.student.modules():
        if isinstance(m, QuantAct):
          m.running_stat = False
    t0 = time.perf_counter()
    losses = runner.step()
    elapsed = time.perf_counter() - t0
    if i == 0:
      losses0 = {k: float(v) for k, v in losses.items()}
    if i >= warmup:
      times.append(elapsed)
  median = statistics.median(times)
  return {
    "impl": "torch",
    "network": network,
    "bf16": bf16,
    "batch": batch,
    "bits": f"w{w_bits}a{a_bits}",
    "median_step_s": median,
    "min_step_s": min(times),
    "max_step_s": max(times),
    "images_per_s": batch / median,
    "timed_steps": steps,
    "warmup": warmup,
    "torch_version": torch.__version__,
    "threads": torch.get_num_threads(),
    "channels_last": channels_last,
    "frozen_teacher": frozen_teacher,
    "losses_step0": losses0,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10, help="timed iterations")
  p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
  p.add_argument("--bits", type=int, default=4, help="weight bits (and activation bits)")
  p.add_argument("--abits", type=int, default=None, help="activation bits (default: --bits)")
  p.add_argument(
    "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
  )
  p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--frozen-teacher",
    action="store_true",
    help="skip the teacher's weight gradients (the original code computes them)",
  )
  p.add_argument("--network", choices=NETWORKS, default="resnet20")
  p.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16) forwards")
  args = p.parse_args(argv)
  row = benchmark(
    args.batch,
    args.steps,
    args.warmup,
    args.bits,
    args.abits if args.abits is not None else args.bits,
    args.threads,
    args.channels_last,
    args.seed,
    args.frozen_teacher,
    args.network,
    args.bf16,
  )
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
