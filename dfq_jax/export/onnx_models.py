"""QDQ ONNX graphs of the students (and float teachers) of every dfq_jax model family.

  export_model(model, variables, metadata) -> onnx.ModelProto

CIFAR ResNets (shortcut A: akamaster's stride-2 subsample plus zero channels, as a fixed
0/1 1x1 conv; B: a folded 1x1 projection), ImageNet ResNets (basic and bottleneck
blocks, either bottleneck stride placement; torch's -inf padded max-pool) and
MobileNetV2 (depthwise convs as grouped Convs, ReLU6 as Clip, linear bottlenecks). The
layer names and QuantAct positions mirror the Flax modules (models/*.py); the numerics
are onnx_graph.py's.
"""

from __future__ import annotations

import onnx

from dfq_jax.export.integer_graph import IntegerGraphBuilder
from dfq_jax.export.onnx_graph import GraphBuilder
from dfq_jax.models.mobilenet_v2 import MobileNetV2, block_specs
from dfq_jax.models.resnet_cifar import ResNetCifar
from dfq_jax.models.resnet_imagenet import RESNET_SPECS, ResNet

SUPPORTED = (ResNetCifar, ResNet, MobileNetV2)


def _projection(g, x, name, stride):
  short = g.conv_bn(x, f"{name}/shortcut_conv", f"{name}/shortcut_bn", stride)
  return g.deploy_act(short, f"{name}/shortcut_act")


def _basic_block(g, x, name, in_planes, planes, stride, shortcut):
  out = g.relu(g.conv_bn(x, f"{name}/conv1", f"{name}/bn1", stride), f"{name}/relu1")
  out = g.quant_act(out, f"{name}/act1")
  out = g.deploy_act(g.conv_bn(out, f"{name}/conv2", f"{name}/bn2", 1), f"{name}/conv2_act")
  if stride == 1 and in_planes == planes:
    short = x
  elif shortcut == "B":
    short = _projection(g, x, name, stride)
  else:
    short = g.shortcut_a(x, name, in_planes, planes, stride)
  out = g.relu(g.add(out, short, f"{name}/add"), f"{name}/relu2")
  return g.quant_act(out, f"{name}/act2")


def _bottleneck(g, x, name, in_planes, planes, stride, conv1_stride):
  s1, s2 = (stride, 1) if conv1_stride else (1, stride)
  out = g.relu(g.conv_bn(x, f"{name}/conv1", f"{name}/bn1", s1), f"{name}/relu1")
  out = g.quant_act(out, f"{name}/act1")
  out = g.relu(g.conv_bn(out, f"{name}/conv2", f"{name}/bn2", s2), f"{name}/relu2")
  out = g.quant_act(out, f"{name}/act2")
  out = g.deploy_act(g.conv_bn(out, f"{name}/conv3", f"{name}/bn3", 1), f"{name}/conv3_act")
  if stride == 1 and in_planes == 4 * planes:
    short = x
  else:
    short = _projection(g, x, name, stride)
  out = g.relu(g.add(out, short, f"{name}/add"), f"{name}/relu3")
  return g.quant_act(out, f"{name}/act3")


def _resnet_cifar(g: GraphBuilder, model: ResNetCifar) -> str:
  x = g.deploy_act("input", "input_act")
  x = g.relu(g.conv_bn(x, "conv1", "bn1", 1, role="first"), "relu1")
  x = g.quant_act(x, "act1")
  in_planes, n = model.width, (model.depth - 2) // 6
  for stage in range(3):
    planes = model.width * 2**stage
    for b in range(n):
      stride = 2 if stage > 0 and b == 0 else 1
      x = _basic_block(g, x, f"layer{stage + 1}_{b}", in_planes, planes, stride, model.shortcut)
      in_planes = planes
  return g.classifier(x, "linear")


def _resnet_imagenet(g: GraphBuilder, model: ResNet) -> str:
  kind, stage_sizes = RESNET_SPECS[model.depth]
  x = g.deploy_act("input", "input_act")
  x = g.relu(g.conv_bn(x, "conv1", "bn1", 2, role="first"), "relu1")
  x = g.max_pool(g.quant_act(x, "act1"))
  in_planes = model.width
  for stage, n_blocks in enumerate(stage_sizes):
    planes = model.width * 2**stage
    for b in range(n_blocks):
      stride = 2 if stage > 0 and b == 0 else 1
      name = f"layer{stage + 1}_{b}"
      if kind == "basic":
        x = _basic_block(g, x, name, in_planes, planes, stride, "B")
        in_planes = planes
      else:
        x = _bottleneck(g, x, name, in_planes, planes, stride, model.conv1_stride)
        in_planes = 4 * planes
  return g.classifier(x, "fc")


def _mobilenet_v2(g: GraphBuilder, model: MobileNetV2) -> str:
  x = g.deploy_act("input", "input_act")
  x = g.relu6(g.conv_bn(x, "stem_conv", "stem_bn", 2, role="first"), "stem_relu6")
  x = g.quant_act(x, "stem_act")
  in_features = g.params["stem_conv"]["kernel"].shape[-1]
  for i, (_, out_features, stride) in enumerate(block_specs()):
    name, y = f"block{i}", x
    if "expand_conv" in g.params[name]:
      y = g.relu6(g.conv_bn(y, f"{name}/expand_conv", f"{name}/expand_bn", 1), f"{name}/r6a")
      y = g.quant_act(y, f"{name}/expand_act")
    mid = g.params[name]["dw_conv"]["kernel"].shape[-1]
    y = g.conv_bn(y, f"{name}/dw_conv", f"{name}/dw_bn", stride, groups=mid)
    y = g.quant_act(g.relu6(y, f"{name}/r6b"), f"{name}/dw_act")
    y = g.conv_bn(y, f"{name}/project_conv", f"{name}/project_bn", 1)
    y = g.deploy_act(y, f"{name}/project_act")
    if stride == 1 and in_features == out_features:
      y = g.deploy_act(g.add(y, x, f"{name}/add"), f"{name}/add_act")
    x, in_features = y, out_features
  x = g.relu6(g.conv_bn(x, "head_conv", "head_bn", 1), "head_relu6")
  x = g.quant_act(x, "head_act")
  return g.classifier(x, "classifier")


def _build(g: GraphBuilder, model) -> str:
  if isinstance(model, ResNetCifar):
    return _resnet_cifar(g, model)
  if isinstance(model, ResNet):
    return _resnet_imagenet(g, model)
  if isinstance(model, MobileNetV2):
    return _mobilenet_v2(g, model)
  names = ", ".join(m.__name__ for m in SUPPORTED)
  raise TypeError(f"export supports {names}; {type(model).__name__} is not one of them.")


def integer_program(model, variables: dict, metadata: dict[str, str]):
  """(ONNX model, integer program) of a deployment-quantizer student: the graph ONNX
  Runtime runs on integer kernels and the ops integer_reference.run executes."""
  g = IntegerGraphBuilder(variables, model.quant)
  logits = _build(g, model)
  return g.model(logits, model.num_classes, metadata), g.ops


def export_model(model, variables: dict, metadata: dict[str, str]) -> onnx.ModelProto:
  """The ONNX model of a student (`model.quant` its QuantPolicy) or of the float teacher
  (`model.quant` None) of any supported family; TypeError for another module. A student of
  the deployment quantizer (`quant.deploy`) exports as the integer graph."""
  if model.quant is not None and model.quant.deploy:
    return integer_program(model, variables, metadata)[0]
  g = GraphBuilder(variables, model.quant)
  return g.model(_build(g, model), model.num_classes, metadata)
