"""Two real processes on loopback (jax.distributed + gloo CPU collectives) compute the same sharded
forward as one process, each feeding its own slice of the batch; start-up detection."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from lgrpo_jax import distributed
from conftest import xla_flags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_check(n_proc: int, out, extra=()):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(8 // n_proc)}
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    env.pop(k, None)
  base = [sys.executable, "-m", "lgrpo_jax.check", "--mesh.fsdp", "4", "--mesh.tensor", "2",
          "--out", str(out), *extra]
  return spawn(base, n_proc, env, timeout=300)


def spawn(base, n_proc: int, env, timeout: int, codes=(0,), stderr=False):
  """Run `base` as one process, or as n_proc processes joined on loopback; their stdouts (with
  `stderr`, (stdout, stderr) pairs). An exit code outside `codes` fails the test.

  Every process's pipes are drained at once (threads), so a chatty process never blocks on a full
  pipe while another is read; a failure shows the stderr of *every* process (the one that failed
  first is often not process 0) with Python stacks from faulthandler on a fatal signal."""
  import concurrent.futures
  env = {**env, "PYTHONFAULTHANDLER": "1"}
  if n_proc > 1:
    port = free_port()
    base = base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_proc)]
    cmds = [base + ["--process-id", str(i)] for i in range(n_proc)]
  else:
    cmds = [base]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for c in cmds]

  def wait(p):
    try:
      return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      out, err = p.communicate()
      return out, err + f"\n[test: killed after {timeout} s]"

  with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
    results = list(pool.map(wait, procs))
  if any(p.returncode not in codes for p in procs):
    def excerpt(err):  # the first Python traceback (often the cause), then the end
      i = err.find("Traceback (most recent call last)")
      return (err[i:i + 2000] + "\n[…]\n" if i >= 0 else "") + err[-2500:]
    report = "\n".join(f"--- process {i}: exit {p.returncode}; stderr ---\n{excerpt(err)}"
                        for i, (p, (_, err)) in enumerate(zip(procs, results)))
    pytest.fail(report, pytrace=False)
  return results if stderr else [out for out, _ in results]


@pytest.mark.parametrize("source", ["random", "checkpoint"])
def test_two_processes_equal_one(tmp_path, source):
  extra = ()
  if source == "checkpoint":
    import lgrpo_jax
    from lgrpo_jax.models.qwen2_5_vl.presets import TINY
    lgrpo_jax.save_hf(lgrpo_jax.from_config(TINY, seed=4), tmp_path / "hf")
    extra = ("--checkpoint", str(tmp_path / "hf"))
  one = run_check(1, tmp_path / "one.npy", extra)
  two = run_check(2, tmp_path / "two.npy", extra)
  assert "fed rows 0..7" in one[0]
  assert "process 0/2 (explicit): 4 local / 8 devices" in two[0] and "fed rows 0..3" in two[0]
  assert "process 1/2 (explicit): 4 local / 8 devices" in two[1] and "fed rows 4..7" in two[1]
  assert "P(None, 'fsdp', 'tensor')" in two[0]
  a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
  assert a.shape == (8, 512)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def run_barrier_worker(*args) -> list[str]:
  """tests/barrier_worker.py as two processes on loopback; each one's result line."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  worker = os.path.join(os.path.dirname(__file__), "barrier_worker.py")
  outs = spawn([sys.executable, worker, *args], 2, env, timeout=120)
  return [next(ln for ln in out.splitlines() if ln.startswith(("gathered", "saved"))) for out in outs]


@pytest.mark.parametrize("device_barriers", [False, True])
def test_orbax_barrier_in_a_thread_never_meets_a_main_thread_collective(device_barriers):
  """Orbax waits at barriers from its background save thread. As device collectives (its default)
  they are matched across processes by order, so process 0's barrier met process 1's main-thread
  all-gather (each got the other's data: the two-process training hung at the end under load).
  After `distributed.initialize` they are named barriers of the coordination service: each thread
  meets its own kind. `device_barriers` puts the default back and shows the cross-match."""
  lines = run_barrier_worker("thread", *(["--device-barriers"] if device_barriers else []))
  if device_barriers:
    assert all("AssertionError" in ln and "[1, 2]" not in ln for ln in lines), lines
  else:
    assert lines == ["gathered [1, 2] errors []"] * 2


