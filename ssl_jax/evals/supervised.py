r"""The supervised trainer of ``--mode=linear`` and ``--mode=finetune``, read top to bottom.

Fine-tuning trains the pretrained backbone and a new linear head with cross-entropy; the linear
probe is the same with the backbone frozen (eval mode) and the head reading normalised
features. Each mode describes its classifier as a :class:`Net` (a forward
``apply(state, frozen, images, train=) -> (logits, batch_stats)``, its loss, optimizer and
initial :class:`State`) and its input (:class:`Streamed` or :class:`Cached`); :func:`train`
does the rest:

  state   the newest checkpoint of EVAL_DIR (a rerun resumes; the evaluation history travels in
          the checkpoints' metadata), else ``net.init()``
  input   augmented labelled batches of the train split from that step on, one jitted step per
          batch (:class:`Streamed`); or the probe's fast path, features computed once and kept
          on device (:class:`Cached`): one loop iteration is a whole epoch, one jitted
          ``lax.scan`` over a fresh permutation
  loop    the step; the log window (TensorBoard ``<tag>/*`` and a progress line with % and
          ETA); an evaluation when ``utils.itstime`` says so; the checkpoint; the finiteness
          check (one step late, so it never stalls the device)
  end     the last evaluation; the caller writes ``results.json``

An evaluation is one record ``{'epoch', 'step', 'top1', 'top5'[, 'ema_top1', 'ema_top5']}``
on the eval split (centre crop), written to TensorBoard as ``<tag>/test_*``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, sharding, utils
from ssl_jax.data import labelled
from ssl_jax.evals import eval_config, features, metrics, report


# =============================================================================================
# State, net, step
# =============================================================================================
@flax.struct.dataclass
class State:
  """What a supervised run trains and checkpoints."""
  step: jax.Array
  params: Any            # trained: {'head': {'kernel', 'bias'}} (+ 'backbone' when fine-tuning)
  opt_state: Any
  batch_stats: Any       # BatchNorm statistics of the fine-tuned backbone ({} for the probe)
  norm: Any              # the probe's fixed feature normalisation {'mean', 'std'} ({} otherwise)
  ema_params: Any        # the model EMA ({} when off)
  ema_batch_stats: Any


def new_state(params: Any, tx: optax.GradientTransformation, *, batch_stats: Any = None,
              norm: Any = None, ema: bool = False) -> State:
  """Step 0: ``params``, a fresh optimizer state, and the EMA as copies of the starting weights
  (own buffers: the train step donates the state)."""
  batch_stats = {} if batch_stats is None else batch_stats
  copy = lambda t: jax.tree.map(jnp.copy, t) if ema else {}  # noqa: E731
  return State(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               batch_stats=batch_stats, norm={} if norm is None else norm,
               ema_params=copy(params), ema_batch_stats=copy(batch_stats))


def ema_update(ema: Any, new: Any, decay: float) -> Any:
  """``ema + (1 - decay)(new - ema)`` (= ``decay·ema + (1 - decay)·new``) leaf by leaf, in the
  leaf's dtype: one step of timm's ``ModelEmaV2`` (called after each optimizer step)."""
  return jax.tree.map(lambda e, n: (e + (1.0 - decay) * (n - e)).astype(e.dtype), ema, new)


@dataclasses.dataclass
class Net:
  """A classifier to train: what the linear probe and fine-tuning do differently."""
  name: str              # 'linear' / 'finetune': the log lines' prefix
  tag: str               # TensorBoard prefix: 'offline_linear' / 'finetune'
  apply: Callable        # (state, frozen, images, *, train) -> (logits, new batch_stats); pure
  loss: Callable         # (logits, labels) -> scalar
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  abstract: State        # shapes and dtypes of the state (the checkpoint's restore target)
  init: Callable[[], State]   # the fresh state, replicated on the mesh (only without a checkpoint)
  frozen: Any = dataclasses.field(default_factory=dict)  # read, never trained: the probe's backbone
  ema_decay: float = 0.0
  about: str = ''        # the end of the start-up line


def make_train_step(net: Net) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)``: one optimizer step on ``net.loss`` of
  the train-mode forward, then the model EMA (timm ``ModelEma``: on the updated weights)."""

  def step(st: State, frozen, batch):
    def loss_fn(params):
      logits, batch_stats = net.apply(st.replace(params=params), frozen, batch['image'],
                                      train=True)
      return net.loss(logits, batch['label']), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    updates, opt_state = net.tx.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    new = st.replace(step=st.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
    if net.ema_decay > 0:
      new = new.replace(ema_params=ema_update(st.ema_params, params, net.ema_decay),
                        ema_batch_stats=ema_update(st.ema_batch_stats, batch_stats,
                                                   net.ema_decay))
    return new, {'train_loss': loss, 'lr': net.lr_fn(st.step),
                 'train_top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                 'finite/train_loss': jnp.isfinite(loss)}
  return step


def predict(net: Net, st: State, frozen, images) -> dict[str, jax.Array]:
  """Eval-mode ``{'logits'}`` (and ``'ema_logits'`` with a model EMA)."""
  out = {'logits': net.apply(st, frozen, images, train=False)[0]}
  if net.ema_decay > 0:
    ema = st.replace(params=st.ema_params, batch_stats=st.ema_batch_stats)
    out['ema_logits'] = net.apply(ema, frozen, images, train=False)[0]
  return out


def validate(c, *, optimizer_keys: Sequence[str]) -> None:
  """The fields every supervised run reads (and the eval config's common ones); the mode checks
  its own. ``optimizer_keys``: the ``config.optimizer`` numbers that must be finite and >= 0."""
  eval_config.validate_common(c)
  req = config_lib.require
  req(isinstance(c.epochs, int) and c.epochs > 0, 'epochs', c.epochs, 'a positive integer')
  req(isinstance(c.batch_size, int) and c.batch_size > 0, 'batch_size', c.batch_size,
      'a positive integer')
  for key in optimizer_keys:
    v = c.optimizer[key]
    req(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f'optimizer.{key}', v,
        'a finite number >= 0')
  req(c.optimizer.base_lr > 0, 'optimizer.base_lr', c.optimizer.base_lr, 'a number > 0')
  req(c.augment in labelled.AUGMENTS, 'augment', c.augment, ', '.join(labelled.AUGMENTS))
  lo, hi = c.crop_scale
  req(0 < lo <= hi <= 1, 'crop_scale', tuple(c.crop_scale), '(lo, hi) with 0 < lo <= hi <= 1')


# =============================================================================================
# Inputs
# =============================================================================================
def _steps_per_epoch(num: int, batch_size: int, what: str) -> int:
  if num // batch_size < 1:
    raise config_lib.ConfigError(f'config.batch_size={batch_size} exceeds the {num} {what}; '
                                 f'accepted: a batch <= {num}.')
  return num // batch_size


@dataclasses.dataclass
class Streamed:
  """Augmented labelled batches of the train split (``indices``: a labelled subset; else up to
  ``max_examples``, -1: all), decoded every step; evaluation over the eval split."""
  data_cfg: Any
  batch_size: int
  indices: np.ndarray | None = None
  max_examples: int = -1
  what: str = 'train examples'

  def __post_init__(self):
    self.num = labelled.num_selected(self.data_cfg, self.data_cfg.train_split,
                                     indices=self.indices, max_examples=self.max_examples)
    self.steps_per_epoch = _steps_per_epoch(self.num, self.batch_size, self.what)


@dataclasses.dataclass
class Cached:
  """The probe's fast path: train features ``{'features' [N, d], 'label' [N]}`` kept on device
  (padded to the device count, label -1, and sharded along ``'data'``), test features on the
  host. An epoch visits ``N // batch_size`` minibatches (drop remainder; the batch is capped at
  N)."""
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  batch_size: int
  mesh: Any

  def __post_init__(self):
    feats = np.asarray(self.train['features'], np.float32)
    labels = np.asarray(self.train['label'], np.int32)
    n, d = feats.shape
    if labels.shape != (n,):
      raise ValueError(f'train labels have shape {labels.shape}; expected ({n},)')
    self.num, self.batch_size = n, min(int(self.batch_size), n)
    self.steps_per_epoch = n // self.batch_size
    n_dev = self.mesh.shape[sharding.DATA]
    if self.batch_size % n_dev:
      raise config_lib.ConfigError(
          f'batch_size={self.batch_size} does not divide across {n_dev} devices; accepted: a '
          f'multiple of {n_dev}.')
    pad = (-n) % n_dev
    put = lambda a: jax.device_put(a, NamedSharding(self.mesh, P(sharding.DATA)))  # noqa: E731
    self.x = put(np.concatenate([feats, np.zeros((pad, d), np.float32)]) if pad else feats)
    self.y = put(np.concatenate([labels, -np.ones(pad, np.int32)]) if pad else labels)
    self.valid = put(np.arange(n + pad) < n)


def cached_epochs(train_step: Callable, data: Cached, seed: int) -> Callable:
  """``epoch_fn(state, epoch) -> (state, epoch-mean metrics)``: ``train_step`` over the
  minibatches of a fresh permutation (``fold_in(PRNGKey(seed), epoch)``), one jitted
  ``lax.scan``; each minibatch constrained to ``P('data')``."""
  n, bs, spe = data.num, data.batch_size, data.steps_per_epoch
  key = jax.random.PRNGKey(seed)
  on_data = NamedSharding(data.mesh, P(sharding.DATA))

  @jax.jit
  def run_epoch(st: State, x_all, y_all, epoch):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)[:spe * bs]

    def one_step(st, ix):
      x = jax.lax.with_sharding_constraint(jnp.take(x_all, ix, axis=0), on_data)
      y = jax.lax.with_sharding_constraint(jnp.take(y_all, ix, axis=0), on_data)
      return train_step(st, {}, {'image': x, 'label': y})

    st, per_step = jax.lax.scan(one_step, st, perm.reshape(spe, bs))
    m = {k: jnp.mean(v) for k, v in per_step.items() if not k.startswith('finite/')}
    return st, {**m, 'finite/train_loss': jnp.isfinite(m['train_loss'])}

  return lambda st, epoch: run_epoch(st, data.x, data.y, jnp.int32(epoch))


# =============================================================================================
# Evaluation
# =============================================================================================
def make_evaluate(net: Net, data: Streamed | Cached, config, *, mesh, steps_per_epoch: int,
                  writer) -> Callable[[State, int], dict[str, Any]]:
  """``evaluate(state, step) -> record``: top-1 / top-5 on the eval split (and of the EMA),
  written to TensorBoard and logged."""
  logits_fn = jax.jit(lambda frozen_and_state, images: predict(net, frozen_and_state[1],
                                                                frozen_and_state[0], images))

  def evaluate(st: State, step: int) -> dict[str, Any]:
    if isinstance(data, Cached):   # the test features at once, op by op
      out = dict(predict(net, st, net.frozen, jnp.asarray(data.test['features'])),
                 label=data.test['label'])
    else:
      out = features.extract(logits_fn, (net.frozen, st), data.data_cfg,
                             split=data.data_cfg.eval_split, mesh=mesh,
                             batch_size=config.eval_batch_size,
                             max_examples=config.eval_examples)
    rec: dict[str, Any] = {'epoch': step // steps_per_epoch, 'step': step,
                           **metrics.top1_top5(out['logits'], out['label'])}
    if 'ema_logits' in out:
      ema = metrics.top1_top5(out['ema_logits'], out['label'])
      rec.update({'ema_top1': ema['top1'], 'ema_top5': ema['top5']})
    writer.write_scalars(step, {f'{net.tag}/test_{k}': v for k, v in rec.items()
                                if k not in ('epoch', 'step')})
    ema_txt = (f' | EMA top-1 {100 * rec["ema_top1"]:.2f}% top-5 {100 * rec["ema_top5"]:.2f}%'
               if 'ema_top1' in rec else '')
    report.log(f'[{net.name} epoch {rec["epoch"]}] test top-1 {100 * rec["top1"]:.2f}% top-5 '
               f'{100 * rec["top5"]:.2f}%{ema_txt}')
    return rec
  return evaluate


def summarize_history(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Last and best evaluation of the online (and, when present, EMA) weights.

  ``history``: evaluations in step order, each ``{'epoch', 'step', 'top1', 'top5'[,
  'ema_top1', 'ema_top5']}``. Best = the highest top-1, the earliest on ties (the official
  ``acc > acc_best`` rule); its top-5 is that evaluation's. Returns ``top1_last``,
  ``top5_last``, ``last_epoch``, ``top1_best``, ``top5_best``, ``best_epoch``,
  ``num_evals`` and the ``ema_`` versions of the first six when the history has EMA numbers.
  """
  if not history:
    raise ValueError('summarize_history needs at least one evaluation')
  out: dict[str, Any] = {'num_evals': len(history)}
  prefixes = [''] + (['ema_'] if all('ema_top1' in h for h in history) else [])
  for pre in prefixes:
    last = history[-1]
    best = max(range(len(history)), key=lambda i: (history[i][f'{pre}top1'], -i))
    out.update({f'{pre}top1_last': float(last[f'{pre}top1']),
                f'{pre}top5_last': float(last[f'{pre}top5']),
                f'{pre}last_epoch': last['epoch'],
                f'{pre}top1_best': float(history[best][f'{pre}top1']),
                f'{pre}top5_best': float(history[best][f'{pre}top5']),
                f'{pre}best_epoch': history[best]['epoch']})
  return out


# =============================================================================================
# The trainer
# =============================================================================================
def restore_or_init(net: Net, ckpt: ckpt_lib.Checkpointer, mesh
                    ) -> tuple[State, list[dict[str, Any]]]:
  """The newest checkpoint's state and evaluation history, or ``net.init()`` and none."""
  rep = sharding.replicated(mesh)
  restored = ckpt.restore_latest(jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), net.abstract))
  if restored is None:
    return net.init(), []
  state, meta = restored
  report.log(f'Resumed {net.name} from {ckpt.directory}/{meta["step"]} (epoch '
             f'{float(meta["epoch"]):g}).')
  return state, [dict(h) for h in meta.get('history', []) if h['step'] <= meta['step']]


