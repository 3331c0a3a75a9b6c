"""PyTorch checkpoints -> Flax variables {'params', 'batch_stats'} for our model zoo.

Layouts (the naming scheme of the PyTorch state_dict):
  'akamaster'   akamaster/pytorch_resnet_cifar10 CIFAR ResNets (`ResNetCifar`, option-A
                shortcuts; checkpoints are {'best_prec1', 'state_dict'} with 'module.' keys).
  'pytorchcv'   osmr/imgclsmob: resnet20_cifar10/100 (`ResNetCifar(shortcut='B')`),
                resnet18/34/50 (`ResNet`), mobilenetv2_w1 (`MobileNetV2` pytorchcv layout).
  'torchvision' resnet18/34/50 (`ResNet(conv1_stride=False)` for bottlenecks) and
                mobilenet_v2 (`MobileNetV2(expand_first_block=False, classifier_bias=True)`).

Tensor mapping: conv OIHW -> HWIO (depthwise [C, 1, kh, kw] -> [kh, kw, 1, C]); linear
[out, in] -> [in, out] (a 1x1-conv classifier [out, in, 1, 1] maps onto our dense
classifier); BN weight -> scale, bias -> bias, running_mean -> batch_stats mean,
running_var -> var; `num_batches_tracked` is ignored. The conversion is strict: every
target leaf must be filled with the right shape and every source tensor used.

Converted variables are saved with orbax (`save_variables`), so later runs need no torch.
`load_teacher_variables` accepts either form. CLI:

  python -m dfq_jax.models.convert --src resnet20-12fca82f.th --layout akamaster \
      --model resnet20_cifar --num-classes 10 --out /abs/dir/teacher
  python -m dfq_jax.models.convert --src resnet20_cifar10-0597-9b0024ac.pth \
      --layout pytorchcv --model resnet20_cifar --model-arg shortcut=B --num-classes 10 \
      --out /abs/dir/teacher
  python -m dfq_jax.models.convert --download resnet20_cifar10 --out DIR   # needs network
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax.models import get_model
from dfq_jax.models.mobilenet_v2 import MobileNetV2, block_specs
from dfq_jax.models.resnet_cifar import ResNetCifar
from dfq_jax.models.resnet_imagenet import RESNET_SPECS, ResNet

LAYOUTS = ("akamaster", "pytorchcv", "torchvision")
TORCH_SUFFIXES = (".th", ".pth", ".pt", ".tar", ".pkl")
_IGNORED_SUFFIXES = ("num_batches_tracked",)

_IMGCLSMOB = "https://github.com/osmr/imgclsmob/releases/download"
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"


@dataclasses.dataclass(frozen=True)
class Weights:
  """A public checkpoint: where it lives and which model/layout it converts into."""

  url: str
  filename: str  # the checkpoint file (inside the zip for pytorchcv releases)
  model: str  # name in dfq_jax.models.MODELS
  num_classes: int
  layout: str
  sha: str  # hex digest of the checkpoint file
  sha_kind: str  # 'sha1' (pytorchcv) or 'sha256' (akamaster; a prefix in the name)
  model_kwargs: tuple[tuple[str, Any], ...] = ()  # extra get_model arguments

  def build_model(self, **kwargs):
    """The matching (teacher) model of dfq_jax.models."""
    return get_model(self.model, num_classes=self.num_classes, **dict(self.model_kwargs), **kwargs)


def _ptcv(name, error, sha1, tag, model, num_classes, **model_kwargs):
  filename = f"{name}-{error}-{sha1[:8]}.pth"
  return Weights(
    f"{_IMGCLSMOB}/{tag}/{filename}.zip",
    filename,
    model,
    num_classes,
    "pytorchcv",
    sha1,
    "sha1",
    tuple(model_kwargs.items()),
  )


def _aka(depth, sha256_prefix):
  filename = f"resnet{depth}-{sha256_prefix}.th"
  return Weights(
    f"{_AKAMASTER}/{filename}",
    filename,
    f"resnet{depth}_cifar",
    10,
    "akamaster",
    sha256_prefix,
    "sha256",
  )


# pytorchcv entries follow the metainfo of pytorchcv 0.0.74 (`model_metainfos.csv`). The
# papers' model_store used `resnet18` from release v0.0.153 (a different file); the others
# have the same release tags as methods.md §1.
WEIGHTS: dict[str, Weights] = {
  "resnet20_cifar10": _ptcv(
    "resnet20_cifar10",
    "0597",
    "9b0024ac4c2f374cde2c5052e0d0344a75871cdb",
    "v0.0.163",
    "resnet20_cifar",
    10,
    shortcut="B",
  ),
  "resnet20_cifar100": _ptcv(
    "resnet20_cifar100",
    "2964",
    "a5322afed92fa96cb7b3453106f73cf38e316151",
    "v0.0.180",
    "resnet20_cifar",
    100,
    shortcut="B",
  ),
  "resnet18": _ptcv(
    "resnet18", "0896", "77a56f155214819bfc79ff09795370f955b20e6d", "v0.0.478", "resnet18", 1000
  ),
  "resnet50": _ptcv(
    "resnet50", "0633", "b00d1c8e52aa7a2badc705b1545aaf6ccece6ce9", "v0.0.329", "resnet50", 1000
  ),
  "mobilenetv2_w1": _ptcv(
    "mobilenetv2_w1",
    "0887",
    "13a021bca5b679b76156829743f7182da42e8bb6",
    "v0.0.213",
    "mobilenetv2",
    1000,
  ),
  "akamaster_resnet20": _aka(20, "12fca82f"),
  "akamaster_resnet32": _aka(32, "d509ac18"),
  "akamaster_resnet44": _aka(44, "014dd654"),
  "akamaster_resnet56": _aka(56, "4bfd9763"),
}


# --------------------------------------------------------------------------- loading


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into {name: float32/int numpy array}.

  Unwraps {'state_dict': ...} (also 'model_state_dict', 'model', 'net') and strips the
  'module.' prefix of DataParallel checkpoints. Needs torch (imported lazily).
  """
  try:
    import torch  # imported on use
  except ImportError as e:
    raise ImportError(
      "Reading PyTorch checkpoints needs torch: pip install 'dfq_jax[torch]'."
    ) from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(
      f"{path!r} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
      f"{e}). Is the file complete (re-download it) and a state_dict saved "
      "with torch.save?"
    ) from e
  for key in ("state_dict", "model_state_dict", "model", "net"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state_dict.")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(
        f"{path!r}: entry {name!r} is a {type(value).__name__}, not a tensor; is this a state_dict?"
      )
    name = name[len("module.") :] if name.startswith("module.") else name
    out[name] = value.detach().cpu().numpy()
  return out


