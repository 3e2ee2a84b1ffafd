#!/usr/bin/env bash
# One host with several GPUs (or TPU chips): one process drives all local devices.
#
#   launch/single_host.sh [ENTRY] [ARGS...]
#   launch/single_host.sh lgrpo_jax.check --mesh.fsdp=8
#   launch/single_host.sh lgrpo_jax.launch --config configs/qwen2_5_vl_3b_hpdv2.py mesh.fsdp=8
#
# ENTRY is a `python -m` module: lgrpo_jax.check (default), lgrpo_jax.launch, lgrpo_jax.evaluate.
# Mesh sizes go on the command line: lgrpo_jax.check takes --mesh.data/--mesh.fsdp/--mesh.tensor,
# lgrpo_jax.launch the overrides mesh.data=/mesh.fsdp=/mesh.tensor= (-1 = the rest).
# Sets nothing: JAX sees every local device. PYTHON overrides the interpreter (default .venv).
set -euo pipefail
# Relative paths (--config, run_dir=) are taken from where you run it, as with python itself.
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ENTRY=${1:-lgrpo_jax.check}
shift || true
exec "$PYTHON" -m "$ENTRY" "$@"
