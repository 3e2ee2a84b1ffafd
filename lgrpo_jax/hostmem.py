"""Host memory: let glibc's malloc ask for transparent huge pages (Linux, glibc ≥ 2.35).

XLA's CPU runtime takes its temporaries from `malloc`; glibc serves the large ones with fresh
`mmap`s, and on a kernel whose transparent-huge-page mode is `madvise` (the common default) those
are faulted in 4 KiB at a time. One training update of the 74M benchmark model on 2 CPU cores
page-faulted ~700k times (2.9 GB). glibc's tunable `glibc.malloc.hugetlb=1` makes malloc
`madvise(MADV_HUGEPAGE)` what it maps, so the same memory comes in 2 MiB pages (measured: 8× fewer
faults, a one-pair update 4.2 vs 5.1 s, the full 4-pair update 3–5% faster; docs/PERFORMANCE.md).

glibc reads tunables once, when the process starts, so the entry points (`python -m
lgrpo_jax.launch`, `.demo`, `.evaluate`, and the CPU benchmarks) call `reexec_with_hugepages()`
first thing: if the tunable would help and is not set, the process re-executes itself with it added
to `GLIBC_TUNABLES` (same interpreter, same arguments, same PID). Nothing happens on other systems,
when the kernel's mode is `always` (every mapping already gets huge pages) or `never`, when
`GLIBC_TUNABLES` already names the tunable, or with `LGRPO_HOST_HUGEPAGES=0` (opt-out).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "LGRPO_HOST_HUGEPAGES"  # "0": leave the allocator as it is
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None if unknown."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError:
    return None
  chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
  return chosen[0] if chosen else None


def glibc_version() -> tuple[int, ...] | None:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return None
  try:
    return tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None


def hugepage_environment(environ: Mapping[str, str], *, system: str, mode: str | None,
                         glibc: tuple[int, ...] | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when there is nothing to do (see module doc)."""
  if system != "linux" or environ.get(OPT_OUT, "1") == "0":
    return None
  if mode != "madvise" or glibc is None or glibc < MIN_GLIBC:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:
    return None  # set already (by us before the re-exec, or by the user, to any value)
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
  return env


def reexec_with_hugepages() -> None:
  """Re-execute this process with huge-page malloc when that applies; otherwise return. Call it
  first in a `__main__` block, before any work: the new process starts over (for `python -m
  lgrpo_jax.…` that repeats the package import, ~1 s)."""
  env = hugepage_environment(os.environ, system=sys.platform, mode=thp_mode(), glibc=glibc_version())
  if env is None or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