# --------------------------------------------------------------------------- name maps

# Each rule: (regex over our module path 'a/b', function of the match -> torch prefix).
Rule = tuple[str, Callable[[re.Match], str]]


def _resnet_cifar_rules(model: ResNetCifar, layout: str) -> list[Rule]:
  if layout == "akamaster":
    return [
      (r"conv1|bn1|linear", lambda m: m[0]),
      (r"layer(\d+)_(\d+)/(conv\d|bn\d)", lambda m: f"layer{m[1]}.{m[2]}.{m[3]}"),
      # akamaster's option-B shortcut: nn.Sequential(conv, bn).
      (
        r"layer(\d+)_(\d+)/shortcut_(conv|bn)",
        lambda m: f"layer{m[1]}.{m[2]}.shortcut.{'0' if m[3] == 'conv' else '1'}",
      ),
    ]
  if layout == "pytorchcv":
    if model.shortcut != "B":
      raise ValueError(
        "pytorchcv CIFAR ResNets have 1x1-conv + BN projection shortcuts: "
        "build the model with shortcut='B' (e.g. get_model('resnet20_cifar', "
        f"num_classes=..., shortcut='B')); got {_describe(model)}."
      )
    return [
      (r"conv1", lambda m: "features.init_block.conv"),
      (r"bn1", lambda m: "features.init_block.bn"),
      *_pytorchcv_unit_rules(),
      (r"linear", lambda m: "output"),
    ]
  raise _unsupported(model, layout)


