r"""python -m dfq_jax.export --workdir DIR --out model.onnx [--which final|best] [--overwrite]
    [--evaluate]

Exports the student of the finished run in DIR (a training run: its last checkpoint, or
--which best; an eval or PTQ run: its calibrated student) as QDQ ONNX with BatchNorm folded
(dfq_jax/export/onnx_models.py). The model's metadata_props carry the input mean/std,
the class count, the bits, the method and the dfq_jax version. Nothing in DIR is changed;
an existing --out is refused unless --overwrite. With --evaluate, the exported model runs
in ONNX Runtime on the run's real evaluation set beside dfq_jax's own evaluation of the same
student, and one JSON line reports both top-1, their prediction agreement and the kernels
ONNX Runtime's optimised graph runs. A student of the deployment quantizer (quant.deploy)
exports as the integer graph (export/integer_graph.py), which ONNX Runtime runs on integer
kernels; --evaluate then also compares them with the integer reference on 500 images.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from dfq_jax.export.exporter import compare_on_eval_set, export

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_OUT = flags.DEFINE_string("out", None, "The .onnx file to write.")
_WHICH = flags.DEFINE_enum("which", "final", ["final", "best"], "Training runs: which student.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
_TEACHER = flags.DEFINE_bool(
  "teacher", False, "Export the run's float teacher instead (the baseline for size and latency)."
)
_EVALUATE = flags.DEFINE_bool(
  "evaluate", False, "Compare ONNX Runtime with dfq_jax on the run's evaluation set."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax's bookkeeping records off
  try:
    config, student, variables, data = export(
      _WORKDIR.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _TEACHER.value
    )
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  what = student.quant.describe() if student.quant else "float teacher"
  print(f"Wrote {_OUT.value} ({len(data) / 1024:.0f} KiB, {what}).")
  if _EVALUATE.value:
    print(json.dumps(compare_on_eval_set(config, student, variables, data)))


if __name__ == "__main__":
  app.run(main)
