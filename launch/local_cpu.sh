#!/usr/bin/env bash
# Runs dfq_jax data parallel over N simulated CPU devices on one machine (default 8):
# the same sharded code path as a multi-GPU node or a TPU slice, for a laptop or CI.
#
#   launch/local_cpu.sh [--devices N] [-- extra dfq_jax.main flags]
#   launch/local_cpu.sh                       # the demo on 8 devices, workdir runs/local_cpu
#   launch/local_cpu.sh --devices 4 -- --config configs/demo.py:adadfq --workdir runs/x
set -euo pipefail
devices=8
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) [[ $# -ge 2 ]] || { echo "error: --devices needs a number" >&2; exit 2; }
               devices="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (extra flags go after --)" >&2; exit 2 ;;
  esac
done
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "error: --devices must be a positive integer, got '$devices'" >&2; exit 2; }
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--config configs/demo.py --workdir runs/local_cpu)
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
exec python -m dfq_jax.main "${args[@]}"