def _pytorchcv_unit_rules() -> list[Rule]:
  unit = lambda m: f"features.stage{m[1]}.unit{int(m[2]) + 1}"
  kind = lambda k: "conv" if k == "conv" else "bn"
  return [
    (r"layer(\d+)_(\d+)/(conv|bn)(\d)", lambda m: f"{unit(m)}.body.conv{m[4]}.{kind(m[3])}"),
    (r"layer(\d+)_(\d+)/shortcut_(conv|bn)", lambda m: f"{unit(m)}.identity_conv.{kind(m[3])}"),
  ]


def _resnet_rules(model: ResNet, layout: str) -> list[Rule]:
  if layout == "pytorchcv":
    return [
      (r"conv1", lambda m: "features.init_block.conv.conv"),
      (r"bn1", lambda m: "features.init_block.conv.bn"),
      *_pytorchcv_unit_rules(),
      (r"fc", lambda m: "output"),
    ]
  if layout == "torchvision":
    if RESNET_SPECS[model.depth][0] == "bottleneck" and model.conv1_stride:
      raise ValueError(
        "torchvision bottleneck ResNets (v1.5) put the stride on the 3x3 conv: build "
        "the model with conv1_stride=False (e.g. get_model('resnet50_torchvision', ...))."
      )
    return [
      (r"conv1|bn1|fc", lambda m: m[0]),
      (r"layer(\d+)_(\d+)/(conv\d|bn\d)", lambda m: f"layer{m[1]}.{m[2]}.{m[3]}"),
      (
        r"layer(\d+)_(\d+)/shortcut_(conv|bn)",
        lambda m: f"layer{m[1]}.{m[2]}.downsample.{'0' if m[3] == 'conv' else '1'}",
      ),
    ]
  raise _unsupported(model, layout)


def _mobilenet_v2_rules(model: MobileNetV2, layout: str) -> list[Rule]:
  specs = block_specs()
  has_expand = [t != 1 or model.expand_first_block for t, _, _ in specs]
  if layout == "pytorchcv":
    # pytorchcv starts a new stage at every stride-2 block.
    stage_unit, stage, unit = [], 0, 0
    for i, (_, _, s) in enumerate(specs):
      stage, unit = (stage + 1, 1) if i == 0 or s == 2 else (stage, unit + 1)
      stage_unit.append((stage, unit))
    conv_index = {"expand": 1, "dw": 2, "project": 3}

    def block(m):
      s, u = stage_unit[int(m[1])]
      return f"features.stage{s}.unit{u}.conv{conv_index[m[2]]}.{m[3]}"

    return [
      (r"stem_(conv|bn)", lambda m: f"features.init_block.{m[1]}"),
      (r"block(\d+)/(expand|dw|project)_(conv|bn)", block),
      (r"head_(conv|bn)", lambda m: f"features.final_block.{m[1]}"),
      (r"classifier", lambda m: "output"),
    ]
  if layout == "torchvision":

    def block(m):
      i, part, kind = int(m[1]), m[2], m[3]
      parts = ["expand", "dw"] if has_expand[i] else ["dw"]
      if part in parts:  # Conv2dNormActivation: (conv, bn, relu6)
        idx = f"{parts.index(part)}.{'0' if kind == 'conv' else '1'}"
      else:  # projection conv then BN, directly in the Sequential
        idx = str(len(parts) + (0 if kind == "conv" else 1))
      return f"features.{i + 1}.conv.{idx}"

    last = len(specs) + 1
    return [
      (r"stem_(conv|bn)", lambda m: f"features.0.{'0' if m[1] == 'conv' else '1'}"),
      (r"block(\d+)/(expand|dw|project)_(conv|bn)", block),
      (r"head_(conv|bn)", lambda m: f"features.{last}.{'0' if m[1] == 'conv' else '1'}"),
      (r"classifier", lambda m: "classifier.1"),
    ]
  raise _unsupported(model, layout)


def _describe(model) -> str:
  fields = [
    f"{f.name}={getattr(model, f.name)!r}"
    for f in dataclasses.fields(model)
    if f.name not in ("parent", "name", "quant")
  ]
  return f"{type(model).__name__}({', '.join(fields)})"


def _unsupported(model, layout) -> ValueError:
  return ValueError(f"layout {layout!r} has no mapping for {_describe(model)}.")