def train(config, workdir: str, net: Net, data: Streamed | Cached, *, mesh, writer
          ) -> tuple[State, list[dict[str, Any]]]:
  """Train ``net`` for ``config.epochs`` on ``data``, resuming from ``workdir``; returns the
  final state and the evaluation history (its last record: the final state's)."""
  bs, spe = data.batch_size, data.steps_per_epoch
  total = spe * config.epochs
  cached = isinstance(data, Cached)
  stride = spe if cached else 1     # optimizer steps per loop iteration (cached: an epoch)
  log_every = spe * max(1, config.epochs // 10) if cached else max(1, config.log_every_steps)
  eval_every = utils.steps(config, 'eval_every', spe)
  ckpt_every = utils.steps(config, 'checkpoint_every', spe, default=spe)
  hint = f'Lower config.optimizer.base_lr (now {config.optimizer.base_lr}).'
  evaluate = make_evaluate(net, data, config, mesh=mesh, steps_per_epoch=spe, writer=writer)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=2, async_save=False)
  try:
    # ---- state ----
    state, history = restore_or_init(net, ckpt, mesh)
    start = int(jax.device_get(state.step))

    # ---- input and step ----
    train_step = make_train_step(net)
    if cached:
      step_fn = cached_epochs(train_step, data, config.seed)
      batches = iter(range(start // spe, config.epochs))
    else:
      jitted = jax.jit(train_step, donate_argnums=(0,),
                       out_shardings=(sharding.replicated(mesh), None))
      step_fn = lambda st, batch: jitted(st, net.frozen, batch)  # noqa: E731
      train_in = labelled.labelled_train_iterator(
          data.data_cfg, split=data.data_cfg.train_split, global_batch_size=bs,
          seed=config.seed, augment=config.augment, crop_scale=tuple(config.crop_scale),
          start_step=start, indices=data.indices, max_examples=data.max_examples)
      batches = (sharding.global_batch(mesh, b) for b in train_in.iterator)
    report.log(f'{net.name}: {data.num} train examples, batch {bs}, {spe} steps/epoch x '
               f'{config.epochs} epochs = {total} steps, from step {start}; {net.about}.')

    # ---- loop ----
    window = utils.Window(start, log_every)
    pending = None   # the previous step's metrics: their finiteness is checked one step late
    for step in range(start + stride, total + 1, stride):
      first = step == start + stride
      if first:
        report.log('compiling the train step...')
        t_compile = time.time()
      state, step_metrics = step_fn(state, next(batches))
      if first:
        jax.block_until_ready(step_metrics)
        report.log(f'first step compiled in {time.time() - t_compile:.0f} s')
        window.restart_clock(step)
      if pending is not None:
        utils.check_finite(*pending, hint=hint)
      pending = (step, step_metrics)
      window.add(step, step_metrics)
      logging = utils.itstime(step, log_every, total)
      evaluating = utils.itstime(step, eval_every, total, skip_last=True)
      saving = utils.itstime(step, ckpt_every, total)
      if logging or evaluating or saving:
        utils.check_finite(step, step_metrics, hint=hint)
      if logging:
        avg = window.flush(step)[0]
        writer.write_scalars(step, {f'{net.tag}/{k}': v for k, v in avg.items()}
                             | {f'{net.tag}/epoch': step / spe})
        report.log(f'[{net.name} step {step}/{total}] loss {avg["train_loss"]:.4f} | train '
                   f'top-1 {100 * avg["train_top1"]:.1f}% | lr {avg["lr"]:.4g} | '
                   + utils.progress(step, total, avg['steps_per_sec'], bs))
      if evaluating:
        history.append(evaluate(state, step))
      if saving:
        ckpt.save(step, state, {'step': step, 'epoch': step / spe, 'history': history},
                  force=True)
    if pending is not None:
      utils.check_finite(*pending, hint=hint)

    # ---- end ----
    history.append(evaluate(state, total))
  finally:
    ckpt.close()
  return state, history
