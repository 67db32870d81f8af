"""The training loop every trainer shares: sharded state, jitted step, EMA, checkpoints, resume, metrics.

A trainer supplies a model constructor, a loss function and an optimizer; this module does the rest:

    state = {"params", "ema_params", "opt_state", "step", "key"}     (a pytree of global jax.Arrays)

`make_train_step` returns one jitted, donated update; `Loop.run` drives it with a data iterator, saves and
restores checkpoints (with the iterator's state, so a resumed run sees exactly the batches it would have
seen), stops cleanly on SIGTERM/SIGINT after saving, logs scalars, and calls an eval hook.

Multi-host: every process runs the same loop on its own rows of each batch (the Pipeline's host shard), with the
same mesh over all devices; all of them call every save and restore (Orbax writes each host's array shards);
metrics, TensorBoard and the progress bar are process 0's; a SIGTERM on any host stops all at one agreed step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dalle_jax import distributed, sharding
from dalle_jax.errors import DalleJaxError
from dalle_jax.models.init import build_pooled
from dalle_jax.train.checkpoint import Checkpointer, PreemptionGuard
from dalle_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)

# loss_fn(model, batch, key, step) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay, with warm-up min(decay, (1 + t) / (10 + t)) so early averages are not stuck at the init.

    Deviation when `warmup`: the paper states only the decay (0.999 dVAE, 0.99 prior); the warm-up matters
    for short runs and is inert after ~10k steps at 0.999.
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


@dataclasses.dataclass
class StateSpec:
    """What a trainer needs to build, shard and restore its state."""

    graphdef: Any
    shardings: Any  # NamedSharding tree matching the state dict
    abstract: Any  # ShapeDtypeStruct tree (with shardings) for restoring


def _state_builder(model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                   seed: int) -> Callable[[], dict]:
    """The function that builds the whole train state (traced abstractly or under jit, never eagerly)."""

    def build():
        with nnx.use_eager_sharding(False):
            model = build_pooled(model_fn, jax.random.fold_in(jax.random.key(seed), 1))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return {"params": params, "ema_params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32), "key": jax.random.key_data(jax.random.key(seed))}

    return build


def state_spec(model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation, mesh: Mesh,
               rules: sharding.Rules, seed: int = 0) -> StateSpec:
    """The train state's graphdef, shardings and sharded abstract tree, computed without allocating anything.

    The layout `init_state` builds the state in; also the restore target and the input of ahead-of-time
    compilation (`dalle_jax.aot`), where `mesh` may span devices this host does not have.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn), nnx.Param)
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules).to_pure_dict()
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(_state_builder(model_fn, optimizer, seed))
    # Optimizer moments mirror the params' shardings; scalars (counts) are replicated.
    opt_shardings = _like_params(abstract["opt_state"], abstract["params"], param_shardings, replicated)
    shardings = {"params": param_shardings, "ema_params": param_shardings, "opt_state": opt_shardings,
                 "step": replicated, "key": replicated}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateSpec(graphdef=graphdef, shardings=shardings, abstract=abstract)


def init_state(model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation, mesh: Mesh,
               rules: sharding.Rules, seed: int) -> tuple[dict, StateSpec]:
    """Builds the model born sharded, its optimizer state and EMA, all laid out by the logical rules."""
    spec = state_spec(model_fn, optimizer, mesh, rules, seed)
    with jax.set_mesh(mesh):
        state = jax.jit(_state_builder(model_fn, optimizer, seed), out_shardings=spec.shardings)()
    return state, spec


