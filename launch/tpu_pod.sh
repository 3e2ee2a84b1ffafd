#!/usr/bin/env bash
# Cloud TPU pod slice: run the SAME command on every worker, e.g.
#
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command="cd lgrpo_jax && launch/tpu_pod.sh lgrpo_jax.check --mesh.fsdp=-1"
#
# On a pod slice TPU_WORKER_HOSTNAMES lists every worker (set by the TPU VM image), so
# lgrpo_jax.distributed calls jax.distributed.initialize(), which reads the coordinator, process
# count and id from the TPU metadata. Each worker feeds its own slice of every batch. Nothing else
# to set; for multislice, MEGASCALE_* variables (set by the orchestrator) are detected the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ENTRY=${1:-lgrpo_jax.check}
shift || true
exec "$PYTHON" -m "$ENTRY" "$@"