def _rules(model, layout: str) -> list[Rule]:
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is unknown: choose one of {LAYOUTS}.")
  if isinstance(model, ResNetCifar):
    return _resnet_cifar_rules(model, layout)
  if isinstance(model, ResNet):
    return _resnet_rules(model, layout)
  if isinstance(model, MobileNetV2):
    return _mobilenet_v2_rules(model, layout)
  raise ValueError(f"no PyTorch layout is known for {type(model).__name__}.")


def _torch_prefix(rules: list[Rule], module_path: str) -> str:
  for pattern, fn in rules:
    m = re.fullmatch(pattern, module_path)
    if m:
      return fn(m)
  raise ValueError(f"no rule maps our layer {module_path!r} to a PyTorch name.")


# --------------------------------------------------------------------------- conversion


def _to_torch_name_and_transform(collection, leaf, ndim):
  """Our (collection, leaf name) -> (torch suffix, numpy transform of the torch array)."""
  if collection == "batch_stats":
    return {"mean": "running_mean", "var": "running_var"}[leaf], None
  if leaf == "scale":
    return "weight", None
  if leaf == "bias":
    return "bias", None
  if leaf == "kernel" and ndim == 4:  # conv OIHW -> HWIO
    return "weight", lambda w: w.transpose(2, 3, 1, 0) if w.ndim == 4 else None
  if leaf == "kernel" and ndim == 2:  # linear [out, in] (or 1x1 conv) -> [in, out]

    def dense(w):
      if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
      return w.T if w.ndim == 2 else None

    return "weight", dense
  raise ValueError(f"unexpected variable {collection}/{leaf} with {ndim} dims.")


def _default_input_shape(model) -> tuple[int, ...]:
  return (1, 32, 32, 3) if isinstance(model, ResNetCifar) else (1, 224, 224, 3)


def abstract_variables(model, input_shape=None) -> dict[str, Any]:
  """ShapeDtypeStructs of the model's {'params', 'batch_stats'} (no computation)."""
  input_shape = tuple(input_shape or _default_input_shape(model))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  return {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}


def convert_state_dict(
  state_dict: Mapping[str, Any], model, layout: str, input_shape=None
) -> dict[str, Any]:
  """Maps a PyTorch state_dict onto the variables of `model` (strict).

  Args:
    state_dict: {torch name: array-like}, 'module.' prefixes allowed.
    model: the linen module (teacher; a student's quant_stats are not produced).
    layout: one of LAYOUTS.
    input_shape: [B, H, W, C] used to trace `model.init` (no computation happens);
      default (1, 32, 32, 3) for CIFAR ResNets, (1, 224, 224, 3) otherwise.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 jax arrays.

  Raises:
    ValueError: a target leaf has no source tensor, a source tensor is left over, or a
      shape differs; the message names the first offending key, both shapes, the layout
      and the model.
  """
  rules = _rules(model, layout)
  source = {}
  for name, value in state_dict.items():
    name = name[len("module.") :] if name.startswith("module.") else name
    if not name.endswith(_IGNORED_SUFFIXES):
      source[name] = np.asarray(value)
  target = flax.traverse_util.flatten_dict(abstract_variables(model, input_shape))
  context = f"(layout {layout!r} into {_describe(model)})"

  out, used, problems = {}, set(), []
  for path, spec in target.items():
    collection, *module, leaf = path
    suffix, transform = _to_torch_name_and_transform(collection, leaf, len(spec.shape))
    key = f"{_torch_prefix(rules, '/'.join(module))}.{suffix}"
    ours = "/".join(path)
    if key not in source:
      problems.append(
        f"missing key: torch key {key!r} (for our {ours}, shape "
        f"{tuple(spec.shape)}) is not in the state_dict"
      )
      continue
    value = source[key]
    used.add(key)
    converted = transform(value) if transform else value
    if converted is None or converted.shape != tuple(spec.shape):
      torch_order = f" (in torch order {_torch_order(spec.shape, value.ndim)})" if transform else ""
      problems.append(
        f"shape mismatch: torch key {key!r} has shape {tuple(value.shape)} "
        f"but our {ours} needs {tuple(spec.shape)}{torch_order}"
      )
      continue
    out[path] = jnp.asarray(converted, dtype=spec.dtype)
  extra = [k for k in source if k not in used]
  problems += [
    f"extra key: torch key {k!r} (shape {tuple(source[k].shape)}) is not used by the model"
    for k in extra
  ]
  if problems:
    raise ValueError(
      _architecture_hint(source, model)
      + f"{problems[0]} {context}. {len(problems)} problem(s) in all "
      f"({len(target) - len(out)} of {len(target)} target leaves unfilled, "
      f"{len(extra)} of {len(source)} source tensors unused); wrong layout or "
      "architecture?" + "".join(f"\n  {p}" for p in problems[1:6])
    )
  return flax.traverse_util.unflatten_dict(out)


