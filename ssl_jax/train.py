"""Pre-training, read top to bottom. Knows nothing method-specific: a method gives its network,
its state and its loss (``ssl_jax/methods``); this file does the rest.

  The update step, in named parts:  the method's loss and gradients, the optimizer, the EMA
                                    target, the online probe, keep-if-finite
  ``train_and_evaluate``, in order: 1. set-up (mesh, config, data, workdir)  2. model, method,
                                    optimizer, the jitted step  3. state (restore or init)
                                    4. writers, evaluators, monitors  5. before the first step
                                    6. the loop (step, log, score plots, profile, checkpoint,
                                    evals, preemption, finiteness)  7. the end
  Below it, the plain helpers it calls (signals, checkpoints, score plots, profile, outcome).

The plain helpers shared with the supervised trainer (durations, ``itstime``, the metric window,
the finiteness check) are in ``ssl_jax/utils.py``.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, data, methods, optim, paths, sharding, utils, writers
from ssl_jax.evals import collapse, evaluators, score_plots
from ssl_jax.ops import losses
from ssl_jax.state import TrainState, state_shardings


NonFiniteError = utils.NonFiniteError   # raised by the loop; re-exported for callers
NONFINITE_HINT = ('Lower --config.optimizer.base_lr, set --config.optimizer.grad_clip_norm, or '
                  'check the input.')


def _log(msg: str) -> None:
  """One line on the screen (process 0); other processes keep it in their log."""
  if jax.process_index() == 0:
    print(msg, flush=True)
  else:
    logging.info(msg)


def total_steps_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The run's length in steps (``utils.total_steps``)."""
  return utils.total_steps(config, steps_per_epoch)


# =============================================================================================
# The update step, in named parts (pure; the composed step is jit-compiled with the state
# donated)
# =============================================================================================
def loss_and_grads(method, state: TrainState, batch, rng, mesh):
  """The method's loss, its aux (``methods.base.LossAux``) and the gradients of the online
  parameters. One all-reduce of the gradients per step, however many times the network is
  applied (per-device parameter copies on a multi-device mesh; plain ``value_and_grad`` on one
  device)."""

  def loss_fn(params):
    ctx = method.context(params, target_params=state.target_params,
                         method_state=state.method_state, batch_stats=state.batch_stats,
                         step=state.step, rng=rng, mesh=mesh)
    return method.loss(ctx, batch)

  (loss, aux), grads = sharding.value_and_grad_reduced_once(loss_fn, state.params, has_aux=True,
                                                              mesh=mesh)
  return loss, aux, grads


def optimizer_update(tx, grads, params, opt_state):
  """``(new params, new optimizer state)`` after one step of ``tx``."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def ema_update(target_params, params, tau):
  """The EMA target after the optimizer step: ``t <- tau t + (1 - tau) p`` (BYOL, MoCo;
  equivalent to MSF's update-first order)."""
  return jax.tree.map(lambda t, p: tau * t + (1.0 - tau) * p, target_params, params)


def probe_update(probe, probe_tx, probe_params, probe_opt_state, features, labels):
  """One step of the online linear probe on stop-gradient features, labelled examples only
  (``labels >= 0``). Returns ``(params, opt_state, loss, top-1 on this batch)``."""
  feats = jax.lax.stop_gradient(features).astype(jnp.float32)
  labelled = labels >= 0

  def probe_loss(pp):
    logits = probe.apply(pp, feats)
    return losses.cross_entropy(logits, labels, labelled), logits

  (loss, logits), grads = jax.value_and_grad(probe_loss, has_aux=True)(probe_params)
  updates, probe_opt_state = probe_tx.update(grads, probe_opt_state, probe_params)
  probe_params = optax.apply_updates(probe_params, updates)
  top1 = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled) / jnp.maximum(
      jnp.sum(labelled), 1)
  return probe_params, probe_opt_state, loss, top1


