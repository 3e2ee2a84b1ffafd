"""Huge-page malloc for the entry points (`lgrpo_jax.hostmem`): when it applies, how the environment
is extended, and — on a machine where it applies — that a re-executed process really gets huge pages."""

import json
import os
import subprocess
import sys

import pytest

from lgrpo_jax import hostmem

LINUX = dict(system="linux", mode="madvise", glibc=(2, 36))

CHILD = """
import json, os, sys
from lgrpo_jax.hostmem import reexec_with_hugepages
reexec_with_hugepages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)  # 64 MiB straight from glibc (numpy would madvise on its own), then touched
ctypes.memset(p, 1, n)
huge = 0
with open("/proc/self/smaps_rollup") as f:
  for line in f:
    if line.startswith("AnonHugePages:"):
      huge = int(line.split()[1])
print(json.dumps([os.environ.get("GLIBC_TUNABLES"), huge, sys.argv[1:], ctypes.string_at(p + n - 1, 1)[0]]))
"""


def test_environment_gets_the_tunable_only_where_it_helps():
  env = hostmem.hugepage_environment({"PATH": "/bin"}, **LINUX)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # appended to the user's own tunables
  env = hostmem.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for environ, kw in [
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # the user chose (or we re-executed)
      ({"LGRPO_HOST_HUGEPAGES": "0"}, LINUX),  # opt-out
      ({}, dict(LINUX, system="darwin")),
      ({}, dict(LINUX, mode="always")),  # every mapping gets huge pages already
      ({}, dict(LINUX, mode="never")),
      ({}, dict(LINUX, mode=None)),  # no THP file
      ({}, dict(LINUX, glibc=(2, 31))),  # before the tunable existed
      ({}, dict(LINUX, glibc=None)),  # musl or unknown
  ]:
    assert hostmem.hugepage_environment(environ, **kw) is None, (environ, kw)


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hostmem.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hostmem.thp_mode(str(f)) == "always"
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


def run_child(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", CHILD, "a", "--b=1"], env={**environ, **env},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  tunables, huge, argv, last = json.loads(out.stdout)
  assert last == 1
  return tunables, huge, argv


@pytest.mark.skipif(hostmem.hugepage_environment({}, system=sys.platform, mode=hostmem.thp_mode(),
                                                 glibc=hostmem.glibc_version()) is None,
                    reason="this machine's kernel/libc offer no madvise huge pages")
def test_reexecuted_process_gets_huge_pages():
  tunables, huge, argv = run_child()
  assert tunables == "glibc.malloc.hugetlb=1"
  assert argv == ["a", "--b=1"]  # the same arguments after the re-exec
  assert huge >= 2048, huge  # at least one 2 MiB page backs the array
  tunables, huge, _ = run_child(LGRPO_HOST_HUGEPAGES="0")
  assert tunables is None and huge == 0