_CIFAR_STAGE1_BLOCK = re.compile(r"^(?:layer1\.(\d+)\.|features\.stage1\.unit(\d+)\.)")


def _architecture_hint(source: Mapping[str, Any], model) -> str:
  """'This checkpoint looks like a ResNet-56: ...' when a CIFAR ResNet's depth differs."""
  if not isinstance(model, ResNetCifar):
    return ""
  blocks = []
  for name in source:
    m = _CIFAR_STAGE1_BLOCK.match(name)
    if m:  # akamaster counts blocks from 0 (layer1.0), pytorchcv from 1 (unit1)
      blocks.append(int(m.group(1)) + 1 if m.group(1) is not None else int(m.group(2)))
  if not blocks:
    return ""
  depth = 6 * max(blocks) + 2
  if depth == model.depth:
    return ""
  return (
    f"this checkpoint looks like a ResNet-{depth} ({max(blocks)} blocks per stage), "
    f"not a ResNet-{model.depth}: use --config.teacher.model=resnet{depth}_cifar. "
  )


def _torch_order(shape, torch_ndim):
  if len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if len(shape) == 2:
    i, o = shape
    return (o, i, 1, 1) if torch_ndim == 4 else (o, i)
  return tuple(shape)


# --------------------------------------------------------------------------- orbax


def save_variables(
  variables: Mapping[str, Any], directory: str | os.PathLike, *, overwrite: bool = False
) -> str:
  """Saves converted variables as an orbax checkpoint; returns the absolute path."""
  import orbax.checkpoint as ocp  # imported on use

  directory = os.path.abspath(os.fspath(directory))
  # Host numpy copies: orbax refuses process-local jax.Arrays in a multi-process run (and
  # saves numpy leaves once, from the primary process). Every process must call this.
  variables = jax.tree.map(np.asarray, dict(variables))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, variables, force=overwrite)
    ckptr.wait_until_finished()
  return directory


def load_variables(directory: str | os.PathLike, abstract=None) -> dict[str, Any]:
  """Restores variables saved by `save_variables`.

  Args:
    directory: the checkpoint directory.
    abstract: optional tree of ShapeDtypeStructs/arrays (e.g. `abstract_variables(model)`)
      that the restored tree must match.
  """
  import orbax.checkpoint as ocp  # imported on use

  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no orbax checkpoint directory at {directory!r}.")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract is None:
      metadata = ckptr.metadata(directory)
      abstract = getattr(metadata, "item_metadata", metadata)
    # As host numpy arrays, whatever topology wrote the checkpoint: a teacher converted
    # by one process is read by every process of a multi-host run, then placed by the
    # caller (a process-local device array could not be placed across hosts).
    target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    return ckptr.restore(directory, target)