def keep_if_finite(ok, new: TrainState, old: TrainState) -> TrainState:
  """``new`` where ``ok``, else ``old`` with ``new``'s step: a non-finite update never enters
  the state (the host stops at its next check)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old.replace(step=new.step))


def make_train_step(method, tx, probe, probe_tx, lr_fn, tau_fn, mesh):
  """Returns ``train_step(state, batch) -> (state, metrics, scores)``: the parts above, in order."""
  uses_target = method.uses_ema_target   # False: no EMA update, no tau (APS by default)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, aux, grads = loss_and_grads(method, state, batch, rng, mesh)
    grad_norm = optax.global_norm(grads)
    params, opt_state = optimizer_update(tx, grads, state.params, state.opt_state)
    tau = tau_fn(state.step)
    target = ema_update(state.target_params, params, tau) if uses_target else state.target_params
    probe_params, probe_opt_state, p_loss, p_top1 = probe_update(
        probe, probe_tx, state.probe_params, state.probe_opt_state, aux.features, batch['label'])
    new = state.replace(step=state.step + 1, params=params, batch_stats=aux.batch_stats,
                        target_params=target, opt_state=opt_state,
                        method_state=aux.method_state, probe_params=probe_params,
                        probe_opt_state=probe_opt_state)
    # Every loss of the step is guarded, the probe's too.
    finite = {'finite/loss': jnp.isfinite(loss), 'finite/grad_norm': jnp.isfinite(grad_norm),
              'finite/online_probe/train_loss': jnp.isfinite(p_loss)}
    new = keep_if_finite(finite['finite/loss'] & finite['finite/grad_norm']
                         & finite['finite/online_probe/train_loss'], new, state)
    metrics = dict(aux.metrics)
    if uses_target:
      metrics['tau'] = tau
    metrics.update({'loss': loss, 'lr': lr_fn(state.step), 'grad_norm': grad_norm,
                    'online_probe/train_loss': p_loss, 'online_probe/train_top1': p_top1,
                    **finite})
    return new, metrics, aux.scores

  return train_step


def make_feature_fn(method, probe):
  """Eval-mode forward for the evaluators: L2-normalised backbone features and the probe's
  logits (``evals.features.frozen_feature_fn``, which ``--mode=eval`` uses too)."""
  return evaluators.make_feature_fn(
      lambda v, images: method.model.apply(v, images, train=False, with_predictor=False), probe)


class Parts(NamedTuple):
  """What a run is made of, reusable outside ``train_and_evaluate`` (tests, multi-host checks)."""
  method: Any
  probe: nn.Module
  init: Callable          # jitted: rng -> TrainState, placed with ``shardings``
  train_step: Callable    # jitted, state donated: (state, global batch) -> (state, metrics, scores)
  abstract: Any           # TrainState of ShapeDtypeStructs carrying their shardings
  shardings: Any
  replicas: int = 1       # > 1: every leaf and the batch have a leading replica axis


def build(config: ml_collections.ConfigDict, mesh, method, *, steps_per_epoch: int,
          total_steps: int) -> Parts:
  """Optimizer, schedules, state initialiser and the jitted train step for ``config``."""
  lr_fn = optim.lr_schedule(config, steps_per_epoch, total_steps)
  tau_fn = optim.ema_schedule(config, total_steps)
  tx = optim.make_optimizer(config, lr_fn)
  probe_tx = optim.probe_optimizer(config)
  probe = nn.Dense(config.data.num_classes, name='probe')

  def init_state(rng) -> TrainState:
    r_model, r_method, r_probe, r_base = jax.random.split(rng, 4)
    variables = method.init_variables(r_model)
    params = variables['params']
    feat_dim = jax.eval_shape(
        lambda: method.model.apply(variables, method.sample_input(), train=False,
                                   with_predictor=False))['features'].shape[-1]
    probe_params = probe.init(r_probe, jnp.zeros((1, feat_dim), jnp.float32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      target_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      method_state=method.init_state(r_method), probe_params=probe_params,
                      probe_opt_state=probe_tx.init(probe_params), rng=r_base)

  step_fn = make_train_step(method, tx, probe, probe_tx, lr_fn, tau_fn, mesh)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    shardings = state_shardings(abstract, mesh, method.state_specs())
  replicas = num_replicas(config)
  if replicas > 1:   # a leading replica axis on every leaf, the step mapped over it
    init_state, step_fn = jax.vmap(init_state), replicated_step(step_fn, replica_program(config))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), shardings)
    with jax.set_mesh(mesh):
      abstract = jax.eval_shape(init_state, initial_keys(config))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(shardings, None, None))
  return Parts(method, probe, jax.jit(init_state, out_shardings=shardings), train_step,
               abstract, shardings, replicas)


# =============================================================================================
# Replicas: seeds as a batch dimension
# =============================================================================================
def num_replicas(config) -> int:
  """``config.replicas`` (1 when absent: configs from before the field)."""
  return int(config.get('replicas', 1))


def initial_keys(config) -> jax.Array:
  """The init key of the run: ``key(seed)``, or ``[key(seed + r) for r < replicas]`` (replica
  r starts exactly as a single run with seed ``seed + r``)."""
  replicas = num_replicas(config)
  if replicas == 1:
    return jax.random.key(config.seed)
  return jax.vmap(jax.random.key)(config.seed + jnp.arange(replicas))


def check_replicas_fit(config, mesh, parts: Parts, *, available_bytes: int | None = None
                       ) -> Parts:
  """Compile a replicas run's step once, before anything is written, and stop with one line
  when XLA's memory estimate for it exceeds what a device has; return ``parts`` with the
  compiled step (so the run compiles it once). ``available_bytes``: the device's memory
  (default: ``memory_stats()['bytes_limit']``, or this host's RAM split over its devices for
  the CPU backend, which reports none). A plain run (one replica) is returned unchanged."""
  if parts.replicas == 1:
    return parts
  views = data.synthetic.train_batch(config.data, 1, 0)   # the batch's keys, dtypes, shapes
  batch_sharding = NamedSharding(mesh, P(None, sharding.DATA))
  batch = {k: jax.ShapeDtypeStruct((parts.replicas, config.batch_size, *v.shape[1:]), v.dtype,
                                   sharding=batch_sharding) for k, v in views.items()}
  compiled = parts.train_step.lower(parts.abstract, batch).compile()
  mem = compiled.memory_analysis()
  need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else 0
  have = available_bytes or _device_memory_bytes()
  if need and have and need > 0.9 * have:
    gib = 2.0 ** 30
    fit = max(int(0.9 * have / (need / parts.replicas)), 0)
    raise config_lib.ConfigError(
        f'replicas={parts.replicas}: the step needs about {need / gib:.1f} GiB per device '
        f'(XLA\'s estimate for the compiled step, {need / gib / parts.replicas:.2f} GiB per '
        f'replica), more than the {have / gib:.1f} GiB a device has; accepted: replicas <= '
        f'{fit}, or a smaller batch_size')
  return parts._replace(train_step=compiled)


def _device_memory_bytes() -> int | None:
  """Memory of one local device: its ``bytes_limit``, or for CPU this host's RAM divided over
  its local devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None
  return ram // max(jax.local_device_count(), 1)


