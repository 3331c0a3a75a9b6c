"""Export of a finished run's student (or teacher) to ONNX, and its check on the eval set.

  export(workdir, out, which, overwrite, teacher) -> (config, module, variables, bytes)
  compare_on_eval_set(config, module, variables, bytes) -> report dict

The library half of `python -m dfq_jax.export` (__main__.py, the flags and messages).
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np

from dfq_jax import evaluate as evaluate_lib
from dfq_jax import xla_options
from dfq_jax.data import eval_set as eval_set_lib
from dfq_jax.data.preprocess import normalize
from dfq_jax.export import integer_reference, runtime
from dfq_jax.export.onnx_models import SUPPORTED, export_model, integer_program
from dfq_jax.export.workdir import load_student, read_config
from dfq_jax.models import teacher as teacher_lib


class ExportError(ValueError):
  """Bad input to the export (one `error:` line on the command line)."""


def export(
  workdir: str, out: str, which: str = "final", overwrite: bool = False, teacher: bool = False
):
  """Writes the ONNX file; returns (config, student module, variables, model bytes).

  With `teacher`, the run's float teacher (read from config.teacher.weights) instead.
  """
  if os.path.exists(out) and not overwrite:
    raise ExportError(f"{out!r} exists: pass --overwrite to replace it, or another --out.")
  if teacher:  # the student is not read: the teacher needs only the run's config
    config = read_config(workdir)
    student, variables = teacher_lib.teacher_model(config), teacher_lib.load_teacher(config)
  else:
    config, student, variables = load_student(workdir, which)
  if not isinstance(student, SUPPORTED):
    raise ExportError(
      f"export supports the CIFAR and ImageNet ResNets and MobileNetV2; "
      f"{config.teacher.model!r} is not one of them."
    )
  norm = eval_set_lib.normalization(config)
  metadata = {
    "mean": json.dumps(list(norm.mean)),
    "std": json.dumps(list(norm.std)),
    "input": "float32 NCHW, (rgb / 255 - mean) / std",
    "num_classes": config.num_classes,
    "bits": student.quant.describe() if student.quant else "float32 (teacher)",
    "method": config.method,
    "which": "teacher" if teacher else which,
    "graph": "integer (uint8 activations, int8 weights: QLinearConv in ONNX Runtime)"
    if student.quant is not None and student.quant.deploy
    else "QDQ (fake-quantized, float kernels)",
    "dfq_jax_version": importlib.metadata.version("dfq_jax"),
  }
  model = export_model(student, variables, metadata)
  data = model.SerializeToString()
  tmp = f"{out}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, out)
  return config, student, variables, data


def compare_on_eval_set(config, student, variables, data: bytes) -> dict:
  """ONNX Runtime vs dfq_jax top-1 of the same student on the run's eval set."""
  norm = eval_set_lib.normalization(config)
  ds = eval_set_lib.load_eval_set(config)
  ours = evaluate_lib.evaluate(
    [(student.apply, variables)],
    ds.images,
    ds.labels,
    norm.mean,
    norm.std,
    config.data.eval_batch_size,
    num_classes=config.num_classes,
    names=["dfq_jax"],
    compiler_options=xla_options.compiler_options(config.cpu_conv_kernels),
  )
  ort_logits = runtime.logits(
    runtime.session(data), ds.images, norm.mean, norm.std, config.data.eval_batch_size
  )
  ort_pred = ort_logits.argmax(axis=1)
  plain = runtime.logits(
    runtime.session(data, optimize=False),
    ds.images,
    norm.mean,
    norm.std,
    config.data.eval_batch_size,
  ).argmax(axis=1)
  report = {
    "eval_images": len(ds),
    "dfq_jax_top1": 100 * float(ours.top1[0]),
    "onnxruntime_top1": 100 * float(np.mean(ort_pred == ds.labels)),
    "prediction_agreement": 100 * float(np.mean(ort_pred == ours.predictions[0])),
    "onnxruntime_unoptimized_top1": 100 * float(np.mean(plain == ds.labels)),
    "unoptimized_prediction_agreement": 100 * float(np.mean(plain == ours.predictions[0])),
    "onnxruntime_version": runtime.ort.__version__,
    "onnxruntime_kernels": runtime.kernel_counts(data),
    "file_bytes": len(data),
    "latency_batch100_s": runtime.latency(
      runtime.session(data), (100, config.channels, config.image_size, config.image_size)
    ),
  }
  if student.quant is not None and student.quant.deploy:
    report.update(_against_integer_reference(student, variables, ds.images, norm, ort_logits))
  return report


REFERENCE_IMAGES = 500  # the numpy integer reference is slow: the first images only


def _against_integer_reference(student, variables, images, norm, ort_logits) -> dict:
  """ORT's integer kernels vs integer_reference.run on the first REFERENCE_IMAGES images."""
  _, ops = integer_program(student, variables, {})
  n = min(REFERENCE_IMAGES, len(images))
  ref = np.concatenate(
    [
      integer_reference.run(
        ops, normalize(images[i : i + 100], norm.mean, norm.std).transpose(0, 3, 1, 2)
      )
      for i in range(0, n, 100)
    ]
  )
  diff = np.abs(ref - ort_logits[:n])
  return {
    "integer_reference_images": n,
    "integer_reference_prediction_agreement": 100
    * float(np.mean(ref.argmax(1) == ort_logits[:n].argmax(1))),
    "integer_reference_images_equal": 100 * float(np.mean(diff.max(1) <= 1e-6 * np.abs(ref).max())),
  }
