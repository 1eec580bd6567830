"""The training loop. Knows nothing method-specific: a method gives its network, its state and
its loss (``ssl_jax/methods``); this file does the rest. Read it top to bottom:

  1. config & mesh      2. input       3. model & state      4. the update step
  5. checkpoint/resume  6. evals       7. the loop
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.experimental import multihost_utils

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, data, methods, optim, sharding
from ssl_jax.evals import collapse, knn_monitor, score_plots
from ssl_jax.ops import losses
from ssl_jax.state import TrainState, state_shardings


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/Inf; the message names the step and the metric."""


def _log(msg: str) -> None:
  """One line on the screen (process 0); other processes keep it in their log."""
  if jax.process_index() == 0:
    print(msg, flush=True)
  else:
    logging.info(msg)


def total_steps_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.total_steps > 0:
    return int(config.total_steps)
  return int(math.ceil(config.total_epochs * steps_per_epoch))


# =============================================================================================
# 4. The update step (pure; jit-compiled once with the state donated)
# =============================================================================================
def make_train_step(method, tx, probe, probe_tx, lr_fn, tau_fn):
  """Returns ``train_step(state, batch) -> (state, metrics, scores)``."""
  uses_target = method.uses_ema_target   # False: no EMA update, no tau (APS by default)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      return method.loss(params, state.target_params, state.method_state, state.batch_stats,
                         batch, rng, state.step)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA target after the optimizer step (BYOL, MoCo; equivalent to MSF's update-first order).
    tau = tau_fn(state.step)
    if uses_target:
      target = jax.tree.map(lambda t, p: tau * t + (1.0 - tau) * p, state.target_params, params)
    else:
      target = state.target_params

    # Online linear probe on stop-gradient features (labelled examples only).
    feats = jax.lax.stop_gradient(aux.features).astype(jnp.float32)
    labels = batch['label']
    labelled = labels >= 0

    def probe_loss(pp):
      logits = probe.apply(pp, feats)
      return losses.cross_entropy(logits, labels, labelled), logits

    (p_loss, logits), p_grads = jax.value_and_grad(probe_loss, has_aux=True)(state.probe_params)
    p_updates, p_opt = probe_tx.update(p_grads, state.probe_opt_state, state.probe_params)
    probe_params = optax.apply_updates(state.probe_params, p_updates)
    p_acc = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled) / jnp.maximum(
        jnp.sum(labelled), 1)

    new = state.replace(step=state.step + 1, params=params, batch_stats=aux.batch_stats,
                        target_params=target, opt_state=opt_state,
                        method_state=aux.method_state, probe_params=probe_params,
                        probe_opt_state=p_opt)
    # Never let a non-finite update into the state: keep the previous one (the host stops).
    loss_ok = jnp.isfinite(loss)
    grad_ok = jnp.isfinite(grad_norm)
    ok = loss_ok & grad_ok
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state.replace(step=new.step))
    metrics = dict(aux.metrics)
    if uses_target:
      metrics['tau'] = tau
    metrics.update({'loss': loss, 'lr': lr_fn(state.step), 'grad_norm': grad_norm,
                    'online_probe/train_loss': p_loss, 'online_probe/train_top1': p_acc,
                    'finite/loss': loss_ok, 'finite/grad_norm': grad_ok})
    return new, metrics, aux.scores

  return train_step


def make_feature_fn(method, probe):
  """Eval-mode forward: L2-normalised backbone features and the probe's logits."""

  def feature_fn(variables, images):
    out = method.model.apply({'params': variables['params'],
                              'batch_stats': variables['batch_stats']},
                             images, train=False, with_predictor=False)
    f = out['features'].astype(jnp.float32)
    return {'features': losses.l2_normalize(f),
            'probe_logits': probe.apply(variables['probe'], f)}

  return feature_fn


class Parts(NamedTuple):
  """What a run is made of, reusable outside ``train_and_evaluate`` (tests, multi-host checks)."""
  method: Any
  probe: nn.Module
  init: Callable          # jitted: rng -> TrainState, placed with ``shardings``
  train_step: Callable    # jitted, state donated: (state, global batch) -> (state, metrics, scores)
  abstract: Any           # TrainState of ShapeDtypeStructs carrying their shardings
  shardings: Any


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

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    shardings = state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  train_step = jax.jit(make_train_step(method, tx, probe, probe_tx, lr_fn, tau_fn),
                       donate_argnums=(0,), out_shardings=(shardings, None, None))
  return Parts(method, probe, jax.jit(init_state, out_shardings=shardings), train_step,
               abstract, shardings)