def replica_program(config) -> str:
  """``config.replica_program``, with ``'auto'`` resolved: ``'unroll'`` on the CPU backend
  (measured 1.6x faster than vmap there: vmapped convolutions become grouped ones) for up to
  ``config_lib.UNROLL_MAX_REPLICAS`` replicas (one compiled copy of the step each), else
  ``'vmap'`` (GPU/TPU, or more replicas)."""
  program = config.get('replica_program', 'auto')
  if program == 'auto':
    cpu = jax.default_backend() == 'cpu'
    return ('unroll' if cpu and num_replicas(config) <= config_lib.UNROLL_MAX_REPLICAS
            else 'vmap')
  return program


def replicated_step(step_fn: Callable, program: str = 'vmap') -> Callable:
  """``step_fn`` mapped over a leading replica axis of the state and the batch.

  ``program='vmap'``: ``jax.vmap(step_fn)``, one batched computation (every op gains the
  replica axis). ``'unroll'``: ``step_fn`` written once per replica on its slice and the
  results stacked, one program with S copies of the one-seed step (dense convolutions; S times
  the compile). Replica r computes exactly what ``step_fn`` computes on its slice. A replica whose update is
  non-finite is frozen from then on: it keeps its whole state, its ``step`` included, and a
  replica whose ``step`` is behind the others' takes no further update (so the one that
  diverged at step s holds its state after step s - 1, to the end of the run and in every
  checkpoint). The others go on unaffected.
  """

  def step(state: TrainState, batch):
    if program == 'unroll':
      outs = [step_fn(*jax.tree.map(lambda x, r=r: x[r], (state, batch)))
              for r in range(state.step.shape[0])]
      new, metrics, scores = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    else:
      new, metrics, scores = jax.vmap(step_fn)(state, batch)
    ok = state.step == jnp.max(state.step)   # not frozen before this step
    for key, flag in metrics.items():
      if key.startswith('finite/'):
        ok &= flag
    new = jax.tree.map(
        lambda n, o: jnp.where(ok.reshape(ok.shape + (1,) * (n.ndim - 1)), n, o), new, state)
    return new, metrics, scores

  return step


# =============================================================================================
# The whole run
# =============================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       stop_at_step: int | None = None) -> dict[str, Any]:
  """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); return final metrics.

  ``stop_at_step``: checkpoint and return at that step, as a preemption would (for jobs with a
  wall-clock limit; the next run resumes there with the same batches and random numbers).

  One function, long on purpose: the whole run in execution order, as big_vision's trainer is
  written, so a reader follows it top to bottom without jumping into callbacks.
  """
  with _PreemptionNotice() as notice:
    # ------------------------------------------------------------------ 1. set-up
    # The dataset is found, or the run stops, before the workdir is written.
    mesh = sharding.make_mesh(utils.optional(config.num_devices))
    n_dev = mesh.shape[sharding.DATA]
    validate_config(config, num_devices=n_dev, process_count=jax.process_count())
    t0 = time.time()
    _log(f'Reading {config.data.name} ({config.data.train_split} / {config.data.eval_split})...')
    steps_per_epoch = data.steps_per_epoch(config.data, config.batch_size)
    data.check_same_classes(config.data, config.data.train_split, config.data.eval_split)
    total_steps = utils.total_steps(config, steps_per_epoch)
    if num_replicas(config) > 1:   # the memory check compiles the step before any file exists
      _log(f'Compiling the step of {num_replicas(config)} replicas '
           f'({replica_program(config)}) to check its memory...')
      method = methods.get(config.method.name)(config, steps_per_epoch)
      parts = check_replicas_fit(config, mesh, build(
          config, mesh, method, steps_per_epoch=steps_per_epoch, total_steps=total_steps))
    ckpt_lib.check_workdir_config(workdir, config, allow_config_change=allow_config_change)
    done = ckpt_lib.checkpoint_steps(workdir)
    if done and done[-1] >= total_steps:
      return _already_complete(workdir, done[-1], total_steps)

    # ------------------------------------------------------------------ 2. model, method, step
    _log(f'Input ready ({time.time() - t0:.0f} s); building {config.method.name} / '
         f'{config.model.backbone} and its train state...')
    if num_replicas(config) == 1:
      method = methods.get(config.method.name)(config, steps_per_epoch)
      parts = build(config, mesh, method, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps)
    with jax.set_mesh(mesh):
      ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
      try:
        # -------------------------------------------------------------- 3. state
        state = _restore_or_init(ckpt, parts, config)
        start_step = int(np.max(jax.device_get(state.step)))   # frozen replicas lag behind
        return _train_loop(config, workdir, mesh, parts, ckpt, state, notice,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           start_step=start_step, stop_at_step=stop_at_step)
      finally:
        ckpt.close()


