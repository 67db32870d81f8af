"""Checkpoints shared by every trainer (dVAE, prior, CLIP): Orbax underneath, resumable, verified.

A stage directory (see `dalle_jax.runs`) holds one `Checkpointer` directory::

      checkpoints/             a `Checkpointer` directory
        5/                     one step: Orbax items
          state/               the train-state pytree (OCDBT/zarr arrays, sharded writes from every host)
          data_iterator/       the Grain iterator state (JSON)
          meta/                anything small the trainer wants back (JSON)
          fingerprints/        one uint32 content hash per array leaf (JSON), checked on restore
        10/
        10.corrupt/            a checkpoint that failed to restore, moved aside by `restore_latest`

Typical training loop::

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1000, keep=3)
    restored = ckpt.restore_latest(abstract_like(state, shardings))
    if restored:
        start, state, it_state, _ = restored
    with ckpt, PreemptionGuard() as guard:
        for step in range(start + 1, total + 1):
            state = train_step(state, batch)
            stop = guard.should_stop(step)
            ckpt.save(step, state, data_iterator=it.get_state(), meta={"loss": loss}, force=stop)
            if stop:
                break   # close() waits for the (async) save; exit 0 and let the scheduler restart us

Why the extra fingerprints: OCDBT/zarr store no checksums, so flipped bytes in an array file restore silently
as wrong numbers. A position-weighted uint32 sum of each leaf's bits is computed on device at save time (one
cheap pass, independent of sharding) and compared after restore, so a corrupt checkpoint is caught by name.

PRNG keys are stored as their raw bits: put `jax.random.key_data(key)` in the state and `jax.random.wrap_key_data`
after restore.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import FrameType, TracebackType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

from dalle_jax.errors import DalleJaxError

logger = logging.getLogger(__name__)

PyTree = Any
STATE, DATA_ITERATOR, META, FINGERPRINTS = "state", "data_iterator", "meta", "fingerprints"
CORRUPT_SUFFIX = ".corrupt"
# Free space asked beyond the checkpoint's own size: Orbax's metadata files and the filesystem's block rounding.
SAVE_HEADROOM_BYTES = 1 << 20


class CheckpointRestoreError(DalleJaxError, RuntimeError):
    """A checkpoint could not be restored; `path` names its directory (None when several failed)."""

    def __init__(self, message: str, path: epath.Path | None = None, step: int | None = None):
        super().__init__(message)
        self.path, self.step = path, step


class CheckpointSaveError(DalleJaxError, RuntimeError):
    """A checkpoint could not be written (disk full, permissions, a dead filesystem). The message says which step
    failed, which step is the last complete one, and how to resume."""


class Restored(NamedTuple):
    """What `Checkpointer.restore*` gives back; unpacks as `step, state, data_iterator, meta`."""

    step: int
    state: PyTree
    data_iterator: dict | None
    meta: dict


# --------------------------------------------------------------------------------------------------
# Abstract targets


def abstract_like(state: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """The restore target for `state`: array leaves become `jax.ShapeDtypeStruct`s carrying a sharding.

    Args:
        state: a concrete state, or one made by `jax.eval_shape` / `nnx.eval_shape` (ShapeDtypeStruct leaves).
        shardings: None keeps each leaf's own `.sharding`; a single `Sharding` applies to every array leaf; a
            pytree with the structure of `state` gives one sharding per leaf (None entries keep the leaf's own).
            Pass shardings over a new mesh to restore onto a different mesh shape.

    Non-array leaves (Python scalars, numpy arrays) are kept as they are: Orbax restores them to that type.
    """
    leaves, treedef = jax.tree.flatten(state)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        leaf_shardings = [shardings] * len(leaves)
    else:
        leaf_shardings = treedef.flatten_up_to(shardings)

    def to_abstract(leaf: Any, sharding: jax.sharding.Sharding | None) -> Any:
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding or getattr(leaf, "sharding", None))
        return leaf

    return treedef.unflatten([to_abstract(leaf, s) for leaf, s in zip(leaves, leaf_shardings, strict=True)])


# --------------------------------------------------------------------------------------------------
# Content fingerprints


_FINGERPRINT_MULTIPLIER = np.uint32(0x9E3779B1)  # odd, so distinct positions get distinct weights


@jax.jit
def _fingerprint_array(x: jax.Array) -> jax.Array:
    """uint32 sum of bits(x[i]) * (2 * i * M + 1), wrapping: any single changed element changes it."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        bits = lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing axis of 2
    else:
        bits = lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    flat_index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        flat_index = flat_index + lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weights = flat_index * np.uint32(2) * _FINGERPRINT_MULTIPLIER + np.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves: list) -> list:
    """Every leaf's fingerprint from one program. One jitted call per leaf put dozens of small programs with
    cross-device reductions in flight at once, which deadlocked XLA:CPU's collectives (fsdp/tensor-sharded
    parameters on 8 simulated devices over 2 cores: "Termination timeout for `all reduce RendezvousKey`")."""
    return [_fingerprint_array(x) for x in leaves]


