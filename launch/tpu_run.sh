#!/usr/bin/env bash
# Runs one dfq_jax job on every worker of a Cloud TPU VM pod slice (multi-host, data
# parallel over all chips). WORKDIR must be shared by all hosts (a gs:// bucket).
#
#   launch/tpu_run.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_run.sh my-v4-32 us-central2-b configs/imagenet_resnet18.py:adadfq,w4a4 \
#       gs://bucket/r18_adadfq --config.teacher.weights=gs://bucket/r18_teacher \
#       --config.data.data_dir=gs://bucket/tensorflow_datasets
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2
fi
name="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
[[ "$workdir" == gs://* ]] || echo "warning: WORKDIR '$workdir' is not a gs:// path; every host must see the same directory" >&2
command -v gcloud >/dev/null || { echo "error: gcloud is not installed" >&2; exit 2; }
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  "set -o pipefail; . ~/dfq_venv/bin/activate && cd ~/dfq_jax && DFQ_DISTRIBUTED=1 python -m dfq_jax.main --config '$config' --workdir '$workdir'$extra 2>&1 | tee ~/dfq_\$(hostname).log"