def _train_loop(config, workdir, mesh, parts, ckpt, state, notice, *, steps_per_epoch: int,
                total_steps: int, start_step: int, stop_at_step: int | None) -> dict[str, Any]:
  """Sections 4-7 of :func:`train_and_evaluate` (its second half, under the mesh and the open
  checkpointer). Long on purpose: the loop is written inline, in the order it runs."""
  # -------------------------------------------------------------------- 4. writers, evaluators
  n_dev = mesh.shape[sharding.DATA]
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  feature_fn = jax.jit(make_feature_fn(parts.method, parts.probe))
  evals = evaluators.from_config(config, feature_fn=feature_fn, mesh=mesh,
                                 steps_per_epoch=steps_per_epoch)
  # Per replica (one for a plain run): writers, score plots, collapse monitors, frozen replicas.
  reps = _Replicas(config, workdir, writer, state, steps_per_epoch, total_steps)
  profile = _Profile(config, workdir, start_step, total_steps)
  saver = _Saver(ckpt, config, steps_per_epoch, last_saved=start_step if start_step else None)
  results: dict[str, Any] = {'start_step': start_step, 'loss_history': []}

  def run_evals(step, state, which):
    return reps.evaluate(step, state, which, results)

  # -------------------------------------------------------------------- 5. before the first step
  n_params = sum(x.size for x in jax.tree.leaves(state.params)) // reps.n
  _log(f'{config.method.name} | {config.model.backbone} ({n_params / 1e6:.2f}M params) | '
       f'{data.describe(config.data)} | global batch {config.batch_size} on {n_dev} device(s), '
       f'{jax.process_count()} host(s) | {total_steps} steps ({steps_per_epoch}/epoch)'
       + reps.describe())
  skipped = data.num_skipped(config.data, config.data.train_split)
  if skipped:  # named one by one in the warnings above; counted in the run's own record
    _log(f'WARNING: {skipped} undecodable training image(s) skipped (data/skipped_files).')
  writer.write_scalars(start_step, {'data/skipped_files': skipped})
  # TensorBoard's Text tab: the whole config of this run (each start, so a changed resume shows).
  writer.write_texts(start_step, {'config': '```\n' + json.dumps(
      ckpt_lib.config_to_dict(config), indent=2, sort_keys=True) + '\n```'})
  if start_step == 0 and any(ev.at_start for ev in evals):
    results['untrained'] = run_evals(0, state, [e for e in evals if e.at_start])
  if notice.received:  # the notice came during start-up (compile, initial evals)
    line = (f'Stopping before the first step of this run (step {start_step}, '
            f'{notice.received}): nothing new to save. Rerun the same command to continue.')
    _log(line)
    reps.close()
    return dict(results, preempted_at=start_step, state=state, final_line=line)

  # -------------------------------------------------------------------- 6. the loop
  # Steps are 1-based: ``step`` steps are done after the update. ``finite/*`` flags are checked
  # one step late (the check then never stalls the device), and before anything reads the state
  # (log, checkpoint, evals, a stop): a non-finite state is never saved.
  batches = _global_batches(config, mesh, start_step)
  window = utils.Window(start_step, config.log_every_steps)
  ckpt_every = int(config.checkpoint.every_steps)

  def check(step, metrics):
    reps.check_finite(step, metrics, lambda: kept_checkpoint_text(ckpt))

  t_start = time.time()
  pending, step, stopped = None, start_step, None
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    if step == start_step + 1:
      _log('compiling the train step...')
      t_compile = time.time()
      state, metrics, scores = parts.train_step(state, batch)
      jax.block_until_ready(metrics)
      _log(f'first step compiled in {time.time() - t_compile:.0f} s')
      window.restart_clock(step)
    else:
      state, metrics, scores = parts.train_step(state, batch)
    if pending is not None:   # the previous step's flags: ready by now, no stall
      check(*pending)
    pending = (step, metrics)
    window.add(step, metrics)
    saving = utils.itstime(step, ckpt_every, total_steps)
    due_evals = [ev for ev in evals if utils.itstime(step, ev.every, total_steps, last=False,
                                                     skip_last=True)]
    logging_now = utils.itstime(step, config.log_every_steps, total_steps)
    if logging_now or saving or due_evals:
      check(step, metrics)
    if logging_now:
      avg, host, partial = window.flush(step)
      reps.log_window(step, avg, host, partial, results=results, n_dev=n_dev)
    profile(step, state)
    reps.plot(step, scores)
    if saving:
      saver.save(step, state)
    for ev in due_evals:
      run_evals(step, state, [ev])
    stopped = _stop_reason(notice, step, stop_at_step, ckpt)
    if stopped:
      check(step, metrics)
      break
  else:
    if pending is not None:
      check(*pending)

  # -------------------------------------------------------------------- 7. the end
  if stopped:
    line = f'Stopping at step {step} ({stopped}): saving a checkpoint and exiting.'
    _log(line)
    saver.save(step, state, force=True)
    ckpt.wait()
    ckpt.require_saved(step)
    reps.close()
    return dict(results, preempted_at=step, state=state, final_line=line)
  train_time_s = time.time() - t_start
  ckpt.wait()
  ckpt.require_saved(step)   # never exit 0 with the last save missing
  final = [ev for ev in evals if ev.at_end]
  if final:
    _log(f'Final evaluation at step {step}: {", ".join(ev.name for ev in final)}...')
    results['final'] = run_evals(step, state, final)
  reps.close()   # on a gs:// workdir: the last events are uploaded now
  results.update(final_step=step, train_time_s=train_time_s, state=state)
  reps.end(results)   # collapse warnings; per-replica values and frozen replicas, if any
  results['final_line'] = f'Finished {step} steps.'
  if 'final' in results:
    results['final_line'] = evaluators.final_line(
        evals, step, results['final'], results.get('untrained'),
        replicas=reps.live_values(results.get('final_replicas')),
        untrained_replicas=reps.live_values(results.get('untrained_replicas')))
    _log(results['final_line'])
  if results.get('frozen_replicas'):
    _log(reps.frozen_line())
  reps.write_results(workdir, results)
  _log(_summary_block(config, workdir))
  return results


# =============================================================================================
# What the run calls
# =============================================================================================
def _restore_or_init(ckpt, parts: Parts, config) -> TrainState:
  restored = ckpt.restore_latest(parts.abstract)
  if restored is None:
    return parts.init(initial_keys(config))
  state, meta = restored
  _log(f'Resumed from {ckpt.directory}/{meta["step"]} (epoch {meta["epoch"]:.2f}).')
  return state


