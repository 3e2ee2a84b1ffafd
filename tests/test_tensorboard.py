"""Our hand-written TensorBoard event files, read back by TensorBoard's own reader."""

import glob
import math

from lgrpo_jax.train.tensorboard import EventWriter, crc32c


def test_crc32c_known_vectors():
  # RFC 3720 appendix B.4 and the classic check value.
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def test_scalars_read_back_by_tensorboard(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  w = EventWriter(str(tmp_path))
  for step in range(1, 6):
    w.scalars(step, {"reward/total": 0.5 + 0.1 * step, "loss": -step / 3, "tokens_per_s": 1e6 * step,
                     "note": "skipped", "flag": True})
  w.scalars(2**40, {"big_step": 1.0})
  w.close()
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1
  acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
  tags = set(acc.Tags()["scalars"])
  assert tags == {"reward/total", "loss", "tokens_per_s", "big_step"}
  got = [(e.step, e.value) for e in acc.Scalars("reward/total")]
  assert [s for s, _ in got] == [1, 2, 3, 4, 5]
  for s, v in got:
    assert math.isclose(v, 0.5 + 0.1 * s, rel_tol=1e-6)
  assert [e.value for e in acc.Scalars("loss")] == [float(__import__("numpy").float32(-s / 3)) for s in range(1, 6)]
  assert acc.Scalars("big_step")[0].step == 2**40
  # Two writers of one process in the same second (a close and a resume): each its own file (they
  # appended to one, against TensorBoard's one-writer-per-file rule)
  import unittest.mock
  with unittest.mock.patch("time.time", return_value=1.7e9):
    a, b = EventWriter(str(tmp_path / "two")), EventWriter(str(tmp_path / "two"))
  assert a.path != b.path
  a.close()
  b.close()


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
  """A first attempt logs steps 1-5 and is killed after the checkpoint of step 3; the resumed run's
  sinks (resumed_from=3) log 4-6. TensorBoard shows 1-3 of the first and 4-6 of the second, as
  metrics.jsonl does, not both attempts' 4 and 5."""
  import time

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from lgrpo_jax.train.metrics import MetricSinks
  first = MetricSinks(str(tmp_path), tensorboard=True)
  for step in range(1, 6):
    first.write({"step": step, "loss": 1.0})
  first.close()
  time.sleep(1.1)  # a new event file: its name carries the second
  again = MetricSinks(str(tmp_path), tensorboard=True, resumed_from=3)
  for step in range(4, 7):
    again.write({"step": step, "loss": 2.0})
  again.close()
  acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0),
                                                             (6, 2.0)]