def test_two_checkpoint_managers_save_the_same_step_at_once(tmp_path):
  """The loop's `checkpoints` and `best` managers write the same step concurrently (an evaluation
  step that is also a save step), each from its own thread, on two processes. Orbax names its
  barriers by step, so they carry distinct prefixes (`train.loop.checkpoint_managers`); with the
  same names the two-process training failed with "Barrier _async_write_complete.2 is already
  ongoing" (whether the two threads overlap depends on timing, so that failure is not reproduced
  here; this checks the managers' saves complete on both processes)."""
  lines = run_barrier_worker("managers", str(tmp_path / "run"))
  assert lines == ["saved [[1], [1]] errors []"] * 2


@pytest.mark.parametrize("env,how", [
    ({}, "single"),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, "slurm"),
    ({"SLURM_NTASKS": "1"}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({distributed.ENV_COORDINATOR: "h:1234", distributed.ENV_NUM_PROCESSES: "4",
      distributed.ENV_PROCESS_ID: "2"}, "explicit"),
    ({distributed.ENV_COORDINATOR: "h:1234", distributed.ENV_NUM_PROCESSES: "1",
      distributed.ENV_PROCESS_ID: "0"}, "single"),
    ({distributed.ENV_AUTO: "auto"}, "auto"),  # launch/tpu_pod.sh: JAX reads the TPU VM's metadata
    # a tool run in a SLURM batch script or salloc shell, outside srun: one process when asked
    ({"SLURM_NTASKS": "16", distributed.ENV_NUM_PROCESSES: "1"}, "single"),
])
def test_detect(env, how):
  got, kwargs = distributed.detect(env=env)
  assert got == how
  if how == "explicit":
    assert kwargs == {"coordinator_address": "h:1234", "num_processes": 4, "process_id": 2}
  elif how != "slurm":
    assert kwargs == {}


@pytest.mark.parametrize("env,ids", [
    # one task per node (launch/slurm.sbatch): every GPU the task was given, not GPU SLURM_LOCALID alone
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, list(range(8))),
    ({"SLURM_TASKS_PER_NODE": "1(x4)", "CUDA_VISIBLE_DEVICES": "2,3"}, [0, 1]),  # indices of the visible ones
    ({"SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_GPUS_ON_NODE": "4"}, [0, 1, 2, 3]),
    ({"SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),  # one per GPU: JAX's
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}, None),
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "1"}, None),
])
def test_slurm_one_task_per_node_uses_every_gpu_of_the_node(env, ids):
  how, kwargs = distributed.detect(env={"SLURM_NTASKS": "4", "SLURM_PROCID": "1", **env})
  assert how == "slurm" and kwargs.get("local_device_ids") == ids


def test_a_failed_slurm_start_names_the_cause_and_the_way_out(monkeypatch, capsys):
  """SLURM_NTASKS is also set in the batch script and salloc shells, outside srun, where JAX's
  start-up fails with "coordinator_address should be defined." and convert printed a traceback."""
  from lgrpo_jax import convert
  for k in list(os.environ):
    if k.startswith(("SLURM_", "LGRPO_")):
      monkeypatch.delenv(k)
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: (_ for _ in ()).throw(
      ValueError("coordinator_address should be defined.")))
  with pytest.raises(ValueError, match=r"\(slurm\) failed: coordinator_address should be defined\. SLURM_NTASKS=4 "
                                       r".*LGRPO_NUM_PROCESSES=1"):
    distributed.initialize()
  assert convert.main(["to-jax", "/nonexistent", "/tmp/x"]) == 2
  assert "error: multi-process start-up (slurm) failed" in capsys.readouterr().err


def test_one_process_asked_inside_an_srun_step_is_refused():
  """LGRPO_NUM_PROCESSES=1 exported before the srun line would make every task train alone."""
  with pytest.raises(distributed.StartupError, match="inside an srun step of 16 tasks"):
    distributed.detect(env={"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5",
                            distributed.ENV_NUM_PROCESSES: "1"})


def test_detect_rejects_partial_or_bad_settings():
  with pytest.raises(ValueError, match="needs all three"):
    distributed.detect(coordinator="h:1", env={})
  with pytest.raises(ValueError, match="process id 5 is outside 0..1"):
    distributed.detect(coordinator="h:1", num_processes=2, process_id=5, env={})
  with pytest.raises(ValueError, match="LGRPO_DISTRIBUTED='yes': the only value is 'auto'"):
    distributed.detect(env={distributed.ENV_AUTO: "yes"})


