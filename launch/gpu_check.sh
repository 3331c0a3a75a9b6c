#!/usr/bin/env bash
# The GPU check, one prepared script (about 8 minutes on one GPU):
#   1. installs the CUDA build of the pinned jax (skipped with --no-install, or without a GPU)
#   2. prints the devices JAX sees
#   3. runs the device tests: a training step on the GPU equals the CPU's (gdfq, dsg,
#      adadfq), and the compute_dtype tests
#   4. `bench speed` of the AdaDFQ W4A4 step: CIFAR ResNet-20 at batch 16/200/1024 and
#      ImageNet ResNet-18 at batch 64/256, compute_dtype float32 and bfloat16
#   5. `bench convs`: the conv kernel table (XLA float32 / bfloat16, im2col + bf16 dot)
#   6. writes everything to one JSON file (--out, default gpu_check.json)
# Without a GPU (e.g. here, on CPU) the same script runs with the GPU parts skipped: the
# device tests skip themselves and step 4 times only the CIFAR step at batch 16 on the CPU.
#
#   launch/gpu_check.sh [--out FILE] [--no-install] [--wheels DIR] [--cuda 12|13]
#   --wheels DIR  install jax's CUDA wheels from DIR (pip --no-index), for a machine without
#                 network: `pip download "jax[cuda12]==<pinned>" -d DIR` on one that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu_check.json install=1 wheels="" cuda=12
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { echo "error: --out needs a file name" >&2; exit 2; }
           out="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --wheels) [[ $# -ge 2 && -d "$2" ]] || { echo "error: --wheels needs a directory" >&2; exit 2; }
              wheels="$2"; shift 2 ;;
    --cuda) [[ "${2:-}" =~ ^(12|13)$ ]] || { echo "error: --cuda takes 12 or 13" >&2; exit 2; }
            cuda="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

has_gpu=0
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then has_gpu=1; fi
if [[ $has_gpu == 1 && $install == 1 ]]; then
  version=$(grep -E '^jax==' .ci/constraints.txt | cut -d= -f3)
  echo "== installing jax[cuda${cuda}]==${version}"
  if [[ -n "$wheels" ]]; then
    $PY -m pip install -q --no-index --find-links "$wheels" "jax[cuda${cuda}]==${version}"
  else
    $PY -m pip install -q "jax[cuda${cuda}]==${version}"
  fi
fi

echo "== devices"
$PY -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" | tee "$work/devices.txt"
backend=$($PY -c "import jax; print(jax.default_backend())")

echo "== device tests"
set +e
$PY -m pytest -q -p no:cacheprovider tests/test_device_equality.py tests/test_compute_dtype.py \
  2>&1 | tee "$work/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== bench speed"
: > "$work/speed.jsonl"
bench() {  # bench CONFIG BATCH STEPS DTYPE
  echo "-- $1 batch $2 $4"
  if $PY -m dfq_jax.bench speed --config "$1" --batch "$2" --steps "$3" --warmup 2 \
      --config.compute_dtype="$4" > "$work/row.json" 2> "$work/row.err"; then
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); r['compute_dtype']=sys.argv[2]; print(json.dumps(r))" \
      "$work/row.json" "$4" | tee -a "$work/speed.jsonl"
  else
    tail -5 "$work/row.err"
    printf '{"config": "%s", "batch": %s, "compute_dtype": "%s", "error": "failed"}\n' \
      "$1" "$2" "$4" >> "$work/speed.jsonl"
  fi
}
if [[ "$backend" == "gpu" ]]; then
  for dtype in float32 bfloat16; do
    for b in 16 200 1024; do bench configs/cifar10_resnet20.py:adadfq,w4a4 "$b" 20 "$dtype"; done
    for b in 64 256; do bench configs/imagenet_resnet18.py:adadfq,w4a4 "$b" 10 "$dtype"; done
  done
  echo "== bench convs (XLA float32 / bfloat16 convs vs im2col + bf16 dot, fwd+bwd)"
  $PY -m dfq_jax.bench convs --steps 20 | tee "$work/convs.jsonl" || true
else
  echo "(no GPU: the CIFAR step at batch 16 on the CPU only)"
  bench configs/cifar10_resnet20.py:adadfq,w4a4 16 5 float32
fi

$PY - "$work" "$out" "$tests_rc" "$has_gpu" <<'PYEOF'
import json, sys
work, out, tests_rc, has_gpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
tests = open(f"{work}/tests.txt").read().strip().splitlines()
result = {
    "gpu": has_gpu,
    "devices": open(f"{work}/devices.txt").read().strip(),
    "tests_passed": tests_rc == 0,
    "tests_summary": tests[-1] if tests else "",
    "speed": [json.loads(line) for line in open(f"{work}/speed.jsonl") if line.strip()],
    "convs": [],  # bench convs rows (GPU only)
}
try:
    result["convs"] = [json.loads(l) for l in open(f"{work}/convs.jsonl") if l.startswith("{")]
except FileNotFoundError:
    pass
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(f"== wrote {out}: tests {'passed' if tests_rc == 0 else 'FAILED'}, "
      f"{len(result['speed'])} speed rows")
PYEOF
exit "$tests_rc"