def _like_params(opt_state: Any, params: Any, param_shardings: Any, replicated: NamedSharding) -> Any:
    """Shardings for an optax state: any subtree shaped like the params gets the params' shardings."""
    params_structure = jax.tree.structure(params)

    def visit(node):
        if jax.tree.structure(node) == params_structure:
            return param_shardings
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax NamedTuple states
            return type(node)(*(visit(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(visit(child) for child in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return jax.tree.map(lambda _: replicated, node)

    return visit(opt_state)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, spec: StateSpec, mesh: Mesh,
                    rules: sharding.Rules, batch_sharding: Any, ema_decay: float, ema_warmup: bool = True,
                    microbatches: int = 1, prepare: Callable[[dict], dict] | None = None,
                    state_metrics: Callable[[dict], dict] | None = None
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """One jitted update: grads of `loss_fn`, optimizer step, EMA, step + 1. The state is donated.

    With `microbatches` k > 1 the batch is split into k interleaved microbatches (rows j, j+k, ...: each stays
    spread over every data-parallel device) and gradients are summed in a `lax.scan`, so memory holds one
    microbatch of activations. `loss_fn` must then return contributions that *sum* to the batch's loss and
    metrics: `prepare(batch)` runs first on the whole batch and can add the global normalisers it needs
    (e.g. token counts). Microbatch j gets the key fold_in(step key, j). The optimizer's update gets the loss
    as `value` (reduce_on_plateau reads it); `state_metrics(new_state)` adds metrics read off the state.
    """

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
        if prepare is not None:
            batch = prepare(batch)

        def loss_and_grads(params, micro, micro_key):
            def loss_of(p):
                model = nnx.merge(spec.graphdef, nnx.State(p))
                return loss_fn(model, micro, micro_key, state["step"])

            return jax.value_and_grad(loss_of, has_aux=True)(params)

        if microbatches == 1:
            (loss, metrics), grads = loss_and_grads(state["params"], batch, key)
        else:
            split = jax.tree.map(lambda x: _split_microbatches(x, microbatches), batch)

            def accumulate(total, xs):
                j, micro = xs
                value = loss_and_grads(state["params"], micro, jax.random.fold_in(key, j))
                return jax.tree.map(jnp.add, total, value), None

            zeros = jax.eval_shape(lambda: loss_and_grads(state["params"], jax.tree.map(lambda x: x[0], split), key))
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)
            ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), split))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"], value=loss)
        params = optax.apply_updates(state["params"], updates)
        decay = ema_decay_at(state["step"], ema_decay, ema_warmup)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params)
        grad_norm = optax.global_norm(grads)
        # A non-finite step (divergence, overflow) is skipped: parameters, optimizer state and EMA stay as they were,
        # so a checkpoint never holds non-finite values. `Loop` counts such steps and stops after a streak of them.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        params, ema, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, ema, opt_state),
                                              (state["params"], state["ema_params"], state["opt_state"]))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        new_state = {"params": params, "ema_params": ema, "opt_state": opt_state, "step": state["step"] + 1,
                     "key": state["key"]}
        if state_metrics is not None:
            metrics = {**metrics, **state_metrics(new_state)}
        return new_state, metrics

    jitted = jax.jit(step_fn, in_shardings=(spec.shardings, batch_sharding),
                     out_shardings=(spec.shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)

    def run(state: dict, batch: dict) -> tuple[dict, dict]:
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            return jitted(state, batch)

    def lower(state: Any, batch: Any) -> jax.stages.Lowered:
        """Traces and lowers the step for (abstract) `state` and `batch`; `.compile()` it for memory and cost."""
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            return jitted.lower(state, batch)

    run.jitted = jitted  # the jax.jit object itself (in/out shardings, donation)
    run.lower = lower
    return run


def _split_microbatches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) with microbatch j = rows j, j+k, ...; scalars are passed to every microbatch."""
    if x.ndim == 0:
        return jnp.broadcast_to(x, (k,))
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} does not split into {k} microbatches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def merged_model(spec: StateSpec, params: Any) -> nnx.Module:
    return nnx.merge(spec.graphdef, nnx.State(params))


class DivergenceError(DalleJaxError):
    """Training produced only non-finite steps for a while; nothing non-finite was saved."""


class NonfiniteSteps:
    """Counts the train step's skipped (non-finite) steps without a host sync per step.

    Each step's device-side flag is kept and read only where the loop syncs anyway (logging) or must know
    (before a checkpoint is written), so a streak is noticed at the next log or save; `diverged` is then true once
    `limit` consecutive steps were non-finite (skipped steps change nothing, so noticing later loses nothing).
    """

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.pending: list[tuple[int, Any, Any]] = []  # (step, nonfinite flag, metrics) not yet read
        self.streak, self.total, self.first_bad, self.last_bad = 0, 0, None, None

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics["nonfinite"], metrics))

    def settle(self) -> None:
        """Reads the pending flags (one transfer) and updates the streak and the total."""
        ready, self.pending = self.pending, []
        for (step, _, metrics), value in zip(ready, jax.device_get([f for _, f, _ in ready]), strict=True):
            if float(value) > 0:
                self.total += 1
                self.streak += 1
                self.first_bad = step if self.streak == 1 else self.first_bad
                self.last_bad = (step, metrics)
            else:
                self.streak = 0

    def diverged(self, settle: bool) -> bool:
        if settle:
            self.settle()
        return self.streak >= self.limit

    def message(self, last_checkpoint: int | None) -> str:
        step, metrics = self.last_bad
        values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in values.items())
        kept = (f"the last checkpoint, step {last_checkpoint}, is finite and kept" if last_checkpoint is not None
                else "no checkpoint was written")
        return (f"{self.name}: steps {self.first_bad}-{step} were all non-finite ({shown} at step {step}); those steps "
                f"were skipped and nothing non-finite was saved; {kept}. Lower the learning rate (or raise "
                f"{self.name}_train.max_nonfinite_steps) and rerun to resume")


@dataclasses.dataclass
class Loop:
    """Runs `steps` updates with checkpoints every `save_every`, logs every `log_every`, evals every `eval_every`."""

    run_dir: Path  # metrics.jsonl and TensorBoard events
    checkpoint_dir: Path
    steps: int
    save_every: int
    log_every: int
    eval_every: int
    keep: int = 3
    name: str = "train"
    max_nonfinite_steps: int = 10  # consecutive skipped (non-finite) steps before the run stops

    def run(self, state: dict, spec: StateSpec, train_step: Callable, batches: Any, *, to_device: Callable,
            batch_size: int, evaluate: Callable[[dict, int], dict] | None = None,
            extra_scalars: Callable[[int], dict] | None = None, progress: bool = True,
            tokens_per_example: int | None = None) -> dict:
        """Trains from the latest checkpoint (if any) to `steps`; returns the final state.

        `batches` must have get_state/set_state (the Grain pipeline); `to_device` turns a host batch into
        global arrays. `extra_scalars(step)` adds host-side values (schedules) to the logged metrics;
        `tokens_per_example` adds tokens_per_s.
        """
        from tqdm.auto import tqdm

        checkpoints = Checkpointer(self.checkpoint_dir, save_every=self.save_every, keep=self.keep)
        writer = MetricWriter(self.run_dir)
        restored = checkpoints.restore_latest(spec.abstract)
        start = 0
        if restored is not None:
            state, start = restored.state, int(restored.step)
            if restored.data_iterator:
                batches.set_state(restored.data_iterator)
            log.info("%s: resumed from step %d (%s)", self.name, start, self.checkpoint_dir)
        dropped = writer.drop_after(start)  # rows a crash or a fallback left beyond the checkpoint are redone
        if dropped:
            log.info("%s: dropped %d metrics rows after step %d (they will be logged again)", self.name, dropped,
                     start)
        bar = tqdm(total=self.steps, initial=start, desc=self.name, disable=not progress or jax.process_index() != 0,
                   dynamic_ncols=True)
        last_metrics: dict = {}
        window_start, window_steps = time.perf_counter(), 0
        step = start
        nonfinite = NonfiniteSteps(self.name, self.max_nonfinite_steps)
        try:
            with PreemptionGuard() as guard:
                while step < self.steps:
                    state, metrics = train_step(state, to_device(next(batches)))
                    step += 1
                    window_steps += 1
                    bar.update(1)
                    nonfinite.add(step, metrics)
                    if step % self.log_every == 0 or step == self.steps:
                        host_metrics = jax.device_get(metrics)  # waits for the steps, so the timing below is real
                        elapsed = time.perf_counter() - window_start
                        nonfinite.settle()
                        host_metrics.pop("nonfinite", None)
                        scalars = {**host_metrics, **(extra_scalars(step) if extra_scalars else {}),
                                   "nonfinite_steps": nonfinite.total,
                                   "examples_per_s": window_steps * batch_size / max(elapsed, 1e-9)}
                        if tokens_per_example:
                            scalars["tokens_per_s"] = scalars["examples_per_s"] * tokens_per_example
                        last_metrics = writer.scalars(step, scalars)
                        bar.set_postfix(loss=f"{last_metrics['loss']:.4f}")
                        window_start, window_steps = time.perf_counter(), 0
                    if evaluate is not None and (step % self.eval_every == 0 or step == self.steps):
                        last_metrics.update(writer.scalars(step, {f"eval/{k}": v for k, v in
                                                                  evaluate(state, step).items()}))
                    stop = guard.should_stop(step)  # multi-host: the same answer on every host (see PreemptionGuard)
                    saving = checkpoints.should_save(step) or step == self.steps or stop
                    if nonfinite.diverged(settle=saving):
                        checkpoints.wait()  # an async save in flight is finished before the message names it
                        raise DivergenceError(nonfinite.message(checkpoints.latest_step()))
                    if saving:
                        iterator_state = batches.get_state()
                        # Orbax writes JSON items from process 0 only and every host restores that copy. That is
                        # right because the Grain state is a position in the host-sliced stream, the same on every
                        # host; checked, since a per-host state would silently resume the others at host 0's rows.
                        distributed.check_same_on_all_hosts(iterator_state, "the data iterator state")
                        checkpoints.save(step, state, data_iterator=iterator_state,
                                         meta={"step": step, "time": time.time()}, force=True)
                    if stop:
                        log.warning("%s: stop requested (signal); saved step %d, exiting", self.name, step)
                        break
            checkpoints.wait()  # the last (async) save is on disk before the run reports success
        except BaseException:
            # Any error (divergence, a failed save, bad data, Ctrl-C twice): a save in flight is finished and
            # Orbax's threads are stopped before the error reaches the CLI, so nothing is left half-written and no
            # thread prints after the one error line.
            bar.close()
            with contextlib.suppress(OSError):  # the disk that refused the checkpoint may refuse the events too
                writer.close()
            checkpoints.abandon()
            raise
        bar.close()
        checkpoints.close()
        writer.close()
        distributed.barrier(f"dalle_jax_{self.name}_done")  # no host leaves while another still saves
        return {"state": state, "step": step, "metrics": last_metrics, "preempted": step < self.steps}


def load_trained(checkpoint_dir: Path, model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                 use_ema: bool = True) -> nnx.Module:
    """A trainer's model from its latest intact checkpoint, on one device (EMA weights by default).

    Orbax restores whole trees, so the abstract target is the full train state (params, EMA, optimizer state,
    step, key) rebuilt from the model and optimizer; the unused parts are dropped. Content fingerprints are
    checked as on resume, and a corrupt latest checkpoint falls back to the previous one.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with nnx.use_eager_sharding(False):
        graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn), nnx.Param)
    abstract = jax.eval_shape(lambda p: {"params": p, "ema_params": p, "opt_state": optimizer.init(p),
                                         "step": jnp.zeros((), jnp.int32),
                                         "key": jax.random.key_data(jax.random.key(0))},
                              abstract_params.to_pure_dict())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    if not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} does not exist: train that stage first")
    checkpoints = Checkpointer(Path(checkpoint_dir), save_every=1, keep=1, read_only=True)  # a reader: never saves
    try:
        restored = checkpoints.restore_latest(abstract)
    finally:
        checkpoints.close()
    if restored is None:
        raise FileNotFoundError(f"{checkpoint_dir} holds no finished checkpoint")
    params = restored.state["ema_params" if use_ema else "params"]
    check_finite(params, f"{checkpoint_dir}/{restored.step}")
    return nnx.merge(graphdef, nnx.State(params))


def check_finite(params: Any, where: str) -> None:
    """Refuses weights holding NaN or inf (a diverged run saved by an older version): they would sample noise."""
    # numpy on the host copy: a jnp reduction would compile one small program per parameter shape
    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params))
           if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all()]
    if bad:
        raise DivergenceError(f"checkpoint {where} holds non-finite weights ({', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run diverged; retrain "
                              "it with a lower learning rate")