def load_teacher_variables(
  path: str | os.PathLike, model, layout: str | None = None, input_shape=None
) -> dict[str, Any]:
  """Teacher variables from an orbax directory or a PyTorch file converted on the fly.

  Args:
    path: a directory written by `save_variables`, or a PyTorch checkpoint
      (.th/.pth/.pt/.tar/.pkl).
    model: the teacher module (its structure is checked against the checkpoint).
    layout: the PyTorch layout (needed for PyTorch files only).
    input_shape: see `convert_state_dict`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"teacher weights {path!r} do not exist: give an orbax directory written by "
      "`python -m dfq_jax.models.convert` or a PyTorch checkpoint file "
      f"(see dfq_jax.models.convert.WEIGHTS for public URLs: {sorted(WEIGHTS)})."
    )
  if os.path.isdir(path):
    return load_variables(path, abstract_variables(model, input_shape))
  if layout is None:
    raise ValueError(
      f"converting the PyTorch checkpoint {path!r} needs its layout, one of {LAYOUTS}."
    )
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{path!r} is neither a directory nor a PyTorch checkpoint {TORCH_SUFFIXES}.")
  return convert_state_dict(load_torch_state_dict(path), model, layout, input_shape)


# --------------------------------------------------------------------------- download


def _digest(path, kind):
  h = hashlib.new(kind)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def download_weights(name: str, dest: str | os.PathLike, *, timeout: float = 60.0) -> str:
  """Downloads the public checkpoint `name` (see WEIGHTS) into directory `dest`.

  Returns the path of the checkpoint file (pytorchcv zips are unpacked); an existing
  file with the right digest is reused. Raises RuntimeError when offline.
  """
  if name not in WEIGHTS:
    raise ValueError(f"unknown weights {name!r}: choose one of {sorted(WEIGHTS)}.")
  w = WEIGHTS[name]
  dest = os.fspath(dest)
  os.makedirs(dest, exist_ok=True)
  path = os.path.join(dest, w.filename)
  if not (os.path.isfile(path) and _digest(path, w.sha_kind).startswith(w.sha)):
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
      tmp_file = os.path.join(tmp, os.path.basename(w.url))
      try:
        with urllib.request.urlopen(w.url, timeout=timeout) as r, open(tmp_file, "wb") as f:
          shutil.copyfileobj(r, f)
      except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
          f"could not download {w.url} ({e}). Without network, fetch it elsewhere and "
          f"place {w.filename} in {dest}."
        ) from e
      if w.url.endswith(".zip"):
        with zipfile.ZipFile(tmp_file) as z:
          z.extract(w.filename, tmp)
        tmp_file = os.path.join(tmp, w.filename)
      os.replace(tmp_file, path)
  if not _digest(path, w.sha_kind).startswith(w.sha):
    raise RuntimeError(f"{path} does not have the expected {w.sha_kind} {w.sha}.")
  return path


# --------------------------------------------------------------------------- CLI


def _parse_model_arg(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # a bare string such as shortcut=B


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description="Convert a PyTorch checkpoint into an orbax checkpoint of Flax variables."
  )
  parser.add_argument("--src", help="PyTorch checkpoint file")
  parser.add_argument(
    "--download",
    metavar="NAME",
    choices=sorted(WEIGHTS),
    help="download these public weights (into --download-dir) and use "
    "them as --src; sets --layout/--model/--num-classes/--model-arg",
  )
  parser.add_argument("--download-dir", default=os.path.expanduser("~/.cache/dfq_jax"))
  parser.add_argument("--layout", choices=LAYOUTS)
  parser.add_argument("--model", help="name in dfq_jax.models.MODELS")
  parser.add_argument("--num-classes", type=int)
  parser.add_argument(
    "--model-arg",
    type=_parse_model_arg,
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="extra get_model argument, e.g. shortcut=B (pytorchcv CIFAR)",
  )
  parser.add_argument(
    "--input-size", type=int, default=None, help="input height/width used to trace the model"
  )
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  args = parser.parse_args(argv)
  model_kwargs = dict(args.model_arg)
  if args.download:
    w = WEIGHTS[args.download]
    args.src = download_weights(args.download, args.download_dir)
    args.layout = args.layout or w.layout
    args.model = args.model or w.model
    args.num_classes = args.num_classes or w.num_classes
    model_kwargs = {**dict(w.model_kwargs), **model_kwargs}
  if not (args.src and args.layout and args.model and args.num_classes):
    parser.error("--src, --layout, --model and --num-classes are required (or --download NAME).")
  model = get_model(args.model, num_classes=args.num_classes, **model_kwargs)
  shape = (1, args.input_size, args.input_size, 3) if args.input_size else None
  variables = convert_state_dict(load_torch_state_dict(args.src), model, args.layout, shape)
  out = save_variables(variables, args.out)
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  print(
    f"converted {args.src} ({args.layout}) into {_describe(model)}: {n} parameters, saved to {out}"
  )


if __name__ == "__main__":
  main()