def _leaf_name(path: tuple) -> str:
    """'opt_state.0.mu.layers.0.kernel': stable across dict / nnx.State containers that Orbax treats alike."""
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        if not (isinstance(key, jax.tree_util.GetAttrKey) and part == "value"):  # nnx.Variable's payload
            parts.append(str(part))
    return ".".join(parts)


def _fingerprintable(leaf: Any) -> bool:
    if not isinstance(leaf, jax.Array | np.ndarray):
        return False
    dtype = leaf.dtype
    return not (jnp.issubdtype(dtype, jnp.complexfloating) or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def fingerprints(state: PyTree) -> dict[str, int]:
    """One uint32 content hash per array leaf of `state`, keyed by leaf name; the same on any mesh."""
    named = [(_leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if _fingerprintable(x)]
    hashes = jax.device_get(_fingerprint_leaves([x for _, x in named]))  # one host sync for all leaves
    return {name: int(h) for (name, _), h in zip(named, hashes, strict=True)}


# --------------------------------------------------------------------------------------------------
# The checkpointer


class Checkpointer:
    """Orbax `CheckpointManager` with a fixed item layout, content verification and fallback on corruption.

    Every process of a multi-host job must make the same calls in the same order (Orbax synchronises them).

    Args:
        directory: where step directories go (local path or any URL epath/tensorstore understands).
        save_every: `save` writes when `step % save_every == 0`, or when forced, or at a preemption sync
            point agreed by all hosts (JAX's preemption service, multi-host only).
        keep: how many of the newest checkpoints to keep.
        async_save: write in a background thread after copying the arrays off the devices; `wait`/`close`
            block until the write has finished.
        verify: record content fingerprints on save and check them on restore.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True,
                 verify: bool = True, read_only: bool = False):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must both be >= 1")
        directory = str(directory)
        self._directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self._verify = verify
        self._saving: int | None = None  # the step of the last save handed to Orbax, for error messages
        _install_noise_filters()
        # A reader (sample, encode, reconstruct) changes nothing on disk: no tmp clean-up, no corrupt step moved aside.
        self._read_only = read_only
        # Orbax deletes unfinished (tmp) step directories when the manager starts; note them first so that
        # restore_latest can say what it ignored.
        self._partial = sorted(self._find_partial()) if self._directory.exists() else []
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {STATE: ocp.StandardCheckpointHandler(), DATA_ITERATOR: ocp.JsonCheckpointHandler(),
                    META: ocp.JsonCheckpointHandler(), FINGERPRINTS: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self._directory, options=options, item_handlers=handlers)

    # ---- bookkeeping

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def step_directory(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first (an async save in flight is not yet listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_abstract(self, step: int, sharding: Any) -> dict:
        """The state saved at `step` as ShapeDtypeStructs placed by `sharding`, read from the metadata alone: a
        restore target for a checkpoint whose trainer (optimizer state, extra items) is not rebuilt here."""
        on_disk = ocp.StandardCheckpointHandler().metadata(self.step_directory(step) / STATE)
        return {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
                                   is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
                for name, tree in dict(on_disk.tree).items()}

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write (interval or agreed preemption point)."""
        return self._manager.should_save(step)

    def wait(self) -> None:
        """Blocks until any async save has been written and committed.

        Raises:
            CheckpointSaveError: that save failed (its tmp directory is left for Orbax to remove next start).
        """
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - whatever Orbax/tensorstore raised, said in one line
            raise self._save_error(self._saving, error) from error

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads (raises `CheckpointSaveError` like `wait`)."""
        self.wait()
        self._manager.close()

    def abandon(self) -> None:
        """Releases Orbax's threads after an error, without raising again for a save that already failed."""
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - the caller is already reporting an error; a second would hide it
            logger.debug("ignored an error while closing %s after a failure", self._directory, exc_info=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- save

    def save(self, step: int, state: PyTree, *, data_iterator: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Saves `state` (any pytree of arrays and scalars) plus JSON items when due; returns whether it did.

        Call it every step: it is a no-op unless `should_save(step)` or `force` (e.g. preemption). A step at or
        before the latest saved one is never written again.
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        if not force and not self.should_save(step):
            return False
        self.wait()  # the previous async save must be complete (and its error reported) before the space check
        self._check_free_space(step, state)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA_ITERATOR: ocp.args.JsonSave(data_iterator),
            META: ocp.args.JsonSave(dict(meta or {})),
            FINGERPRINTS: ocp.args.JsonSave(fingerprints(state) if self._verify else None),
        })
        self._saving = step
        try:
            saved = self._manager.save(step, args=args, force=True)
        except Exception as error:  # noqa: BLE001 - see wait()
            raise self._save_error(step, error) from error
        if saved:
            logger.info("saving checkpoint %s%s", self.step_directory(step), " (forced)" if force else "")
        return saved

    def _check_free_space(self, step: int, state: PyTree) -> None:
        """Refuses a save that cannot fit on a local disk before Orbax starts writing.

        A write that runs out of space part-way fails inside Orbax's background threads, which print hundreds of
        lines of asyncio tracebacks; checking first turns the common case into one line. The need is the size of
        the last complete checkpoint on disk (exact, compression included), else the arrays' bytes. Remote paths
        (gs://) have no free-space figure and are not checked.
        """
        if "://" in str(self._directory) or not self._directory.exists():
            return
        latest = self.latest_step()
        needed = _tree_size(self.step_directory(latest)) if latest is not None else 0
        if not needed:
            needed = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
        needed += SAVE_HEADROOM_BYTES
        free = shutil.disk_usage(self._directory).free
        if free < needed:
            raise self._save_error(step, f"disk full: {free / 2**20:.1f} MiB free, a checkpoint needs about "
                                         f"{needed / 2**20:.1f} MiB")

    def _save_error(self, step: int | None, reason: BaseException | str) -> CheckpointSaveError:
        """One line: what failed, what is safe on disk, how to go on."""
        if not isinstance(reason, str):
            _quiet_failed_save()
        complete = [s for s in self.all_steps() if step is None or s < step]
        kept = (f"the last complete checkpoint is step {complete[-1]} ({self.step_directory(complete[-1])}); "
                "free space and rerun the same command to resume from it" if complete else
                "no checkpoint was completed; free space and rerun the same command to start again")
        what = f"could not save checkpoint step {step}" if step is not None else "could not save a checkpoint"
        return CheckpointSaveError(f"{what} in {self._directory}: "
                                   f"{_reason(reason)}; {kept}")

    # ---- restore

    def restore(self, step: int, abstract_state: PyTree) -> Restored:
        """Restores one step into `abstract_state` (see `abstract_like`); arrays get its shardings.

        Raises:
            FileNotFoundError: no finished checkpoint for `step`.
            CheckpointRestoreError: the checkpoint is unreadable, incomplete, does not fit `abstract_state`, or
                its contents do not match the fingerprints recorded at save time. The message names the
                directory.
        """
        path = self.step_directory(step)
        if step not in self.all_steps():
            raise FileNotFoundError(f"no finished checkpoint for step {step} in {self._directory} "
                                    f"(steps: {self.all_steps()})")
        try:
            item_metadata = self._manager.item_metadata(step)
            if STATE not in item_metadata or item_metadata[STATE] is None:
                raise CheckpointRestoreError(f"checkpoint {path} is incomplete: metadata of item '{STATE}' is "
                                             "missing or unreadable", path, step)
            args = ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA_ITERATOR: ocp.args.JsonRestore(),
                META: ocp.args.JsonRestore(),
                FINGERPRINTS: ocp.args.JsonRestore(),
            })
            restored = self._manager.restore(step, args=args)
        except CheckpointRestoreError:
            raise
        except Exception as error:  # Orbax and tensorstore raise many types; all get the path added
            raise CheckpointRestoreError(f"could not restore checkpoint {path}: {_short(error)}", path,
                                         step) from error
        state = restored[STATE]
        expected = restored[FINGERPRINTS]
        if self._verify and expected:
            self._check_fingerprints(path, step, state, expected)
        return Restored(step, state, restored[DATA_ITERATOR], restored[META] or {})

    def _check_fingerprints(self, path: epath.Path, step: int, state: PyTree, expected: Mapping[str, int]) -> None:
        actual = fingerprints(state)
        bad = [name for name, value in actual.items() if name in expected and expected[name] != value]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointRestoreError(f"checkpoint {path} is corrupt: restored contents of {len(bad)} array(s) "
                                         f"differ from the fingerprints recorded when it was saved: {shown}",
                                         path, step)

    def restore_latest(self, abstract_state: PyTree) -> Restored | None:
        """Restores the newest checkpoint that reads back intact; None when there is none at all.

        A newer checkpoint that fails (corrupt, truncated, metadata missing) is skipped with a WARNING naming it
        and the step used instead; once an older one has restored, the failed ones are moved aside to
        `<step>.corrupt` so the resumed run can save those steps again. Unfinished tmp directories are ignored
        (Orbax deletes them). If every checkpoint fails, nothing is moved (the fault may be the target's, e.g. a
        changed model config) and `CheckpointRestoreError` lists each directory with its error.
        """
        failures: list[CheckpointRestoreError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointRestoreError as error:
                logger.warning("%s; trying an older checkpoint", error)
                failures.append(error)
                continue
            for error in failures:
                logger.warning("checkpoint %s could not be restored; fell back to step %d (%s)%s", error.path, step,
                               self.step_directory(step),
                               "" if self._read_only else f"; moving it aside to {error.path}{CORRUPT_SUFFIX}")
            if not self._read_only:
                self._quarantine([error.step for error in failures])
            self._log_partial(f"fell back to step {step} ({self.step_directory(step)})", newer_than=step)
            return restored
        if failures:
            listing = "; ".join(f"{error.path}: {error}" for error in failures)
            raise CheckpointRestoreError(f"none of the {len(failures)} checkpoints in {self._directory} could be "
                                         f"restored: {listing}")
        self._log_partial("no complete checkpoint; starting from scratch", newer_than=-1)
        return None

    # ---- damaged checkpoints

    def _find_partial(self) -> Iterable[epath.Path]:
        for path in ocp.path.step.all_temporary_paths(self._directory):
            yield path.get()

    def _log_partial(self, outcome: str, newer_than: int) -> None:
        for path in self._partial:
            try:
                step = ocp.path.step.step_from_checkpoint_name(path.name)
            except ValueError:
                step = None
            if step is None or step > newer_than:
                logger.warning("ignored partially written checkpoint %s (never finished; Orbax removes it); %s",
                               path, outcome)
        self._partial = []

    def _quarantine(self, steps: list[int]) -> None:
        """Renames failed step directories to `<step>.corrupt` (kept for inspection, invisible to Orbax)."""
        if not steps:
            return
        self.wait()
        if ocp.multihost.is_primary_host(0):
            for step in steps:
                source = self.step_directory(step)
                target = self._directory / f"{step}{CORRUPT_SUFFIX}"
                if target.exists():
                    target = self._directory / f"{step}{CORRUPT_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
                source.rename(target)
        ocp.multihost.sync_global_processes(f"dalle_jax_checkpoint_quarantine_{'_'.join(map(str, steps))}")
        self._manager.reload()


class _OrbaxSaveFailureNoise(logging.Filter):
    """Orbax logs a failed background write at ERROR with a full traceback from each thread it passes through
    (hundreds of lines for one full disk), before the loop learns of it; `wait()` reports the same failure as
    one `CheckpointSaveError` line, so these records go to this module's logger at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname:
            logger.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        if "orbax" in record.pathname and record.getMessage().startswith(_READ_ONLY_NOTES):
            return False  # a reader (sample, encode, init_from) asked for read-only; Orbax says so at WARNING
        return True


_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


_save_failed = False


def _quiet_failed_save() -> None:
    """After a failed save has been reported: the coroutines Orbax left behind report the same error again
    when they are collected ("Task exception was never retrieved", "Exception ignored in ... write_fragment")."""
    global _save_failed
    _save_failed = True
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _is_orbax_leftover(unraisable: Any) -> bool:
    """An unraisable exception left by a failed Orbax save: tensorstore finishing a write after the save's event
    loop closed on the first error ("Event loop is closed" in call_soon_threadsafe, dozens of them), or, once the
    failure was reported, Orbax's abandoned coroutines being collected."""
    frames, tb = [], unraisable.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    if (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
            and any(code.co_name == "call_soon_threadsafe" for code in frames)):
        return True
    return _save_failed and ("orbax" in repr(unraisable.object)
                             or any("orbax" in code.co_filename for code in frames))


def _install_noise_filters() -> None:
    """Once per process: Orbax's noise about a failed background write goes to DEBUG (see above)."""
    if getattr(sys.unraisablehook, "dalle_jax_filter", False):
        return
    default_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if _is_orbax_leftover(unraisable):
            logger.debug("ignored after a failed save: %r", unraisable.exc_value)
        else:
            default_hook(unraisable)

    hook.dalle_jax_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_OrbaxSaveFailureNoise())




