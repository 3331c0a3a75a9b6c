#!/usr/bin/env bash
# Runs dfq_jax as N processes on this machine (default 2), each with D simulated CPU
# devices (default 2), joined by jax.distributed (a local coordinator, gloo collectives):
# the multi-host code path of a TPU pod or a SLURM job, for a laptop or CI.
#
#   launch/local_multihost.sh [--processes N] [--devices D] [-- extra dfq_jax.main flags]
#   launch/local_multihost.sh                 # the demo as 2 x 2, workdir runs/local_multihost
#   launch/local_multihost.sh --processes 2 -- --config configs/demo.py:adadfq --workdir runs/x
# Process 0 prints and writes metrics/results; process i logs to <workdir>.process<i>.log.
# If one process fails or is killed, the others are stopped at once and one error line
# says where a rerun of the same command resumes.
set -euo pipefail
processes=2
devices=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) [[ $# -ge 2 ]] || { echo "error: --processes needs a number" >&2; exit 2; }
                 processes="$2"; shift 2 ;;
    --devices) [[ $# -ge 2 ]] || { echo "error: --devices needs a number" >&2; exit 2; }
               devices="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (extra flags go after --)" >&2; exit 2 ;;
  esac
done
for n in "$processes" "$devices"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: --processes/--devices must be positive integers, got '$n'" >&2; exit 2; }
done
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--config configs/demo.py --workdir runs/local_multihost)
workdir=runs/local_multihost
for a in "${args[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[$i]}" == --workdir ]] && workdir="${args[$((i + 1))]:-$workdir}"
done
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
mkdir -p "$(dirname "$workdir")"
# Every process in the background; the first one to fail stops the others (none waits out
# a heartbeat timeout on a dead peer) and the run resumes when the same command is rerun.
declare -A index_of=()
for ((i = 0; i < processes; i++)); do
  if ((i == 0)); then
    python -m dfq_jax.main "${args[@]}" --coordinator_address="127.0.0.1:${port}" \
        --num_processes="$processes" --process_id=0 &
  else
    python -m dfq_jax.main "${args[@]}" --coordinator_address="127.0.0.1:${port}" \
        --num_processes="$processes" --process_id="$i" > "${workdir}.process${i}.log" 2>&1 &
  fi
  index_of[$!]=$i
done
trap 'kill "${!index_of[@]}" 2> /dev/null; exit 130' INT TERM
status=0
for ((n = 0; n < processes; n++)); do
  finished=""
  wait -n -p finished "${!index_of[@]}" || status=$?
  i=${index_of[$finished]}
  unset "index_of[$finished]"
  if ((status != 0)); then
    kill -KILL "${!index_of[@]}" 2> /dev/null || true  # the last complete checkpoint is on disk
    wait 2> /dev/null || true
    steps=$(ls "${workdir}/checkpoints" 2> /dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
    echo "error: process ${i} exited with code ${status}; the other processes were stopped." \
      "Rerun the same command to resume from ${steps:+step ${steps}}${steps:-the start}" \
      "(logs: ${workdir}.process<i>.log)." >&2
    exit "$status"
  fi
done
exit 0
