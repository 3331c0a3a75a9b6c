#!/usr/bin/env bash
# Copies this checkout to every worker of a Cloud TPU VM (pod slice) and installs dfq_jax
# with JAX for TPU into ~/dfq_venv on each.
#
#   launch/tpu_setup.sh TPU_NAME ZONE [PROJECT]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT]   (e.g. $0 my-v4-32 us-central2-b)" >&2; exit 2
fi
name="$1"; zone="$2"; project=()
[[ -n "${3:-}" ]] && project=("--project=$3")  # no empty argument when there is none
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":dfq_jax --zone="$zone" --worker=all ${project[@]+"${project[@]}"}
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all ${project[@]+"${project[@]}"} --command \
  "python3 -m venv ~/dfq_venv && . ~/dfq_venv/bin/activate && pip install -U pip && pip install 'jax[tpu]' -e ~/dfq_jax"