# =============================================================================================
# The whole run
# =============================================================================================
class _PreemptionNotice:
  """SIGTERM (a preemption notice) sets ``received``; installed for the whole run, so a notice
  during compilation or the start-up evals is seen too (the loop checkpoints and exits 0)."""

  def __init__(self):
    self.received = False
    self._old = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = True

  def __enter__(self):
    if _main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       stop_at_step: int | None = None) -> dict[str, Any]:
  """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); return final metrics.

  ``stop_at_step``: checkpoint and return at that step, as a preemption would (for jobs with a
  wall-clock limit; the next run resumes there with the same batches and random numbers).
  """
  with _PreemptionNotice() as notice:
    return _train_and_evaluate(config, workdir, notice, allow_config_change=allow_config_change,
                               stop_at_step=stop_at_step)


def _train_and_evaluate(config, workdir, notice: _PreemptionNotice, *, allow_config_change,
                        stop_at_step) -> dict[str, Any]:
  # ------------------------------------------------------------------------- 1. config & mesh
  num_devices = None if config.num_devices in (-1, None) else int(config.num_devices)
  mesh = sharding.make_mesh(num_devices)
  n_dev = mesh.shape[sharding.DATA]
  config_lib.validate(config, num_devices=n_dev, process_count=jax.process_count())
  # The dataset is found (or the run stops) before anything is written to the workdir.
  steps_per_epoch = data.steps_per_epoch(config.data, config.batch_size)
  data.check_same_classes(config.data, config.data.train_split, config.data.eval_split)
  ckpt_lib.check_workdir_config(workdir, config, allow_config_change=allow_config_change)
  method = methods.get(config.method.name)(config, steps_per_epoch)

  # ------------------------------------------------------------------------- 2.-4. input, model, step
  total_steps = total_steps_of(config, steps_per_epoch)
  parts = build(config, mesh, method, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh):
    abstract, shardings = parts.abstract, parts.shardings
    # ----------------------------------------------------------------------- 5. checkpoint/resume
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
      state, meta = restored
      _log(f'Resumed from {ckpt.directory}/{meta["step"]} (epoch {meta["epoch"]:.2f}).')
    else:
      state = parts.init(rng)
    start_step = int(jax.device_get(state.step))

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f'{config.method.name} | {config.model.backbone} ({n_params / 1e6:.2f}M params) | '
         f'{config.data.name} | global batch {config.batch_size} on {n_dev} device(s), '
         f'{jax.process_count()} host(s) | {total_steps} steps ({steps_per_epoch}/epoch)')

    train_step = parts.train_step
    feature_fn = jax.jit(make_feature_fn(method, parts.probe))

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    # --------------------------------------------------------------------- 6. evals
    def run_evals(step: int) -> dict[str, float]:
      variables = {'params': state.params, 'batch_stats': state.batch_stats,
                   'probe': state.probe_params}
      t0 = time.time()
      res = knn_monitor.evaluate(feature_fn, variables, config.data, mesh=mesh,
                                 knn_cfg=config.knn, num_classes=config.data.num_classes)
      writer.write_scalars(step, res)
      _log(f'[eval @ step {step}] ' + ' | '.join(f'{k} {100 * v:.2f}%' for k, v in res.items())
           + f' (k={config.knn.k}, T={config.knn.temperature}, {time.time() - t0:.0f}s)')
      return res

    saved = {'step': start_step if restored is not None else -1}

    def save(step: int, *, force: bool = False) -> None:
      if saved['step'] == step:
        return
      meta = {'step': step, 'epoch': step / steps_per_epoch,
              'config_method': config.method.name}
      ckpt.save(step, state, meta, force=force)
      saved['step'] = step

    if config.knn.every_steps > 0:
      knn_every = int(config.knn.every_steps)
    elif config.knn.every_epochs > 0:
      knn_every = max(1, int(round(config.knn.every_epochs * steps_per_epoch)))
    else:
      knn_every = 0

    results: dict[str, Any] = {'start_step': start_step, 'loss_history': []}
    skipped = data.num_skipped(config.data, config.data.train_split)
    if skipped:  # named one by one in the warnings above; counted in the run's own record
      _log(f'WARNING: {skipped} undecodable training image(s) skipped (data/skipped_files).')
    writer.write_scalars(start_step, {'data/skipped_files': skipped})
    if config.knn.at_start and start_step == 0:
      results['untrained'] = run_evals(0)

    # --------------------------------------------------------------------- 7. the loop
    batches: Iterator = data.make_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
    per_device = config.batch_size / n_dev
    collapse_monitor = collapse.CollapseMonitor()
    history: list[tuple[int, dict[str, Any]]] = []
    pending: tuple[int, dict[str, Any]] | None = None
    t_last, step_last = time.time(), start_step
    window_start = start_step   # a window that starts off a log boundary (a resume) is partial
    t_start = time.time()
    step = start_step
    uses_target = method.uses_ema_target   # False: no EMA update, no tau (APS by default)
    plotted_epoch = -1
    try:
      if notice.received:  # the notice came during start-up (compile, initial evals)
        _log(f'Preemption notice (SIGTERM) before the first step of this run (step {step}): '
             'nothing new to save; exiting. Rerun the same command to continue.')
        results['preempted_at'] = step
        results['state'] = state
        return results
      while step < total_steps:
        local = next(batches)
        batch = sharding.global_batch(mesh, local)
        first = step == start_step
        if first:
          _log('compiling the train step...')
          t_compile = time.time()
        state, metrics, scores = train_step(state, batch)
        if first:
          jax.block_until_ready(metrics['loss'])
          _log(f'first step compiled in {time.time() - t_compile:.0f} s')
          t_last, step_last = time.time(), step + 1  # speed excludes compilation
        step += 1
        # Check the previous step's finiteness while this one runs (no pipeline stall).
        if pending is not None:
          _check_finite(*pending, ckpt)
        pending = (step, metrics)
        history.append((step, metrics))

        if step % config.log_every_steps == 0 or step == total_steps:
          _check_finite(*pending, ckpt)
          host = [(s, jax.device_get(m)) for s, m in history]
          history.clear()
          results['loss_history'].extend((s, float(m['loss'])) for s, m in host)
          avg = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]
                 if not k.startswith('finite/')}
          now = time.time()
          sps = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          avg.update({'steps_per_sec': sps, 'images_per_sec_per_device': sps * per_device,
                      'epoch': step / steps_per_epoch})
          warning = collapse_monitor.update(step, avg)
          if warning:
            _log(warning)
          # After a resume from step s off the log grid, the first window holds only steps
          # s+1..step: it is not written, so no TensorBoard step carries two different values
          # (the uninterrupted run's full window may already be there).
          partial = window_start % config.log_every_steps != 0
          window_start = step
          if not partial:
            writer.write_scalars(step, avg)
          eta = (total_steps - step) / max(sps, 1e-9)
          tau = f'tau {avg["tau"]:.4f} | ' if uses_target else ''
          _log(f'step {step}/{total_steps} ({100 * step / total_steps:.0f}%) | '
               f'loss {avg["loss"]:.4f} | probe top-1 {100 * avg["online_probe/train_top1"]:.1f}% | '
               f'lr {avg["lr"]:.4g} | {tau}'
               f'{sps:.2f} steps/s, {sps * per_device:.0f} img/s/device | '
               f'ETA {_hms(eta)}'
               + (' | partial window after resume: not logged to TensorBoard' if partial else ''))
          results['last_metrics'] = avg
        hist_now = (config.score_hist_every_steps > 0
                    and step % config.score_hist_every_steps == 0)
        # One PNG per epoch, and one at the end of a run that ends mid-epoch.
        plot_now = step % steps_per_epoch == 0 or (step == total_steps
                                                   and plotted_epoch < step // steps_per_epoch)
        if hist_now or plot_now:  # the FT paper's pos/neg score distributions
          host_scores = {k: np.asarray(v).ravel() for k, v in
                         multihost_utils.process_allgather(scores, tiled=True).items()}
          plot_now = plot_now and jax.process_index() == 0
          if hist_now:
            writer.write_histograms(step, {f'scores/{k}': v for k, v in host_scores.items()})
          if plot_now and {'pos', 'neg'} <= set(host_scores):
            plotted_epoch = epoch = step // steps_per_epoch
            name = (f'epoch_{epoch:04d}.png' if step % steps_per_epoch == 0
                    else f'step_{step:07d}.png')
            score_plots.write_score_plot(
                os.path.join(workdir, 'score_plots', name),
                host_scores['pos'], host_scores['neg'],
                f'{config.method.name}: pos/neg cosine scores, epoch {step / steps_per_epoch:.2f}'
                f' (step {step})')
        if step % config.checkpoint.every_steps == 0 or step == total_steps:
          _check_finite(*pending, ckpt)
          save(step)
        if knn_every and step % knn_every == 0 and step != total_steps:
          run_evals(step)
        if (notice.received or step == stop_at_step
            or ckpt.manager.reached_preemption(step)):
          _check_finite(*pending, ckpt)
          _log(f'Stopping at step {step} ('
               f'{"preemption notice (SIGTERM)" if notice.received else "stop requested"}): '
               'saving a checkpoint and exiting.')
          save(step, force=True)
          ckpt.wait()
          ckpt.require_saved(step)
          results['preempted_at'] = step
          results['state'] = state
          return results
      ckpt.wait()
      ckpt.require_saved(step)   # never exit 0 with the last save missing
      if config.knn.at_end:
        results['final'] = run_evals(step)
      writer.flush()
      results['final_step'] = step
      results['collapse_warnings'] = list(collapse_monitor.warned_steps)
      if collapse_monitor.collapsing:
        _log(f'WARNING: the run ended collapsed (first flagged at step '
             f'{collapse_monitor.warned_steps[-1]}): {collapse.describe(results["last_metrics"])}.')
      results['train_time_s'] = time.time() - t_start
      results['state'] = state
      if 'final' in results:
        _log(_final_line(config, step, results))
      _log(_summary_block(config, workdir))
      return results
    finally:
      ckpt.close()


def _final_line(config, step: int, results: dict[str, Any]) -> str:
  """``Final kNN top-1 ...: X% (untrained: Y%) | online-probe top-1: A% (untrained: B%)``."""
  final, untrained = results['final'], results.get('untrained', {})
  parts = []
  for key, label in (('monitor/knn_top1', f'kNN top-1 (weighted k={config.knn.k}, '
                                           f'T={config.knn.temperature}, frozen backbone)'),
                     ('online_probe/test_top1', 'online-probe top-1')):
    if key in final:
      part = f'{label}: {100 * final[key]:.2f}%'
      if key in untrained:
        part += f' (untrained network: {100 * untrained[key]:.2f}%)'
      parts.append(part)
  return f'Final after {step} steps | ' + ' | '.join(parts)


def _summary_block(config, workdir: str) -> str:
  """Where the run's outputs are and what to run next."""
  lines = [
      '',
      f'Outputs in {workdir}:',
      f'  TensorBoard:  tensorboard --logdir {workdir}',
      f'  checkpoints:  {os.path.join(workdir, "checkpoints")}/<step>/  (rerun the same command '
      'to resume)',
      f'  score plots:  {os.path.join(workdir, "score_plots")}/',
      f'  config:       {os.path.join(workdir, "config.json")}',
      'Next:',
      f'  linear probe: python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py '
      f'--config.pretrained={workdir} --workdir={workdir}_linear',
      f'  export:       python -m ssl_jax.main --mode=export --config=configs/eval_linear.py '
      f'--config.pretrained={workdir} --workdir={workdir}_export',
  ]
  return '\n'.join(lines)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _check_finite(step: int, metrics: dict[str, Any], ckpt) -> None:
  flags = jax.device_get({k: metrics[k] for k in ('finite/loss', 'finite/grad_norm')})
  for name in ('loss', 'grad_norm'):
    if not bool(flags[f'finite/{name}']):
      ckpt.wait()  # finish the last good save; nothing after it is written
      good = ckpt.steps()
      kept = (f'The last good checkpoint ({ckpt.directory}/{good[-1]}) is kept.' if good else
              'No checkpoint was written before it (a rerun starts fresh).')
      raise NonFiniteError(
          f'{name} is NaN or Inf at step {step}; stopping. {kept} Lower '
          '--config.optimizer.base_lr, set --config.optimizer.grad_clip_norm, or check the input.')


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