def _global_batches(config, mesh, start_step: int) -> Iterator:
  """Global batches on the mesh from ``start_step`` on; the synthetic source's one batch is
  placed once and stays on device (no input cost). With replicas, replica r's batches are
  those of a single run with seed ``seed + r`` (its data order and augmentation), stacked on a
  leading replica axis."""
  seeds = [config.seed + r for r in range(num_replicas(config))]
  local = [data.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count()) for seed in seeds]
  place = ((lambda bs: sharding.global_batch(mesh, bs[0])) if len(seeds) == 1 else
           (lambda bs: sharding.replica_batch(mesh, bs)))
  if data.synthetic.is_synthetic(config.data):
    batch = place([next(it) for it in local])
    while True:
      yield batch
  for bs in zip(*local):
    yield place(list(bs))


def evaluate(step: int, state, which, writer) -> dict[str, float]:
  """Run the evaluators ``which`` on ``state``; each ``(name, value)`` is logged and written.
  (Each evaluator holds the feature function it was built with.)"""
  out: dict[str, float] = {}
  for ev in which:
    t0 = time.time()
    res = dict(ev.run(_eval_variables(state)))
    writer.write_scalars(step, res)
    _log(f'[eval {ev.name} @ step {step}] '
         + ' | '.join(f'{k} {100 * v:.2f}%' for k, v in res.items())
         + f' ({time.time() - t0:.0f}s)')
    out.update(res)
  return out


def _eval_variables(state) -> dict[str, Any]:
  return {'params': state.params, 'batch_stats': state.batch_stats, 'probe': state.probe_params}


def _log_window(step: int, avg: dict[str, Any], host: list, partial: bool, *, results,
                writer, collapse_monitor, n_dev: int, batch_size: int, steps_per_epoch: int,
                total_steps: int, label: str = '') -> None:
  """One log window: the run's record, TensorBoard (full windows only), the collapse check and
  one line on the screen."""
  results['loss_history'].extend((s, float(np.mean(m['loss']))) for s, m in host)
  sps, per_device = avg['steps_per_sec'], batch_size / n_dev
  avg.update({'images_per_sec_per_device': sps * per_device, 'epoch': step / steps_per_epoch})
  warning = collapse_monitor.update(step, avg) if collapse_monitor is not None else None
  if warning:
    _log(warning)
  # After a resume from step s off the log grid, the first window holds only steps s+1..step:
  # it is not written, so no TensorBoard step carries two different values (the uninterrupted
  # run's full window may already be there).
  if not partial:
    writer.write_scalars(step, avg)
  # The first window after compilation may hold no timed step: no speed, no ETA yet.
  eta = utils.hms((total_steps - step) / sps) if sps > 0 else '--'
  tau = f'tau {avg["tau"]:.4f} | ' if 'tau' in avg else ''
  loss = label or f'loss {avg["loss"]:.4f} | probe top-1 {100 * avg["online_probe/train_top1"]:.1f}%'
  _log(f'step {step}/{total_steps} ({100 * step / total_steps:.0f}%) | {loss} | '
       f'lr {avg["lr"]:.4g} | {tau}{sps:.2f} steps/s, {sps * per_device:.0f} img/s/device | '
       f'ETA {eta}' + (' | partial window after resume: not logged to TensorBoard' if partial
                       else ''))
  results['last_metrics'] = avg


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value) of ``values``."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


