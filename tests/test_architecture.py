"""The package's shape: imports run one way, none hidden in functions, functions stay short.

Layers (a module imports only modules of its own layer or a lower one):
  0 base        shared types, mesh helpers, config, schedule, I/O, data, numerics, losses
  1 layers      quantized and BN layers, the quantization policy, generator conv kernels
  2 components  models, generators, methods, calibration, PTQ synthesis, evaluation
  3 step        the jitted training iteration
  4 loops       the training loop, the PTQ pipeline
  5 run         one run end to end; the export of a finished run
  6 entry       the CLI, the benchmarks, the PTQ grid
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dfq_jax"
MAX_FUNCTION_LINES = 80

# Longest prefix wins.
LAYERS = {
  "dfq_jax": 0,
  "dfq_jax.interfaces": 0,
  "dfq_jax.parallel": 0,
  "dfq_jax.stats": 0,
  "dfq_jax.config_base": 0,
  "dfq_jax.schedule": 0,
  "dfq_jax.xla_options": 0,
  "dfq_jax.metrics": 0,
  "dfq_jax.curves": 0,
  "dfq_jax.checkpoint": 0,
  "dfq_jax.data": 0,
  "dfq_jax.losses": 0,
  "dfq_jax.quant.numerics": 0,
  "dfq_jax.quant": 1,
  "dfq_jax.models.layers": 1,
  "dfq_jax.generators.subpixel": 1,
  "dfq_jax.generators.narrow_conv": 1,
  "dfq_jax.models": 2,
  "dfq_jax.generators": 2,
  "dfq_jax.methods": 2,
  "dfq_jax.quant.calibration": 2,
  "dfq_jax.quant.mixed": 2,
  "dfq_jax.ptq": 2,
  "dfq_jax.evaluate": 2,
  "dfq_jax.networks": 2,
  "dfq_jax.step": 3,
  "dfq_jax.trainer": 4,
  "dfq_jax.ptq.pipeline": 4,
  "dfq_jax.run": 5,
  "dfq_jax.export": 5,
  "dfq_jax.export.qdq": 0,
  "dfq_jax.export.runtime": 0,
  "dfq_jax.export.onnx_graph": 1,
  "dfq_jax.export.integer_graph": 1,
  "dfq_jax.export.integer_reference": 0,
  "dfq_jax.export.onnx_models": 2,
  "dfq_jax.export.__main__": 6,
  "dfq_jax.export.latency": 6,
  "dfq_jax.main": 6,
  "dfq_jax.bench": 6,
  "dfq_jax.ptq_grid": 6,
  "dfq_jax.mixed_grid": 6,
  "dfq_jax.conv_bench": 6,
  "dfq_jax.generators.bench_subpixel": 6,
  "dfq_jax.reference": 6,
}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


_KNOWN = {
  ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
  for p in PACKAGE.rglob("*.py")
}


def _layer(module: str) -> int:
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    if prefix in LAYERS:
      return LAYERS[prefix]
  raise AssertionError(f"{module} has no layer: add it to LAYERS")


def _imported(node, module: str, is_package: bool) -> list[str]:
  """dfq_jax modules named by an import statement (`from pkg import mod` counts mod)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith("dfq_jax")]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - node.level + 1]
    base = ".".join(anchor + ([base] if base else []))
  if not base.startswith("dfq_jax"):
    return []
  names = [f"{base}.{a.name}" for a in node.names]
  return [n if n in _KNOWN else base for n in names]


def _module_level_imports():
  edges = {}
  for module, path, tree in _modules():
    is_package = path.name == "__init__.py"
    targets = set()
    for node in tree.body:
      targets.update(_imported(node, module, is_package))
    edges[module] = targets - {module}
  return edges


def test_every_import_points_down_the_layers():
  wrong = [
    f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
    for m, targets in _module_level_imports().items()
    for t in sorted(targets)
    if _layer(t) > _layer(m)
  ]
  assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
  edges = _module_level_imports()
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(edges.get(m, ())):
      if state.get(t) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
      if t not in state:
        visit(t, stack + [m])
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m, [])


def test_no_function_local_import_of_the_package():
  found = []
  for module, path, tree in _modules():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if _imported(node, module, path.name == "__init__.py"):
            found.append(f"{module}:{node.lineno} in {fn.name}()")
  assert not found, "\n".join(found)


def test_functions_are_short():
  long = []
  for module, _, tree in _modules():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = fn.end_lineno - fn.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{module}.{fn.name}: {lines} lines")
  assert not long, "\n".join(long)
