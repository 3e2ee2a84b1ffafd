#!/usr/bin/env bash
# Cloud TPU pod slice: run the SAME command on every worker, e.g.
#
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command="cd lgrpo_jax && launch/tpu_pod.sh lgrpo_jax.check --mesh.fsdp=-1"
#
# LGRPO_DISTRIBUTED=auto (below) makes lgrpo_jax.distributed call jax.distributed.initialize(),
# which reads the coordinator, process count and id from the TPU metadata (TPU_WORKER_HOSTNAMES
# is detected too where an orchestrator such as GKE sets it). Each worker feeds its own slice of every batch. Nothing else
# to set; for multislice, MEGASCALE_* variables (set by the orchestrator) are detected the same way.
set -euo pipefail
# A TPU VM keeps its worker list in metadata, not in the environment: let JAX find the pod itself.
export LGRPO_DISTRIBUTED=auto
# Relative paths (--config, run_dir=) are taken from where you run it, as with python itself.
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ENTRY=${1:-lgrpo_jax.check}
shift || true
exec "$PYTHON" -m "$ENTRY" "$@"