class _Replicas:
  """What the host keeps per replica: a plain run is one replica, written as always (no
  ``replica_*`` folders). With ``replicas = S > 1``, replica r has its own TensorBoard run
  ``WORKDIR/replica_r/`` (curves overlay), score plots in ``WORKDIR/replica_r/score_plots/``
  and collapse monitor; ``WORKDIR`` itself gets the mean over the replicas that are not frozen
  (and ``<metric>_std`` for evaluator values). A replica whose step is non-finite is frozen
  (``replicated_step``): named once on the screen, left out of every mean from then on, and
  reported at the end; the run stops only when every replica is frozen."""

  def __init__(self, config, workdir, writer, state, steps_per_epoch: int, total_steps: int):
    self.config, self.n = config, num_replicas(config)
    self.spe, self.total = steps_per_epoch, total_steps
    self.root = writer
    dirs = [workdir] if self.n == 1 else [paths.join(workdir, f'replica_{r}')
                                          for r in range(self.n)]
    self.writers = [writer] if self.n == 1 else [
        writers.create(d, just_logging=jax.process_index() > 0) for d in dirs]
    self.plots = [_ScorePlots(config, d, w, steps_per_epoch, total_steps)
                  for d, w in zip(dirs, self.writers)]
    self.monitors = [collapse.CollapseMonitor() for _ in range(self.n)]
    self.values_at: dict[int, dict[str, list[float]]] = {}
    # A resumed run: replicas whose step lags were frozen before (at their step + 1).
    steps = np.atleast_1d(jax.device_get(state.step))
    self.frozen = {r: int(s) + 1 for r, s in enumerate(steps) if s < steps.max()}
    self._take = jax.jit(lambda tree, r: jax.tree.map(lambda x: x[r], tree))

  def describe(self) -> str:
    if self.n == 1:
      return ''
    seeds = f'{self.config.seed}..{self.config.seed + self.n - 1}'
    frozen = f', frozen: {sorted(self.frozen)}' if self.frozen else ''
    return f' | {self.n} replicas (seeds {seeds}, {replica_program(self.config)}{frozen})'

  def live(self) -> list[int]:
    return [r for r in range(self.n) if r not in self.frozen]

  def check_finite(self, step: int, metrics, kept: Callable[[], str]) -> None:
    """A plain run stops on a non-finite step (``utils.check_finite``); a replica is frozen and
    named, and the run stops when none is left."""
    if self.n == 1:
      utils.check_finite(step, metrics, kept, NONFINITE_HINT)
      return
    flags = jax.device_get({k: v for k, v in metrics.items() if k.startswith('finite/')})
    for r in self.live():
      bad = [k[len('finite/'):] for k, v in flags.items() if not bool(v[r])]
      if bad:
        self.frozen[r] = step
        _log(f'WARNING: replica {r} (seed {self.config.seed + r}): {bad[0]} is NaN or Inf at '
             f'step {step}; it is frozen at its state after step {step - 1} and left out of '
             'the means; the other replicas go on.')
    if not self.live():
      raise NonFiniteError(f'every replica is NaN or Inf (the last at step {step}); stopping. '
                           f'{kept()} {NONFINITE_HINT}')

  def log_window(self, step: int, avg, host, partial: bool, *, results, n_dev: int) -> None:
    kw = dict(n_dev=n_dev, batch_size=self.config.batch_size, steps_per_epoch=self.spe,
              total_steps=self.total)
    if self.n == 1:
      _log_window(step, avg, host, partial, results=results, writer=self.root,
                  collapse_monitor=self.monitors[0], **kw)
      return
    live = self.live()
    sps = avg.pop('steps_per_sec')
    per = [{k: float(v[r]) for k, v in avg.items()} | {'steps_per_sec': sps}
           for r in range(self.n)]
    for r in live:   # each replica's TensorBoard run and collapse monitor (screen: warnings)
      warning = self.monitors[r].update(step, per[r])
      if warning:
        _log(f'replica {r}: {warning}')
      if not partial:
        self.writers[r].write_scalars(step, per[r])
    mean = {k: float(np.mean([per[r][k] for r in live])) for k in avg} | {'steps_per_sec': sps}
    losses = [per[r]['loss'] for r in live]
    label = (f'loss {np.mean(losses):.4f} ± {np.std(losses, ddof=1) if len(live) > 1 else 0:.4f}'
             f' ({len(live)} replicas) | probe top-1 '
             f'{100 * mean["online_probe/train_top1"]:.1f}%')
    host = [(s, {'loss': np.mean(np.asarray(m['loss'])[live])}) for s, m in host]
    _log_window(step, mean, host, partial, results=results, writer=self.root,
                collapse_monitor=None, label=label, **kw)
    results['last_metrics_replicas'] = per

  def plot(self, step: int, scores) -> None:
    if self.n == 1:
      self.plots[0](step, scores)
      return
    for r in self.live():
      self.plots[r](step, self._take(scores, r) if self.plots[r].due(step) else None)

  def evaluate(self, step: int, state, which, results) -> dict[str, float]:
    """Each evaluator on each replica (its own TensorBoard run); the screen and ``WORKDIR`` get
    the mean ± std (ddof=1) over the live replicas, with the per-replica values."""
    if self.n == 1:
      return evaluate(step, state, which, self.root)
    del results
    out: dict[str, float] = {}
    values: dict[str, list[float]] = {}
    variables = [self._take(_eval_variables(state), r) for r in range(self.n)]
    live = self.live()
    for ev in which:
      t0 = time.time()
      per = []
      for r in range(self.n):
        res = dict(ev.run(variables[r]))
        self.writers[r].write_scalars(step, res)
        per.append(res)
      parts = []
      for k in per[0]:
        values[k] = [p[k] for p in per]
        mean, std = mean_std([values[k][r] for r in live])
        out[k] = mean
        self.root.write_scalars(step, {k: mean, f'{k}_std': std})
        parts.append(f'{k} {100 * mean:.2f} ± {100 * std:.2f}% (replicas '
                     + ' / '.join(f'{100 * v:.2f}' for v in values[k]) + ')')
      _log(f'[eval {ev.name} @ step {step}] ' + ' | '.join(parts)
           + f' ({time.time() - t0:.0f}s)')
    self.values_at[step] = values
    return out

  def end(self, results) -> None:
    """The run's record: collapse warnings (a list per replica with replicas), per-replica
    evaluator values, frozen replicas; a run that ended collapsed says so."""
    for r in self.live():
      m = self.monitors[r]
      if m.collapsing:
        last = results['last_metrics'] if self.n == 1 else results['last_metrics_replicas'][r]
        who = '' if self.n == 1 else f'replica {r}: '
        _log(f'WARNING: {who}the run ended collapsed (first flagged at step '
             f'{m.warned_steps[-1]}): {collapse.describe(last)}.')
    results['collapse_warnings'] = (list(self.monitors[0].warned_steps) if self.n == 1 else
                                    [list(m.warned_steps) for m in self.monitors])
    if self.n == 1:
      return
    results.update(replicas=self.n, seeds=[self.config.seed + r for r in range(self.n)],
                   replica_program=replica_program(self.config), frozen_replicas=dict(self.frozen), live_replicas=self.live())
    if 'final' in results:
      results['final_replicas'] = self.values_at[results['final_step']]
      results['final_std'] = {k: mean_std([v[r] for r in self.live()])[1]
                              for k, v in results['final_replicas'].items()}
    if 0 in self.values_at:
      results['untrained_replicas'] = self.values_at[0]

  def write_results(self, workdir: str, results) -> None:
    """``WORKDIR/results.json`` of a replicas run (process 0): per metric the mean and std
    (ddof=1) over the live replicas and every replica's value, at the start and the end."""
    if self.n == 1 or jax.process_index() != 0:
      return
    keys = ('replicas', 'seeds', 'replica_program', 'frozen_replicas', 'live_replicas', 'final_step', 'final',
            'final_std', 'final_replicas', 'untrained', 'untrained_replicas', 'final_line')
    record = {k: results[k] for k in keys if k in results}
    record['frozen_replicas'] = {str(r): s for r, s in self.frozen.items()}
    record['std'] = 'sample standard deviation over the live replicas (ddof=1)'
    paths.write_json(paths.join(workdir, 'results.json'), record)

  def live_values(self, values: dict[str, list[float]] | None):
    """``values`` of the replicas that are not frozen (None stays None)."""
    return None if values is None else {k: [v[r] for r in self.live()] for k, v in values.items()}

  def frozen_line(self) -> str:
    named = ', '.join(f'replica {r} (seed {self.config.seed + r}) at step {s}'
                      for r, s in sorted(self.frozen.items()))
    return (f'WARNING: {len(self.frozen)} of {self.n} replicas went NaN or Inf and were frozen: '
            f'{named}; the numbers above are over the other {len(self.live())}.')

  def close(self) -> None:
    for w in {id(w): w for w in [self.root, *self.writers]}.values():
      w.close()


