"""PyTorch -> Flax conversion: logit equality with the PyTorch models, strictness, orbax.

References: the real akamaster ResNet-20 checkpoint with a faithful PyTorch ResNet-20
written here; pytorchcv's own models (random weights, randomised BN statistics); and
PyTorch definitions written here with torchvision's module names (torchvision itself
does not import next to the CPU torch wheel).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from dfq_jax.models import convert, get_model  # noqa: E402  (after importorskip)
from dfq_jax.models.resnet_imagenet import max_pool_torch  # noqa: E402
from dfq_jax.quant import QuantPolicy  # noqa: E402

AKAMASTER_CKPT = "/work/shared/models/resnet20_cifar10_akamaster.th"
# Max |logit diff| allowed, relative to max(1, max |logit|): float32 reassociation only.
RTOL = 1e-4

torch.set_num_threads(2)


# --------------------------------------------------------------------------- references


class _AkaBlock(tnn.Module):
  """akamaster BasicBlock, option A, functional ReLU."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.pad = planes // 4 if stride != 1 or in_planes != planes else None

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.pad is not None:
      x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
    return F.relu(out + x)


class _AkaResNet(tnn.Module):
  def __init__(self, n=3, num_classes=10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(16)
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
      blocks = []
      for b in range(n):
        blocks.append(_AkaBlock(in_planes, planes, 2 if stage > 0 and b == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
    self.linear = tnn.Linear(64, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.size()[3])
    return self.linear(out.view(out.size(0), -1))


class _TvBasicBlock(tnn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.relu = tnn.ReLU(inplace=True)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class _TvBottleneck(tnn.Module):
  """torchvision v1.5: the stride sits on the 3x3 conv."""

  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.relu = tnn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class _TvResNet(tnn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(64)
    self.relu = tnn.ReLU(inplace=True)
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for i, n in enumerate(layers):
      planes, stride = 64 * 2**i, 1 if i == 0 else 2
      blocks = []
      for b in range(n):
        s = stride if b == 0 else 1
        down = None
        if s != 1 or inplanes != planes * block.expansion:
          down = tnn.Sequential(
            tnn.Conv2d(inplanes, planes * block.expansion, 1, s, bias=False),
            tnn.BatchNorm2d(planes * block.expansion),
          )
        blocks.append(block(inplanes, planes, s, down))
        inplanes = planes * block.expansion
      setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
    self.avgpool = tnn.AdaptiveAvgPool2d(1)
    self.fc = tnn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn_act(inp, oup, k, stride=1, groups=1):
  """torchvision Conv2dNormActivation(..., activation_layer=ReLU6)."""
  return tnn.Sequential(
    tnn.Conv2d(inp, oup, k, stride, (k - 1) // 2, groups=groups, bias=False),
    tnn.BatchNorm2d(oup),
    tnn.ReLU6(inplace=True),
  )


class _TvInvertedResidual(tnn.Module):
  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = inp * expand_ratio
    self.use_res_connect = stride == 1 and inp == oup
    layers = [_conv_bn_act(inp, hidden, 1)] if expand_ratio != 1 else []
    layers += [
      _conv_bn_act(hidden, hidden, 3, stride, hidden),
      tnn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
      tnn.BatchNorm2d(oup),
    ]
    self.conv = tnn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class _TvMobileNetV2(tnn.Module):
  def __init__(self, num_classes=1000):
    super().__init__()
    setting = [
      [1, 16, 1, 1],
      [6, 24, 2, 2],
      [6, 32, 3, 2],
      [6, 64, 4, 2],
      [6, 96, 3, 1],
      [6, 160, 3, 2],
      [6, 320, 1, 1],
    ]
    features = [_conv_bn_act(3, 32, 3, 2)]
    inp = 32
    for t, c, n, s in setting:
      for i in range(n):
        features.append(_TvInvertedResidual(inp, c, s if i == 0 else 1, t))
        inp = c
    features.append(_conv_bn_act(inp, 1280, 1))
    self.features = tnn.Sequential(*features)
    self.classifier = tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(1280, num_classes))

  def forward(self, x):
    x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
    return self.classifier(torch.flatten(x, 1))


_PTCV_MODULES = {
  "resnet20_cifar10": "resnet_cifar",
  "resnet20_cifar100": "resnet_cifar",
  "resnet18": "resnet",
  "resnet50": "resnet",
  "mobilenetv2_w1": "mobilenetv2",
}


def _pytorchcv(name):
  """A pytorchcv model with random weights (`get_model(name, pretrained=False)`).

  `pytorchcv.model_provider` imports every model, some of which need torchvision, so the
  model's own module is imported instead.
  """
  module = pytest.importorskip(f"pytorchcv.models.{_PTCV_MODULES[name]}")
  net = getattr(module, name)(pretrained=False)
  if not name.endswith(("cifar10", "cifar100")):
    # pytorchcv's ImageNet nets end with AvgPool2d(7): global only at 224x224. Ours is
    # global at every size; make theirs global too so that small inputs can be tested.
    net.features.final_pool = tnn.AdaptiveAvgPool2d(1)
  return net


def _model(name, num_classes, **kwargs):
  """Our model; the suffix '_B' selects the projection shortcuts of pytorchcv's CIFAR nets."""
  if name.endswith("_B"):
    name, kwargs = name[:-2], {**kwargs, "shortcut": "B"}
  return get_model(name, num_classes=num_classes, **kwargs)


# name -> (torch builder, our model name, num_classes, layout, input size, BN layers)
CASES = {
  "pytorchcv_resnet20_cifar10": (
    lambda: _pytorchcv("resnet20_cifar10"),
    "resnet20_cifar_B",
    10,
    "pytorchcv",
    32,
    21,
  ),
  "pytorchcv_resnet20_cifar100": (
    lambda: _pytorchcv("resnet20_cifar100"),
    "resnet20_cifar_B",
    100,
    "pytorchcv",
    32,
    21,
  ),
  "pytorchcv_resnet18": (lambda: _pytorchcv("resnet18"), "resnet18", 1000, "pytorchcv", 64, 20),
  "pytorchcv_resnet50": (lambda: _pytorchcv("resnet50"), "resnet50", 1000, "pytorchcv", 64, 53),
  "pytorchcv_mobilenetv2_w1": (
    lambda: _pytorchcv("mobilenetv2_w1"),
    "mobilenetv2",
    1000,
    "pytorchcv",
    64,
    53,
  ),
  "torchvision_resnet18": (
    lambda: _TvResNet(_TvBasicBlock, [2, 2, 2, 2]),
    "resnet18",
    1000,
    "torchvision",
    64,
    20,
  ),
  "torchvision_resnet50": (
    lambda: _TvResNet(_TvBottleneck, [3, 4, 6, 3]),
    "resnet50_torchvision",
    1000,
    "torchvision",
    64,
    53,
  ),
  "torchvision_mobilenet_v2": (
    _TvMobileNetV2,
    "mobilenetv2_torchvision",
    1000,
    "torchvision",
    64,
    52,
  ),
}


def _randomise_bn(net, seed=0):
  """Random affine parameters AND running statistics, so BN matters in eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
  return net


def _torch_logits(net, x_nhwc):
  with torch.no_grad():
    return net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _inputs(size, n=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _max_rel_diff(ours, ref):
  ours = np.asarray(ours)
  return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@functools.cache
def _case(name):
  """(torch net, our model, converted variables, input size) for a CASES entry."""
  build, model_name, classes, layout, size, _ = CASES[name]
  torch.manual_seed(0)
  net = _randomise_bn(build()).eval()
  model = _model(model_name, classes)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  variables = convert.convert_state_dict(sd, model, layout, (1, size, size, 3))
  return net, model, variables, size


# --------------------------------------------------------------------------- logits


def test_akamaster_real_checkpoint_logits():
  sd = convert.load_torch_state_dict(AKAMASTER_CKPT)
  assert len(sd) == 97 and not any(k.startswith("module.") for k in sd)
  net = _AkaResNet().eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model = get_model("resnet20_cifar", num_classes=10)
  variables = convert.load_teacher_variables(AKAMASTER_CKPT, model, "akamaster")
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 19
  x = _inputs(32, n=4)
  ref = _torch_logits(net, x)
  ours = jax.jit(model.apply)(variables, jnp.asarray(x))
  assert _max_rel_diff(ours, ref) <= RTOL
  np.testing.assert_array_equal(np.argmax(ours, -1), np.argmax(ref, -1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_pytorch(name):
  net, model, variables, size = _case(name)
  n_bn = sum(isinstance(m, tnn.BatchNorm2d) for m in net.modules())
  assert n_bn == CASES[name][5] == len(jax.tree.leaves(variables["batch_stats"])) // 2
  x = _inputs(size)
  ref = _torch_logits(net, x)
  ours = jax.jit(model.apply)(variables, jnp.asarray(x))
  assert ours.shape == ref.shape
  assert float(np.std(ref)) > 1e-3  # the logits are not degenerate
  assert _max_rel_diff(ours, ref) <= RTOL, np.max(np.abs(np.asarray(ours) - ref))


@pytest.mark.parametrize(
  "ptcv_name, model_name",
  [
    ("resnet20_cifar10", "resnet20_cifar_B"),
    ("resnet18", "resnet18"),
    ("resnet50", "resnet50"),
    ("mobilenetv2_w1", "mobilenetv2"),
  ],
)
def test_one_quant_act_per_pytorchcv_relu_module(ptcv_name, model_name):
  """GDFQ puts a QuantAct after every nn.ReLU/ReLU6 module: we have as many."""
  net = _pytorchcv(ptcv_name)
  n_relu = sum(isinstance(m, (tnn.ReLU, tnn.ReLU6)) for m in net.modules())
  student = _model(model_name, 10, quant=QuantPolicy())
  shapes = jax.eval_shape(lambda: student.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert len(shapes["quant_stats"]) and n_relu == len(
    [
      1
      for p, _ in jax.tree_util.tree_leaves_with_path(shapes["quant_stats"])
      if p[-1].key == "x_max"
    ]
  )


def test_max_pool_matches_torch_padding():
  x = -np.abs(_inputs(9, n=2))  # all negative: zero padding would show up
  ref = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, 2, 1).numpy()
  np.testing.assert_array_equal(max_pool_torch(jnp.asarray(x)), ref.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def akamaster_sd():
  return convert.load_torch_state_dict(AKAMASTER_CKPT)


def test_wrong_layout_is_rejected(akamaster_sd):
  model = get_model("resnet20_cifar", num_classes=10, shortcut="B")
  with pytest.raises(ValueError, match=r"missing key.*'features\.init_block.*pytorchcv"):
    convert.convert_state_dict(akamaster_sd, model, "pytorchcv")
  with pytest.raises(ValueError, match="no mapping"):
    convert.convert_state_dict(akamaster_sd, model, "torchvision")
  with pytest.raises(ValueError, match="shortcut='B'"):
    convert.convert_state_dict(
      akamaster_sd, get_model("resnet20_cifar", num_classes=10), "pytorchcv"
    )
  with pytest.raises(ValueError, match="unknown"):
    convert.convert_state_dict(akamaster_sd, model, "caffe")


def test_wrong_depth_is_rejected(akamaster_sd):
  with pytest.raises(ValueError, match=r"missing key.*'layer1\.3\.bn1\.bias'.*depth=32"):
    convert.convert_state_dict(
      akamaster_sd, get_model("resnet32_cifar", num_classes=10), "akamaster"
    )
  with pytest.raises(ValueError, match=r"extra key: torch key 'layer1\.1\.conv1\.weight'"):
    convert.convert_state_dict(
      akamaster_sd, get_model("resnet8_cifar", num_classes=10), "akamaster"
    )
  # The message starts with what to do: the depth the checkpoint's blocks imply.
  for model in ("resnet8_cifar", "resnet56_cifar"):
    with pytest.raises(ValueError) as info:
      convert.convert_state_dict(akamaster_sd, get_model(model, num_classes=10), "akamaster")
    assert str(info.value).startswith(
      "this checkpoint looks like a ResNet-20 (3 blocks per stage), not a ResNet-"
    )
    assert "use --config.teacher.model=resnet20_cifar." in str(info.value)


def test_missing_and_extra_keys_are_named(akamaster_sd):
  model = get_model("resnet20_cifar", num_classes=10)
  sd = dict(akamaster_sd)
  del sd["layer2.1.conv2.weight"]
  with pytest.raises(
    ValueError,
    match=r"missing key: torch key 'layer2\.1\.conv2\.weight'"
    r".*layer2_1/conv2/kernel, shape \(3, 3, 32, 32\)",
  ):
    convert.convert_state_dict(sd, model, "akamaster")
  sd = {
    **akamaster_sd,
    "fc.weight": np.zeros((10, 64), np.float32),
    "bn1.num_batches_tracked": np.array(3),
  }  # the latter is ignored
  with pytest.raises(ValueError, match=r"extra key: torch key 'fc\.weight' \(shape \(10, 64\)\)"):
    convert.convert_state_dict(sd, model, "akamaster")


def test_wrong_shape_names_key_and_both_shapes(akamaster_sd):
  with pytest.raises(
    ValueError,
    match=r"torch key 'linear\.weight' has shape \(10, 64\) but our "
    r"params/linear/kernel needs \(64, 100\) \(in torch order \(100, 64\)\)",
  ):
    convert.convert_state_dict(
      akamaster_sd, get_model("resnet20_cifar", num_classes=100), "akamaster"
    )
  sd = {**akamaster_sd, "conv1.weight": np.zeros((16, 3, 5, 5), np.float32)}
  with pytest.raises(
    ValueError,
    match=r"'conv1\.weight' has shape \(16, 3, 5, 5\) but our params/conv1/"
    r"kernel needs \(3, 3, 3, 16\) \(in torch order \(16, 3, 3, 3\)\)",
  ):
    convert.convert_state_dict(sd, get_model("resnet20_cifar", num_classes=10), "akamaster")


def test_torchvision_bottleneck_needs_stride_on_3x3():
  sd = {k: v.numpy() for k, v in _TvResNet(_TvBottleneck, [3, 4, 6, 3]).state_dict().items()}
  with pytest.raises(ValueError, match="conv1_stride=False"):
    convert.convert_state_dict(sd, get_model("resnet50", num_classes=1000), "torchvision")


def test_mobilenet_layouts_are_not_interchangeable():
  sd = {k: v.numpy() for k, v in _TvMobileNetV2().state_dict().items()}
  with pytest.raises(ValueError, match=r"missing key: torch key 'features\.stage1\.unit1"):
    convert.convert_state_dict(sd, get_model("mobilenetv2", num_classes=1000), "pytorchcv")
  with pytest.raises(ValueError, match="missing key|shape mismatch"):
    convert.convert_state_dict(sd, get_model("mobilenetv2", num_classes=1000), "torchvision")


# --------------------------------------------------------------------------- files


def test_load_torch_state_dict_unwraps_and_strips(tmp_path):
  sd = {"module.a.weight": torch.ones(2, 3), "module.a.bias": torch.zeros(2)}
  torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "w.pth")
  out = convert.load_torch_state_dict(tmp_path / "w.pth")
  assert set(out) == {"a.weight", "a.bias"} and out["a.weight"].shape == (2, 3)
  with pytest.raises(FileNotFoundError):
    convert.load_torch_state_dict(tmp_path / "nope.pth")


def test_orbax_round_trip_and_teacher_loading(tmp_path):
  model = get_model("resnet20_cifar", num_classes=10)
  variables = convert.load_teacher_variables(AKAMASTER_CKPT, model, "akamaster")
  out = convert.save_variables(variables, tmp_path / "teacher")
  restored = convert.load_teacher_variables(out, model)
  plain = convert.load_variables(out)
  x = jnp.asarray(_inputs(32, n=2))
  apply = jax.jit(model.apply)
  ref = apply(variables, x)
  np.testing.assert_array_equal(apply(restored, x), ref)
  np.testing.assert_array_equal(apply(plain, x), ref)
  with pytest.raises(FileNotFoundError, match="do not exist"):
    convert.load_teacher_variables(tmp_path / "missing.th", model, "akamaster")
  with pytest.raises(ValueError, match="layout"):
    convert.load_teacher_variables(AKAMASTER_CKPT, model)


def test_cli_converts_and_saves(tmp_path, capsys):
  out = tmp_path / "cli"
  convert.main(
    [
      "--src",
      AKAMASTER_CKPT,
      "--layout",
      "akamaster",
      "--model",
      "resnet20_cifar",
      "--num-classes",
      "10",
      "--out",
      str(out),
    ]
  )
  assert "269722 parameters" in capsys.readouterr().out
  restored = convert.load_variables(out)
  assert restored["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)


def test_weights_table_is_consistent():
  for name, w in convert.WEIGHTS.items():
    assert w.layout in convert.LAYOUTS and w.url.startswith("https://")
    assert w.url.endswith(w.filename) or w.url.endswith(w.filename + ".zip"), name
    model = w.build_model()
    assert (getattr(model, "shortcut", "B") == "B") == (w.layout != "akamaster"), name
  with pytest.raises(ValueError, match="unknown weights"):
    convert.download_weights("resnet19", os.devnull)


def test_architecture_hint_counts_pytorchcv_units_from_one():
  source = {f"features.stage1.unit{i}.body.conv1.conv.weight": None for i in range(1, 10)}
  hint = convert._architecture_hint(source, get_model("resnet20_cifar", num_classes=10))
  assert "looks like a ResNet-56 (9 blocks per stage)" in hint
  assert convert._architecture_hint(source, get_model("resnet56_cifar", num_classes=10)) == ""