def test_orbax_barrier_flag_set_or_warned(monkeypatch):
  """The installed Orbax has the flag and it ends up set; an Orbax without it (renamed or moved: a
  private module) gives a warning naming the flag and the risk, not a KeyError at start-up."""
  from absl import flags
  from orbax.checkpoint._src.multihost import multihost  # noqa: F401  (defines the flag)
  flag = flags.FLAGS[distributed.ORBAX_BARRIER_FLAG]
  before = flag.value, flag.present
  try:
    flag.value = False
    distributed.coordination_barriers_for_orbax()
    assert flag.value is True
  finally:  # this process's other tests keep Orbax's default
    flag.value, flag.present = before
  monkeypatch.setattr(distributed, "ORBAX_BARRIER_FLAG", "no_such_orbax_flag")
  with pytest.warns(RuntimeWarning, match="no_such_orbax_flag.*hang multi-process runs"):
    distributed.coordination_barriers_for_orbax()


def test_check_reports_bad_mesh_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8)}
  r = subprocess.run([sys.executable, "-m", "lgrpo_jax.check", "--mesh.data", "3"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: mesh (data=3, fsdp=-1, tensor=1): 8 devices are not divisible by 3" in r.stderr
  # A batch the data shards do not divide (it was 8 by default: a crash on any mesh over 8 devices).
  r = subprocess.run([sys.executable, "-m", "lgrpo_jax.check", "--batch", "12"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: --batch 12 does not split over the mesh's 8 data shards" in r.stderr


def run_launch(n_proc: int, run_dir, tok_overrides=()):
  """The launcher (warm start + GRPO + evaluation) on 4 devices: one process, or two with 2 each."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(4 // n_proc)}
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    env.pop(k, None)
  base = [sys.executable, "-m", "lgrpo_jax.launch", "--config", "configs/demo.py", f"run_dir={run_dir}",
          "sft.steps=1", "sft.global_batch=4", "pipeline.global_batch=4", "step.sampling.num_samples=2",
          "step.sampling.max_new_tokens=6", "loop.steps=2", "loop.eval_every=2", "loop.eval_at_start=false",
          "data.eval_pairs=2",
          "data.synthetic_pairs=16", "loop.save_every=2",
          # a step that moves the policy little: at the demo's rate (3e-4), once the listener's view
          # dropped special tokens, step 1 still agreed to ~1e-5 but step 2 differed (reward/total
          # 2e-5, grad_norm 4%): the layouts' fp32 differences, grown through one update and the
          # next rollout. The comparison is of the multi-host plumbing, not of that growth.
          "step.optim.learning_rate=1e-5", *tok_overrides]
  return spawn(base, n_proc, env, timeout=600)


def test_a_two_process_launch_into_a_run_directory_in_use_stops_every_process(tmp_path):
  """Process 0 holds RUN_DIR/.lock; refused, it used to return alone while process 1 built the
  model and waited in a collective: both died at JAX's 5-minute shutdown barrier. Every process
  now exits 2 at once, process 0 naming the holder."""
  from lgrpo_jax import runs
  lock = runs.lock_run_dir(str(tmp_path / "run"))
  try:
    env = {k: v for k, v in os.environ.items() if k not in (
        distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)}
    out = spawn([sys.executable, "-m", "lgrpo_jax.launch", "--config", "configs/demo.py", f"run_dir={tmp_path / 'run'}"],
                2, {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}, timeout=240, codes=(2,), stderr=True)
  finally:
    lock.close()
  assert f"is in use by pid {os.getpid()}" in out[0][1] and "process 0 names it" in out[1][1]


def test_training_two_processes_equal_one(tmp_path):
  """Multi-host training: two processes, each feeding its own rows of every global batch (warm start,
  GRPO steps, held-out evaluation gathered across processes), train like one process with the same
  devices; only process 0 writes metrics and prints the summary."""
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
  import concurrent.futures
  tok = build_tiny_tokenizer(tmp_path / "tok")  # one tokenizer for both runs
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side, as the evaluations below
    two = pool.submit(run_launch, 2, tmp_path / "two", (f"model.tokenizer={tok}",))
    one = pool.submit(run_launch, 1, tmp_path / "one", (f"model.tokenizer={tok}",))
    one, two = one.result(), two.result()
  assert "held-out accuracy at step 2" in one[0] and "held-out accuracy at step 2" in two[0]
  assert "held-out accuracy" not in two[1] and "run directory" not in two[1]  # process 0 reports
  read = lambda d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
  a, b = read("one"), read("two")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    for k in ra:
      if k.startswith("eval/") or k in ("reward/total", "accuracy", "format_rate", "generated_tokens"):
        np.testing.assert_allclose(rb[k], ra[k], atol=1e-5, err_msg=k)
    if "grad_norm" in ra:
      np.testing.assert_allclose(rb["grad_norm"], ra["grad_norm"], rtol=1e-4)
  assert (tmp_path / "two" / "checkpoints" / "2").is_dir() and (tmp_path / "two" / "sft").is_dir()

  # Multi-host evaluation of that run: two processes judge like one (padding rows in the last batch).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    env.pop(k, None)
  base = [sys.executable, "-m", "lgrpo_jax.evaluate", "--checkpoint", str(tmp_path / "two"), "--data", "synthetic:3",
          "--batch", "4", "--max-new-tokens", "8"]
  # The one-process reference runs alongside (their start-ups, mostly imports on one core, overlap:
  # 41 → 33 s on 2 cores).
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    two_procs = pool.submit(spawn, base + ["--out", str(tmp_path / "eval2")], 2, env, 300)
    one_proc = pool.submit(spawn, base + ["--out", str(tmp_path / "eval1")], 1, {**env, "XLA_FLAGS": xla_flags(4)}, 300)
    outs = two_procs.result()
    one_proc.result()
  assert "accuracy" in outs[0] and "accuracy" not in outs[1]  # process 0 reports and writes
  preds = {d: sorted((json.loads(x) for x in open(tmp_path / d / "predictions.jsonl")),
                     key=lambda r: (r["pair_id"], r["order"])) for d in ("eval1", "eval2")}
  assert len(preds["eval2"]) == 6
  for r1, r2 in zip(preds["eval1"], preds["eval2"]):
    assert (r1["pair_id"], r1["order"], r1["answer"]) == (r2["pair_id"], r2["order"], r2["answer"])
    assert r1["samples"][0]["text"] == r2["samples"][0]["text"]
    np.testing.assert_allclose(r1["samples"][0]["p"] + r1["samples"][0]["listener"],
                               r2["samples"][0]["p"] + r2["samples"][0]["listener"], atol=1e-5)


def test_a_stop_or_a_bad_record_on_one_process_stops_every_process(tmp_path):
  """A bad record read by one process of two, then SIGTERM reaching one process of two (a pre-empted
  host): every process saves the same step and leaves the loop together. Each process used to
  decide alone: the other waited in the next step's collective (a hang, then an abort after the
  barrier timeout) while the stopping one waited in the checkpoint's barrier."""
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
         "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
  worker = os.path.join(os.path.dirname(__file__), "stop_worker.py")
  outs = spawn([sys.executable, worker, str(tmp_path / "run"), build_tiny_tokenizer(tmp_path / "tok")], 2, env,
               timeout=240)
  lines = [[ln for ln in out.splitlines() if ln.startswith(("stopped", "failed", "hung", "evaluated", "eval hung",
                                                              "reward"))]
           for out in outs]
  assert lines[0][0] == ("failed: DataError: process 1 of 2 stopped on a bad record (its log names the record); "
                         "every process saved step 0 and stops; step 0, saved [0]"), lines[0]
  assert lines[1][0] == "failed: ImageError: /data/b7.png: truncated file; step 0, saved [0]", lines[1]
  for got in lines:
    assert got[1] == "stopped: steps [], by 15, saved [0]", got
  # Process 1's read hangs: it stops with its own DataStall, process 0 with one naming it.
  assert lines[0][2] == ("hung: DataStall: process 1 of 2 got no batch within pipeline.stall_timeout_s (its "
                         "data source hangs); every process saved step 0 and stops; a restart resumes there; "
                         "step 0, saved [0]"), lines[0]
  assert re.fullmatch(r"hung: DataStall: process 1: no batch after \d+ s \(pipeline.stall_timeout_s=2\): the "
                      r"data source hangs \(a stalled file system\?\); a restart resumes from the step saved; "
                      r"step 0, saved \[0\]", lines[1][2]), lines[1]
  # The held-out evaluation over both processes: each scores every row (pairs labelled 0, 0, 1 in
  # both orders; a perfect judge, well-formed on shown label 0, the listener always against it).
  want = {"eval/accuracy": 1.0, "eval/accuracy_as_given": 1.0, "eval/accuracy_swapped": 1.0,
          "eval/position_bias_gap": 0.0, "eval/format_rate": 0.5, "eval/pairs": 3, "eval/contradiction_rate": 1.0}
  for got in lines:
    assert json.loads(got[3].removeprefix("evaluated: ")) == want, got
  # A text reward raising in step 1 (run on process 0, which holds the mesh's first device, for
  # every row): every process rolls back to step 0, saves it and raises; run() again goes on.
  assert lines[0][5] == ("reward: text reward 'mp_text' failed: ZeroDivisionError: a bug in my reward (at step 1; "
                         "the update was not applied, step 0 is saved and a new run() or restart reads that batch "
                         "again); step 0, saved [0]"), lines[0]
  assert lines[1][5] == ("reward: a text reward failed at step 1 on process 0 of 2 (its log names it); every process "
                         "saved step 0 and stops; step 0, saved [0]"), lines[1]
  assert lines[0][6] == "reward then: steps [1, 2], calls here [4, 4, 4]", lines[0]
  assert lines[1][6] == "reward then: steps [1, 2], calls here []", lines[1]
  # Process 1's held-out read hangs: it raises its own DataStall, process 0 one naming it.
  assert lines[0][4] == ("eval hung: DataStall: process 1 of 2 got no batch within pipeline.stall_timeout_s (its "
                         "data source hangs); every process stops"), lines[0]
  assert re.fullmatch(r"eval hung: DataStall: process 1: no batch after \d+ s \(pipeline.stall_timeout_s=2\): the "
                      r"data source hangs \(a stalled file system\?\)", lines[1][4]), lines[1]


def test_a_stop_or_a_hung_read_on_one_process_ends_a_two_process_evaluation_that_resumes(tmp_path):
  """`python -m lgrpo_jax.evaluate` on two processes: SIGTERM reaching process 1 alone during its
  second batch read, then (resumed) process 1's read hanging past --stall-timeout, each end both
  processes at the same batch with the same exit code (143, then 75) and the judgements made kept;
  the same command then finishes, and the predictions equal an uninterrupted one-process run's."""
  import concurrent.futures

  import lgrpo_jax
  from transformers import AutoTokenizer
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  tok = build_tiny_tokenizer(tmp_path / "tok")
  hf = tmp_path / "hf"
  lgrpo_jax.save_hf(lgrpo_jax.from_config(tiny_model_config(tok), seed=3), hf)
  AutoTokenizer.from_pretrained(tok).save_pretrained(hf)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    env.pop(k, None)
  worker = os.path.join(os.path.dirname(__file__), "eval_fault_worker.py")
  # 3 comparisons × 2 orders in batches of 4 (2 rows per process): two batches, the second padded.
  args = ["--checkpoint", str(hf), "--data", "synthetic:3", "--batch", "4", "--max-new-tokens", "6",
          "--no-listener", "--quiet"]
  out = tmp_path / "eval"
  run = lambda fault, *extra, n=2, codes=(0,): spawn(
      [sys.executable, worker, fault, "2" if fault == "sigterm" else "1", *args, *extra], n,
      {**env, "XLA_FLAGS": xla_flags(2 // n)}, 300, codes=codes, stderr=True)
  keyed = lambda d: {(p["pair_id"], p["order"]): p for p in map(json.loads, open(d / "predictions.jsonl"))}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the reference runs alongside
    ref = pool.submit(run, "none", "--out", str(tmp_path / "ref"), n=1)
    stopped = run("sigterm", "--out", str(out), codes=(143,))
    ref.result()
  assert "SIGTERM: stopped with 4 of 6 judgements made" in stopped[0][1], stopped[0][1]
  assert len(keyed(out)) == 4

  hung = run("hang", "--out", str(out), "--stall-timeout", "2", codes=(75,))
  assert "4 judgements already in" in hung[0][1] and "2 to go" in hung[0][1]
  assert "process 1 of 2 got no batch within --stall-timeout" in hung[0][1], hung[0][1]
  assert re.search(r"error: process 1: no batch after \d+ s \(--stall-timeout=2\)", hung[1][1]), hung[1][1]
  assert len(keyed(out)) == 4

  done = run("none", "--out", str(out))
  assert "accuracy" in done[0][0] and "accuracy" not in done[1][0]
  got, want = keyed(out), keyed(tmp_path / "ref")
  assert len(open(out / "predictions.jsonl").read().splitlines()) == len(got) == len(want) == 6
  for k, p in got.items():
    assert (p["answer"], p["samples"][0]["text"]) == (want[k]["answer"], want[k]["samples"][0]["text"]), k
    np.testing.assert_allclose(p["samples"][0]["p"], want[k]["samples"][0]["p"], atol=1e-5)