class _Saver:
  """Checkpoints with the step, epoch and config in the meta; a step this run already saved
  (or resumed from) is not saved twice."""

  def __init__(self, ckpt, config, steps_per_epoch: int, *, last_saved: int | None):
    self.ckpt, self.steps_per_epoch, self.last_saved = ckpt, steps_per_epoch, last_saved
    self.config_meta = ckpt_lib.config_meta(config)   # in every checkpoint's meta

  def save(self, step: int, state, *, force: bool = False) -> None:
    if step == self.last_saved:
      return
    self.ckpt.save(step, state, {'step': step, 'epoch': step / self.steps_per_epoch,
                                 **self.config_meta}, force=force)
    self.last_saved = step


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    process_count: int = 1) -> None:
  """Every field the trainer reads (``config_lib.validate``), the method's own fields and the
  listed evaluators; ``ConfigError`` names the key, the value and what is accepted."""
  config_lib.validate(config, num_devices=num_devices, process_count=process_count)
  methods.get(config.method.name).validate_config(config)
  evaluators.validate(config)


def _already_complete(workdir: str, step: int, total_steps: int) -> dict[str, Any]:
  """A rerun of a finished run: say so with its final line (outcome.json), write nothing."""
  final_line = ''
  try:
    outcome = paths.read_json(paths.join(workdir, 'outcome.json'))
    if outcome.get('status') == 'done' and outcome.get('step') == step:
      final_line = outcome.get('final_line', '')
  except Exception:  # noqa: BLE001 — no outcome.json (a run from before it existed)
    pass
  _log(f'Already complete: {workdir} holds the final checkpoint (step {step} of {total_steps}); '
       'nothing to train. For other numbers, run an evaluation mode on it (--mode=eval, linear).')
  if final_line:
    _log(final_line)
  return {'final_step': step, 'already_complete': True, 'final_line': final_line}