def _reason(reason: BaseException | str) -> str:
    """Why a save failed, short: tensorstore's messages bury "No space left on device" after a long path."""
    if isinstance(reason, str):
        return reason
    text = str(reason)
    if "No space left on device" in text or "os_error_code='28'" in text:
        return "disk full (No space left on device)"
    return _short(reason, 200)


def _tree_size(path: epath.Path) -> int:
    """Bytes of the files under a local directory (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _short(error: BaseException, limit: int = 400) -> str:
    """Tensorstore errors carry kilobytes of JSON spec; the first line up to `limit` chars says enough."""
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------------------------------
# Preemption


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag the training loop polls, so it can save and exit cleanly.

    Single process: the context manager installs handlers that set `requested` (a second SIGINT raises
    KeyboardInterrupt as usual; repeated SIGTERMs are only logged) and restores the previous handlers on exit.

    Multi-host: a signal reaches hosts at different steps, and a save that only some hosts join deadlocks. So
    no Python handler is installed (it would replace JAX's own SIGTERM notifier); `should_stop(step)` asks
    JAX's preemption service, which makes every host agree on the same step. Call it every step on every host.
    (tests/test_multihost.py: a SIGTERM to one of two CPU processes stops both at one step, both saving it.)
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._received: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        """Whether this process has received one of the signals since entering."""
        return self._received is not None

    def should_stop(self, step: int) -> bool:
        """True at the step where the loop should force a save and stop; the same on every host."""
        if jax.process_count() > 1:
            return ocp.multihost.reached_preemption(step)
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self._received is not None and sig == signal.SIGINT:
            previous = self._previous.get(sig)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        if self._received is None:
            logger.warning("received %s: will save a checkpoint and stop after the current step", sig.name)
        self._received = self._received or sig

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionGuard entered outside the main thread: signals cannot be caught here")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
