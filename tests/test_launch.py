"""The launch scripts run as documented: single host directly; SLURM through a stand-in `srun` that
starts two local processes with the variables real srun sets, so JAX's own SLURM detection runs."""

import os
import random
import stat
import subprocess
import sys
from conftest import xla_flags


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_env(devices: int):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable,
         "XLA_FLAGS": xla_flags(devices)}
  for k in list(env):
    if k.startswith(("SLURM_", "LGRPO_", "TPU_WORKER", "MEGASCALE")):
      env.pop(k)
  return env


def test_single_host_script(tmp_path):
  # Run from elsewhere: a relative path is taken from there (the script used to cd into the checkout).
  r = subprocess.run([os.path.join(ROOT, "launch", "single_host.sh"), "lgrpo_jax.check", "--mesh.fsdp=8",
                      "--out", "logits.npy"], capture_output=True, text=True, env=base_env(8), timeout=300,
                     cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "process 0/1 (single): 8 local / 8 devices, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in r.stdout
  assert (tmp_path / "logits.npy").is_file()
  r = subprocess.run([os.path.join(ROOT, "launch", "single_host.sh"), "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "launch/single_host.sh [ENTRY] [ARGS...]" in r.stdout


def test_slurm_script_with_two_tasks(tmp_path):
  # Stand-in srun: starts SLURM_NTASKS copies of the command with the variables srun would set.
  srun = tmp_path / "srun"
  srun.write_text("""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$OUT_DIR/task$i.log" 2>&1 & done
wait
""")
  srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
  env = base_env(4)
  env.update(PATH=f"{tmp_path}:{env['PATH']}", OUT_DIR=str(tmp_path), SLURM_NTASKS="2",
             SLURM_JOB_ID=str(random.randint(1, 10**6)), SLURM_STEP_NODELIST="localhost",
             SLURM_STEP_NUM_NODES="1", SLURM_SUBMIT_DIR=ROOT)
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "lgrpo_jax.check",
                      "--mesh.fsdp=-1"], capture_output=True, text=True, env=env, timeout=300)
  logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
  assert r.returncode == 0, r.stderr[-2000:]
  for i, log in enumerate(logs):
    assert f"process {i}/2 (slurm): 4 local / 8 devices" in log, log[-2000:]
  assert "fed rows 0..3" in logs[0] and "fed rows 4..7" in logs[1]


def test_scripts_are_valid_bash():
  for name in ("single_host.sh", "slurm.sbatch", "tpu_pod.sh"):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", name)], check=True)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", name), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and f"launch/{name}" in r.stdout and "set -" not in r.stdout, (name, r.stdout)