class _PreemptionNotice:
  """SIGTERM (a preemption notice) or a first Ctrl-C (SIGINT) sets ``received``; installed for
  the whole run, so a notice during compilation or the start-up evals is seen too (the loop
  checkpoints and exits 0). A second Ctrl-C exits at once with code 130 (``os._exit``)."""

  def __init__(self):
    self.received = None    # None, or 'preemption notice (SIGTERM)' / 'Ctrl-C (SIGINT)'
    self._old = {}

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = 'preemption notice (SIGTERM)'

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.received:   # at once: no exception that library code on the stack could swallow
      print('Interrupted: Ctrl-C: exiting at once, nothing saved since the last checkpoint; '
            'rerun the same command to resume', file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    self.received = 'Ctrl-C (SIGINT)'
    _log('Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: exit at once, '
         'nothing saved).')

  def __enter__(self):
    if _main_thread():
      self._old = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                   signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def kept_checkpoint_text(ckpt) -> str:
  """For the NaN error: the last good checkpoint (after the pending save finishes), or none."""
  ckpt.wait()  # finish the last good save; nothing after it is written
  good = ckpt.steps()
  return (f'The last good checkpoint ({ckpt.directory}/{good[-1]}) is kept.' if good else
          'No checkpoint was written before it (a rerun starts fresh).')


def _stop_reason(notice, step: int, stop_at_step: int | None, ckpt) -> str | None:
  if notice.received:
    return notice.received
  if step == stop_at_step or ckpt.manager.reached_preemption(step):
    return 'stop requested'
  return None


class _ScorePlots:
  """The FT paper's pos/neg score distributions: TensorBoard histograms every
  ``score_hist_every_steps``, and one PNG per epoch (and one at the end of a run that ends
  mid-epoch) in ``WORKDIR/score_plots/``. Methods without scores return none."""

  def __init__(self, config, workdir, writer, steps_per_epoch: int, total_steps: int):
    self.config, self.workdir, self.writer = config, workdir, writer
    self.spe, self.total = steps_per_epoch, total_steps
    self.plotted_epoch = -1

  def _now(self, step: int) -> tuple[bool, bool]:
    """(histograms due, PNG due) at ``step``."""
    every = self.config.score_hist_every_steps
    hist_now = every > 0 and step % every == 0
    plot_now = step % self.spe == 0 or (step == self.total
                                         and self.plotted_epoch < step // self.spe)
    return hist_now, plot_now

  def due(self, step: int) -> bool:
    return any(self._now(step))

  def __call__(self, step: int, scores) -> None:
    hist_now, plot_now = self._now(step)
    if not (hist_now or plot_now):
      return
    host = {k: np.asarray(v).ravel() for k, v in
            multihost_utils.process_allgather(scores, tiled=True).items()}
    if hist_now:
      self.writer.write_histograms(step, {f'scores/{k}': v for k, v in host.items()})
    if plot_now and jax.process_index() == 0 and {'pos', 'neg'} <= set(host):
      self.plotted_epoch = epoch = step // self.spe
      name = f'epoch_{epoch:04d}.png' if step % self.spe == 0 else f'step_{step:07d}.png'
      title = (f'{self.config.method.name}: pos/neg cosine scores, epoch {step / self.spe:.2f}'
               f' (step {step})')
      score_plots.write_score_plot(paths.join(self.workdir, 'score_plots', name), host['pos'],
                                   host['neg'], title)
      # The same picture in TensorBoard's Images tab.
      self.writer.write_images(step, {'scores/distribution': score_plots.render_score_plot(
          host['pos'], host['neg'], title)[None]})


class _Profile:
  """``config.profile_steps`` steps traced with ``jax.profiler`` into
  ``WORKDIR/plugins/profile/<run>/`` (TensorBoard's profile tab), from step
  ``config.profile_start_step`` (-1: the 5th step of this run, after compilation). The profiler
  writes through its own file layer, so on a gs:// workdir it writes into a local
  ``paths.Mirror`` that is uploaded when the trace stops. Every process traces its own host."""

  def __init__(self, config, workdir: str, start_step: int, total_steps: int):
    n = int(config.get('profile_steps', 0))
    first = int(config.get('profile_start_step', -1))
    first = start_step + 5 if first < 0 else first
    self.first, self.last = first, min(first + n - 1, total_steps)
    self.on = n > 0 and start_step < first <= total_steps
    if n > 0 and not self.on:
      _log(f'WARNING: no profile: profile_start_step {first} is outside this run\'s steps '
           f'{start_step + 1}..{total_steps}.')
    self.workdir, self.mirror, self.tracing = workdir, None, False

  def __call__(self, step: int, state) -> None:
    if not self.on:
      return
    if step == self.first - 1 or (step == self.first and not self.tracing):
      # Start after step first-1 has been dispatched: the trace holds steps first..last.
      jax.block_until_ready(state)
      self.mirror = paths.Mirror(self.workdir)
      jax.profiler.start_trace(self.mirror.local)
      self.tracing = True
    elif self.tracing and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing, self.on = False, False
      self.mirror.close()
      _log(f'Profile of steps {self.first}..{step} in '
           f'{paths.join(self.workdir, "plugins", "profile")}/ (TensorBoard: Profile tab).')


def frozen_summary(results: dict[str, Any]) -> str:
  """One line for a replicas run that finished with frozen replicas (``main`` exits 1)."""
  frozen = results['frozen_replicas']
  seeds = results['seeds']
  named = ', '.join(f'replica {r} (seed {seeds[r]}) at step {s}' for r, s in sorted(frozen.items()))
  return (f'{len(frozen)} of {results["replicas"]} replicas went NaN or Inf and were frozen '
          f'({named}); the other {len(results["live_replicas"])} finished: '
          f'{results.get("final_line", "")}')


def write_outcome(workdir: str, status: str, exit_code: int, final_line: str, *,
                  step: int | None = None) -> None:
  """``WORKDIR/outcome.json`` (process 0): how a ``--mode=train`` run ended.

  ``{"status": "done"|"stopped"|"failed", "exit_code", "final_line", "step", "launch_id"
  (env SSL_JAX_LAUNCH_ID, set by launch/tpu_pod.sh), "time"}``. Written only into a workdir
  this run took (its config.json exists): a command refused before that creates nothing. A
  failure to write it is a warning (the run's own error, if any, is the one that matters).
  """
  if jax.process_index() != 0:
    return
  path = paths.join(workdir, 'outcome.json')
  try:
    if not paths.exists(paths.join(workdir, 'config.json')):
      return
    paths.write_json(path, {
        'status': status, 'exit_code': int(exit_code), 'final_line': final_line,
        'step': None if step is None else int(step),
        'launch_id': os.environ.get('SSL_JAX_LAUNCH_ID') or None,
        'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})
  except Exception as e:  # noqa: BLE001
    print(f'WARNING: could not write {path} ({type(e).__name__}: {e})', flush=True)


def _summary_block(config, workdir: str) -> str:
  """Where the run's outputs are and what to run next (``config`` None: a plain run's)."""
  replicas = 1 if config is None else num_replicas(config)
  lines = [
      '',
      f'Outputs in {workdir}:',
      f'  TensorBoard:  tensorboard --logdir {workdir}',
      f'  checkpoints:  {paths.join(workdir, "checkpoints")}/<step>/  (rerun the same command '
      'to resume)',
      f'  score plots:  {paths.join(workdir, "score_plots")}/' if replicas == 1 else
      f'  replicas:     {paths.join(workdir, "replica_<r>")}/ (TensorBoard run, score plots)',
      f'  config:       {paths.join(workdir, "config.json")}',
      f'  outcome:      {paths.join(workdir, "outcome.json")}',
      'Next:',
      f'  linear probe: python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py '
      f'--config.pretrained={workdir} --workdir={workdir}_linear',
      f'  export:       python -m ssl_jax.main --mode=export --config=configs/eval_linear.py '
      f'--config.pretrained={workdir} --workdir={workdir}_export'
      + (' --config.replica=0' if replicas > 1 else ''),
  ]
  return '\n'.join(lines)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
