"""The huge-page re-exec of the CLI and benchmark entry points (dalle_jax/hostenv.py)."""

import os
import subprocess
import sys

import pytest

from dalle_jax import hostenv

SUPPORTED = hostenv.hugepage_environment({}) is not None
needs_support = pytest.mark.skipif(not SUPPORTED, reason="no glibc >= 2.35 or THP not in 'madvise' mode here")

CHILD = ("from dalle_jax import hostenv; hostenv.reexec_with_hugepages(); import os, sys; "
         "print(os.environ.get('GLIBC_TUNABLES', '')); print(sys.argv[1:])")


def _run_child(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, "--flag", "value"], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.splitlines()


def test_no_reexec_when_opted_out_or_already_set():
    assert hostenv.hugepage_environment({hostenv.OPT_OUT: "0"}) is None
    assert hostenv.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


@needs_support
def test_tunable_is_added_to_existing_ones():
    env = hostenv.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "KEEP": "me"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["KEEP"] == "me"


@needs_support
def test_child_reexecutes_once_with_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    tunables, argv = _run_child(env)
    assert tunables == "glibc.malloc.hugetlb=1"
    assert argv == "['--flag', 'value']"
    tunables, _ = _run_child({**env, hostenv.OPT_OUT: "0"})
    assert tunables == ""
