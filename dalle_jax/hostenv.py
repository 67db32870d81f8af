"""Host-side tuning for CPU runs: XLA's per-step buffers on transparent huge pages.

XLA's CPU runtime allocates a step's temporaries afresh on every call. glibc serves large blocks with mmap and
unmaps them on free, so each step faults in its working set again, 4 KiB at a time: for the `bench` prior that
is ~590k page faults and ~1.7 s of kernel time per 5.8 s step on the 2-core machine (benchmarks/README.md).
glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) asks for transparent huge pages on those blocks, which
cuts the faults to ~2k. glibc reads tunables only at process start, so the `dalle-jax` and benchmark entry
points re-execute themselves once with it set. Set DALLE_JAX_HUGEPAGES=0 to opt out.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OPT_OUT = "DALLE_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_supports_tunable() -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_on_request() -> bool:
    """True when the kernel gives huge pages to regions that ask for them ("madvise"; "always" needs no asking)."""
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:
        return False


def hugepage_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would change nothing."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(OPT_OUT, "1") == "0" or TUNABLE in tunables or sys.platform != "linux"
            or not _glibc_supports_tunable() or not _thp_on_request()):
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return environ


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with the tunable set (no-op when nothing would change).

    Call it first thing in a program's entry point, before threads or output exist.
    """
    environ = hugepage_environment()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
