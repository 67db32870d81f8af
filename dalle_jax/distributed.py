"""Multi-host start-up and the few cross-host helpers the trainers need.

A job on several hosts (a TPU pod slice, a GPU cluster, or several CPU processes in a test) runs one JAX
process per host. Each must call `initialize` once, before any other JAX call; after it `jax.devices()` lists
every device of the job, `jax.process_index()` tells the hosts apart, and JAX's preemption service turns a
SIGTERM on any host into a step at which every host saves (see train/checkpoint.py `PreemptionGuard`).

How the processes find each other:

- explicitly: `--coordinator HOST:PORT --num-processes N --process-id I` on every process (the same
  coordinator address everywhere; process 0 serves it);
- from the cluster: with `DALLE_JAX_DISTRIBUTED=1` in the environment, `jax.distributed.initialize()` is
  called without arguments and JAX reads them from the TPU VM metadata, Slurm or Open MPI;
- neither: a single process, nothing is called.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "DALLE_JAX_DISTRIBUTED"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the multi-host job if there is one; returns whether `jax.distributed` is now initialised.

    Must run before any other JAX call (JAX raises otherwise). Calling it again is a no-op.

    Raises:
        ValueError: only some of the three arguments were given, or they are out of range.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) not in (0, 3):
        present = [flag for flag in given if flag not in missing]
        raise ValueError(f"multi-host: {', '.join(present)} given without {', '.join(missing)}: pass all three of "
                         f"--coordinator, --num-processes and --process-id (or none, and set {ENV_VAR}=1 on a "
                         "cluster JAX can detect)")
    if not missing:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"multi-host: --process-id {process_id} must be in 0 .. --num-processes - 1 "
                             f"(--num-processes {num_processes})")
    if jax.distributed.is_initialized():
        return True
    if not missing:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes"):
        jax.distributed.initialize()  # JAX detects the cluster (TPU VM metadata, Slurm, Open MPI)
        return True
    return False


def is_main() -> bool:
    """Whether this is process 0, the one that writes run-directory files, metrics and progress."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (the same name on all); no-op on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_on_all_hosts(value: object, what: str) -> None:
    """Raises if a JSON-able `value` differs between processes (compared by a hash; no-op on one process)."""
    if jax.process_count() == 1:
        return
    import hashlib
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    hashes = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))  # (processes, 32)
    if not (hashes == hashes[0]).all():
        raise RuntimeError(f"{what} differs between processes (process {jax.process_index()} has {value!r})")
