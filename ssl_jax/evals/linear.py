r"""Offline linear probe (``--mode=linear``): a linear classifier on frozen pretrained features.

    python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR

The backbone of the newest checkpoint in WORKDIR is frozen (eval mode: BatchNorm running
statistics) and a linear layer ``logits = W n(f) + b`` is trained with softmax cross-entropy by
SGD with momentum 0.9 and a cosine (or step) learning-rate schedule, ``lr = base_lr * B / 256``.
``n`` is the feature normalisation of the protocol:

* ``feature_norm='none'``          ``n(f) = f`` (default; FT's protocol: base_lr 30, wd 0)
* ``feature_norm='l2'``            ``n(f) = f / |f|``
* ``feature_norm='l2_standardize'`` ``n(f) = (f/|f| - mu) / sigma``, ``mu``, ``sigma`` per
  dimension over the train split's normalised features (no augmentation) — MSF's protocol
  (normalise-then-standardise; base_lr 0.01, 40 epochs, steps at 15 / 30).

Two ways to feed it:

* ``cache_features=True``: features of the train split (centre crop, no augmentation) are
  extracted once, kept on device (sharded along ``'data'``) and the probe is trained on the
  arrays by :func:`train_linear` — a whole epoch is one ``lax.scan`` (seconds per epoch, even for
  ImageNet-sized feature sets on one accelerator).
* ``cache_features=False``: every step decodes and augments images (``augment='rrc_flip'``:
  RandomResizedCrop(``crop_scale``) + horizontal flip, or ``'none'``: centre crop) and runs the
  frozen backbone inside the jitted step, with the global batch sharded along ``'data'``.

Evaluation: top-1 / top-5 on the eval split with the centre-crop transform (shorter side
resized to ``eval_resize``, centre crop ``image_size``). TensorBoard scalars (``EVAL_DIR``)
are tagged ``offline_linear/*`` so they are never confused with the trainer's online probe
(``online_probe/*``). The probe (head, optimizer, normalisation statistics) is checkpointed
with Orbax in ``EVAL_DIR/checkpoints`` and a rerun resumes; the final numbers go to
``EVAL_DIR/results.json``.

This file also holds the labelled, augmented train input that ``--mode=finetune`` shares
(:func:`ssl_jax.data.labelled.labelled_train_iterator`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, loop, optim, sharding, utils, writers
from ssl_jax.data import labelled
from ssl_jax.evals import features, metrics
from ssl_jax.evals import pretrained as pre_lib
from ssl_jax.ops import losses

FEATURE_NORMS = ('none', 'l2', 'l2_standardize')
TAG = 'offline_linear'


# =============================================================================================
# Pure pieces: feature normalisation and the linear head
# =============================================================================================
def norm_stats(feats: jax.Array, mode: str, valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """``{'mean', 'std'}`` [d] of the normalised features (``l2_standardize``), else 0 / 1."""
  if mode not in FEATURE_NORMS:
    raise ValueError(f'feature_norm={mode!r} is invalid; accepted: {", ".join(FEATURE_NORMS)}')
  d = feats.shape[-1]
  if mode != 'l2_standardize':
    return {'mean': jnp.zeros((d,), jnp.float32), 'std': jnp.ones((d,), jnp.float32)}
  f = losses.l2_normalize(feats.astype(jnp.float32))
  w = jnp.ones(f.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(f * w[:, None], 0) / n
  var = jnp.sum(jnp.square(f - mean) * w[:, None], 0) / n
  return {'mean': mean, 'std': jnp.sqrt(var) + 1e-6}


def apply_norm(feats: jax.Array, mode: str, stats: dict[str, jax.Array]) -> jax.Array:
  f = feats.astype(jnp.float32)
  if mode == 'none':
    return f
  f = losses.l2_normalize(f)
  if mode == 'l2':
    return f
  return (f - stats['mean']) / stats['std']


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the examples with a label (>= 0)."""
  return losses.cross_entropy(logits, labels, labels >= 0)


def head_logits(head: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  return feats @ head['kernel'] + head['bias']


# =============================================================================================
# The probe state and the pure training function on arrays
# =============================================================================================
@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  head: dict[str, jax.Array]   # {'kernel': [d, C], 'bias': [C]}
  opt_state: Any
  norm: dict[str, jax.Array]   # {'mean', 'std'} [d] (fixed; l2_standardize)


def init_probe(dim: int, num_classes: int, tx, norm: dict[str, jax.Array]) -> ProbeState:
  head = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}
  return ProbeState(step=jnp.zeros((), jnp.int32), head=head, opt_state=tx.init(head),
                    norm=norm)


@dataclasses.dataclass
class LinearResult:
  """A trained probe: ``logits(feats)`` applies the normalisation and the linear layer."""
  state: ProbeState
  feature_norm: str
  epoch_losses: list[float]

  def logits(self, feats) -> jax.Array:
    f = apply_norm(jnp.asarray(feats), self.feature_norm, self.state.norm)
    return head_logits(self.state.head, f)

  def predict(self, feats) -> np.ndarray:
    return np.asarray(jnp.argmax(self.logits(feats), -1))


def _on_mesh(x: np.ndarray, mesh, spec: P) -> jax.Array:
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, NamedSharding(mesh, spec))


def train_linear(train_feats, train_labels, *, num_classes: int, epochs: int,
                 batch_size: int = 256, base_lr: float = 0.1, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0, schedule: str = 'cosine',
                 step_epochs: Sequence[float] = (), step_factor: float = 0.1,
                 feature_norm: str = 'none', seed: int = 0, mesh=None,
                 state: ProbeState | None = None, start_epoch: int = 0,
                 on_epoch: Callable[[int, ProbeState, float], None] | None = None
                 ) -> LinearResult:
  """Train a linear softmax classifier on fixed feature arrays (the cached-features probe).

  ``train_feats`` [N, d], ``train_labels`` [N] int (label < 0 = ignored). Each epoch visits a
  fresh permutation (``fold_in(PRNGKey(seed), epoch)``) in ``N // batch_size`` minibatches
  (drop remainder) — one jitted ``lax.scan`` per epoch, on device. Minibatch SGD with momentum
  minimises ``mean CE(W n(f) + b, y) + wd/2 |W|^2`` (``n`` per ``feature_norm``, statistics from
  the train features). With ``mesh`` the feature matrix lives sharded along ``'data'`` and
  each minibatch is constrained to ``P('data')``. ``state``/``start_epoch`` resume a run;
  ``on_epoch(epoch, state, mean_loss)`` runs on the host after each epoch (logging,
  checkpoints).
  """
  feats = np.asarray(train_feats, np.float32)
  labels = np.asarray(train_labels, np.int32)
  n, d = feats.shape
  if labels.shape != (n,):
    raise ValueError(f'train_labels has shape {labels.shape}; expected ({n},)')
  bs = min(int(batch_size), n)
  spe = n // bs
  n_dev = 1 if mesh is None else mesh.shape[sharding.DATA]
  if mesh is not None and bs % n_dev:
    raise ValueError(f'batch_size={bs} does not divide across {n_dev} devices; accepted: a '
                     f'multiple of {n_dev}.')
  pad = (-n) % n_dev
  feats_p = np.concatenate([feats, np.zeros((pad, d), np.float32)]) if pad else feats
  labels_p = np.concatenate([labels, -np.ones(pad, np.int32)]) if pad else labels
  f_dev = _on_mesh(feats_p, mesh, P(sharding.DATA))
  y_dev = _on_mesh(labels_p, mesh, P(sharding.DATA))
  lr_fn = optim.epoch_schedule(base_lr, bs, spe, epochs, schedule=schedule,
                               step_epochs=step_epochs, step_factor=step_factor)
  tx = optim.probe_sgd(lr_fn, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
  if state is None:
    valid = _on_mesh(np.arange(len(labels_p)) < n, mesh, P(sharding.DATA))
    norm = jax.jit(norm_stats, static_argnums=1)(f_dev, feature_norm, valid)
    state = init_probe(d, num_classes, tx, norm)
    if mesh is not None:
      state = jax.device_put(state, sharding.replicated(mesh))
  key = jax.random.PRNGKey(seed)

  @jax.jit
  def run_epoch(state: ProbeState, f_all, y_all, epoch):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)[:spe * bs]
    idx = perm.reshape(spe, bs)

    def one_step(st: ProbeState, ix):
      x = jnp.take(f_all, ix, axis=0)
      y = jnp.take(y_all, ix, axis=0)
      if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(sharding.DATA)))
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(sharding.DATA)))
      x = apply_norm(x, feature_norm, st.norm)
      loss, grads = jax.value_and_grad(lambda h: _cross_entropy(head_logits(h, x), y))(st.head)
      updates, opt_state = tx.update(grads, st.opt_state, st.head)
      return st.replace(step=st.step + 1, head=optax.apply_updates(st.head, updates),
                        opt_state=opt_state), loss

    state, step_losses = jax.lax.scan(one_step, state, idx)
    loss = jnp.mean(step_losses)
    return state, {'loss': loss, 'finite/loss': jnp.isfinite(loss)}, loss

  # The one loop, one "step" per epoch (each epoch is a single jitted scan).
  history: list[float] = []

  def after_epoch(epoch, st, loss):
    history.append(float(loss))
    if on_epoch is not None:
      on_epoch(epoch, st, history[-1])

  out = loop.run(state, lambda st, ep: run_epoch(st, f_dev, y_dev, jnp.int32(ep)),
                 iter(range(start_epoch, epochs)), start_step=start_epoch, total_steps=epochs,
                 log_every=epochs, on_log=lambda *a: None,
                 actions=[loop.Action('epoch', 1, after_epoch)], log=lambda msg: None,
                 nonfinite_hint=f'(epochs count as steps) Lower config.optimizer.base_lr (now '
                                f"{base_lr}) or use feature_norm='l2_standardize'.")
  return LinearResult(state=out.state, feature_norm=feature_norm, epoch_losses=history)


def evaluate_arrays(result: LinearResult, feats, labels, ks: Sequence[int] = (1, 5)
                    ) -> dict[str, float]:
  """Top-k accuracies of a probe on feature arrays (k capped at the number of classes)."""
  logits = result.logits(feats)
  c = logits.shape[-1]
  labels = jnp.asarray(labels, jnp.int32)
  correct = metrics.topk_correct(logits, labels, tuple(min(k, c) for k in ks))
  n = max(int(jnp.sum(labels >= 0)), 1)
  return {f'top{k}': float(correct[min(k, c)]) / n for k in ks}


# =============================================================================================
# Config validation
# =============================================================================================
def validate(c: ml_collections.ConfigDict) -> None:
  pre_lib.validate_common(c)
  req = pre_lib.require
  req(c.feature_norm in FEATURE_NORMS, 'feature_norm', c.feature_norm, ', '.join(FEATURE_NORMS))
  req(c.augment in labelled.AUGMENTS, 'augment', c.augment, ', '.join(labelled.AUGMENTS))
  req(c.features in pre_lib.FEATURES, 'features', c.features, ', '.join(pre_lib.FEATURES))
  req(c.optimizer.schedule in optim.EVAL_SCHEDULES, 'optimizer.schedule', c.optimizer.schedule,
      ', '.join(optim.EVAL_SCHEDULES))
  req(isinstance(c.epochs, int) and c.epochs > 0, 'epochs', c.epochs, 'a positive integer')
  req(isinstance(c.batch_size, int) and c.batch_size > 0, 'batch_size', c.batch_size,
      'a positive integer')
  for key in ('base_lr', 'momentum', 'weight_decay'):
    v = c.optimizer[key]
    req(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f'optimizer.{key}', v,
        'a finite number >= 0')
  req(c.optimizer.base_lr > 0, 'optimizer.base_lr', c.optimizer.base_lr, 'a number > 0')
  lo, hi = c.crop_scale
  req(0 < lo <= hi <= 1, 'crop_scale', tuple(c.crop_scale), '(lo, hi) with 0 < lo <= hi <= 1')
  if c.cache_features and c.augment != 'none':
    pre_lib.log("Note: cache_features=True extracts features once without augmentation; "
                f"config.augment={c.augment!r} is ignored.")


# =============================================================================================
# --mode=linear
# =============================================================================================
def run(config: ml_collections.ConfigDict, workdir: str, *,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Train and evaluate the offline linear probe; returns ``{'top1', 'top5', ...}``."""
  validate(config)
  mesh = pre_lib.eval_mesh(config, ('batch_size', 'eval_batch_size'))
  ckpt_lib.check_workdir_config(workdir, config, allow_config_change=allow_config_change)
  pre, data_cfg, net, pre_step = pre_lib.load_for_eval(config)
  num_classes = int(data_cfg.num_classes)
  writer = writers.create(workdir,
                                                just_logging=jax.process_index() > 0)
  t0 = time.time()
  o = config.optimizer
  with jax.set_mesh(mesh):
    variables = net.variables(mesh)
    feat_fn = jax.jit(net.feature_fn(config.features))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=2, async_save=False)
    try:
      if config.cache_features:
        result = _run_cached(config, data_cfg, net, variables, feat_fn, mesh, ckpt, writer,
                             num_classes)
      else:
        result = _run_streaming(config, data_cfg, net, variables, feat_fn, mesh, ckpt, writer,
                                num_classes)
    finally:
      ckpt.close()
  accs, final_step = result
  writer.write_scalars(final_step, {f'{TAG}/test_{k}': v for k, v in accs.items()})
  writer.flush()
  out = dict(accs)
  out.update({'pretrained': config.pretrained, 'pretrained_step': pre_step,
              'method': pre.method.name, 'backbone': pre.model.backbone,
              'dataset': data_cfg.name, 'features': config.features,
              'feature_norm': config.feature_norm, 'cache_features': bool(config.cache_features),
              'augment': 'none' if config.cache_features else config.augment,
              'epochs': config.epochs, 'base_lr': o.base_lr, 'weight_decay': o.weight_decay,
              'time_s': time.time() - t0})
  pre_lib.write_json(workdir, 'results.json', out)
  pre_lib.log(f'Offline linear probe ({config.features} features, {config.feature_norm}, '
              f'{config.epochs} epochs) on {data_cfg.name}/{data_cfg.eval_split}: '
              f'top-1 {100 * accs["top1"]:.2f}% | top-5 {100 * accs["top5"]:.2f}% '
              f'({out["time_s"]:.0f}s). Written to {workdir}/results.json.')
  return out


def _restore(ckpt, abstract: ProbeState):
  restored = ckpt.restore_latest(abstract)
  if restored is None:
    return None, None
  state, meta = restored
  pre_lib.log(f'Resumed the probe from {ckpt.directory}/{meta["step"]} '
              f'(epoch {meta["epoch"]}).')
  return state, meta


def _abstract(state: ProbeState, mesh):
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)


def _run_cached(config, data_cfg, net, variables, feat_fn, mesh, ckpt, writer, num_classes):
  bs = config.eval_batch_size
  train = features.extract(feat_fn, variables, data_cfg, split=data_cfg.train_split, mesh=mesh,
                          batch_size=bs, max_examples=config.train_examples)
  test = features.extract(feat_fn, variables, data_cfg, split=data_cfg.eval_split, mesh=mesh,
                         batch_size=bs, max_examples=config.eval_examples)
  pre_lib.log(f'Cached features: train {train["features"].shape}, test '
              f'{test["features"].shape}.')
  o = config.optimizer
  n = len(train['label'])
  spe = n // min(config.batch_size, n)
  kw = dict(num_classes=num_classes, epochs=config.epochs, batch_size=config.batch_size,
            base_lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov,
            weight_decay=o.weight_decay, schedule=o.schedule, step_epochs=tuple(o.step_epochs),
            step_factor=o.step_factor, feature_norm=config.feature_norm, seed=config.seed,
            mesh=mesh)
  # The probe's shapes, to restore a checkpoint into.
  d = train['features'].shape[1]
  tx = optim.probe_sgd(optim.epoch_schedule(o.base_lr, config.batch_size, spe, config.epochs),
                       momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
  zeros = {'mean': jnp.zeros((d,)), 'std': jnp.ones((d,))}
  state, meta = _restore(ckpt, _abstract(jax.eval_shape(
      lambda: init_probe(d, num_classes, tx, zeros)), mesh))
  start_epoch = int(meta['epoch']) if meta else 0
  every = utils.optional(config.checkpoint_every_epochs) or 1   # in epochs: a step is an epoch
  eval_every = utils.optional(config.eval_every_epochs)

  t_start = time.time()

  def on_epoch(epoch, st, loss):
    step = int(st.step)
    writer.write_scalars(step, {f'{TAG}/train_loss': loss, f'{TAG}/epoch': epoch})
    if epoch % max(1, config.epochs // 10) == 0 or epoch == config.epochs:   # ~10 lines
      per_epoch = (time.time() - t_start) / max(epoch - start_epoch, 1)
      pre_lib.log(f'[linear epoch {epoch}/{config.epochs}] loss {loss:.4f} | '
                  + utils.progress(epoch, config.epochs, 1 / per_epoch if per_epoch > 0 else 0,
                                  len(train['label'])).replace('steps/s', 'epochs/s'))
    if utils.itstime(epoch, eval_every, config.epochs, last=False, skip_last=True):
      res = evaluate_arrays(LinearResult(st, config.feature_norm, []), test['features'],
                            test['label'])
      writer.write_scalars(step, {f'{TAG}/test_{k}': v for k, v in res.items()})
      pre_lib.log(f'[linear epoch {epoch}/{config.epochs}] test top-1 {100 * res["top1"]:.2f}%')
    if utils.itstime(epoch, every, config.epochs):
      ckpt.save(step, st, {'step': step, 'epoch': epoch}, force=True)

  result = train_linear(train['features'], train['label'], state=state,
                        start_epoch=start_epoch, on_epoch=on_epoch, **kw)
  return evaluate_arrays(result, test['features'], test['label']), int(result.state.step)


def _run_streaming(config, data_cfg, net, variables, feat_fn, mesh, ckpt, writer, num_classes):
  o = config.optimizer
  key = 'features' if config.features == 'backbone' else 'proj'
  bs = config.batch_size
  n_train = labelled.num_selected(data_cfg, data_cfg.train_split,
                                  max_examples=config.train_examples)
  spe = n_train // bs
  if spe < 1:
    raise config_lib.ConfigError(f'config.batch_size={bs} exceeds the {n_train} train '
                                 f'examples; accepted: a batch <= {n_train}.')
  total_steps = spe * config.epochs
  lr_fn = optim.epoch_schedule(o.base_lr, bs, spe, config.epochs, schedule=o.schedule,
                               step_epochs=tuple(o.step_epochs), step_factor=o.step_factor)
  tx = optim.probe_sgd(lr_fn, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay)
  sample = jnp.zeros((2, int(data_cfg.image_size), int(data_cfg.image_size), 3), jnp.uint8)
  d = jax.eval_shape(lambda: net.apply(net.variables(), sample)[key]).shape[-1]

  abstract = _abstract(jax.eval_shape(lambda: init_probe(
      d, num_classes, tx, {'mean': jnp.zeros((d,)), 'std': jnp.ones((d,))})), mesh)
  state, meta = _restore(ckpt, abstract)
  if state is None:
    if config.feature_norm == 'l2_standardize':
      stats_src = features.extract(feat_fn, variables, data_cfg, split=data_cfg.train_split,
                                  mesh=mesh, batch_size=config.eval_batch_size,
                                  max_examples=config.train_examples)
      norm = norm_stats(jnp.asarray(stats_src['features']), config.feature_norm)
    else:
      norm = norm_stats(jnp.zeros((1, d)), config.feature_norm)
    state = jax.device_put(init_probe(d, num_classes, tx, norm), sharding.replicated(mesh))
  start = int(jax.device_get(state.step))
  probe_in = labelled.labelled_train_iterator(data_cfg, split=data_cfg.train_split,
                                     global_batch_size=bs, seed=config.seed,
                                     augment=config.augment, crop_scale=tuple(config.crop_scale),
                                     start_step=start, max_examples=config.train_examples)
  assert probe_in.steps_per_epoch == spe, (probe_in.steps_per_epoch, spe)

  def train_step(st: ProbeState, frozen, batch):
    f = jax.lax.stop_gradient(net.apply(frozen, batch['image'])[key]).astype(jnp.float32)
    x = apply_norm(f, config.feature_norm, st.norm)
    loss, grads = jax.value_and_grad(
        lambda h: _cross_entropy(head_logits(h, x), batch['label']))(st.head)
    updates, opt_state = tx.update(grads, st.opt_state, st.head)
    return st.replace(step=st.step + 1, head=optax.apply_updates(st.head, updates),
                      opt_state=opt_state), {'loss': loss, 'lr': lr_fn(st.step),
                                             'finite/loss': jnp.isfinite(loss)}, None

  step_fn = jax.jit(train_step, donate_argnums=(0,),
                    out_shardings=(jax.tree.map(lambda a: a.sharding, abstract), None, None))

  def logits_fn(frozen_and_state, images):
    frozen, st = frozen_and_state
    f = net.apply(frozen, images)[key].astype(jnp.float32)
    return {'logits': head_logits(st.head, apply_norm(f, config.feature_norm, st.norm))}
  logits_fn = jax.jit(logits_fn)

  def evaluate(st) -> dict[str, float]:
    out = features.extract(logits_fn, (variables, st), data_cfg, split=data_cfg.eval_split,
                          mesh=mesh, batch_size=config.eval_batch_size,
                          max_examples=config.eval_examples)
    return metrics.top1_top5(out['logits'], out['label'])

  pre_lib.log(f'Linear probe: {probe_in.num_examples} train examples, batch {bs}, {spe} '
              f'steps/epoch x {config.epochs} epochs, augment={config.augment}, from step '
              f'{start}.')

  def on_log(step, avg, host, partial):
    del host, partial
    writer.write_scalars(step, {f'{TAG}/train_loss': avg['loss'], f'{TAG}/lr': avg['lr'],
                                f'{TAG}/epoch': step / spe,
                                f'{TAG}/steps_per_sec': avg['steps_per_sec']})
    pre_lib.log(f'[linear step {step}/{total_steps}] loss {avg["loss"]:.4f} | '
                + utils.progress(step, total_steps, avg['steps_per_sec'], bs))

  def eval_action(step, st, _):
    res = evaluate(st)
    writer.write_scalars(step, {f'{TAG}/test_{k}': v for k, v in res.items()})
    pre_lib.log(f'[linear epoch {step // spe}] test top-1 {100 * res["top1"]:.2f}%')

  batches = (sharding.global_batch(mesh, b) for b in probe_in.iterator)
  out = loop.run(
      state, lambda st, batch: step_fn(st, variables, batch), batches, start_step=start, total_steps=total_steps,
      log_every=max(1, int(config.log_every_steps)), on_log=on_log, log=pre_lib.log,
      actions=[loop.Action('eval', utils.steps(config, 'eval_every', spe), eval_action,
                           skip_last=True),
               loop.Action('checkpoint', utils.steps(config, 'checkpoint_every', spe, default=spe),
                           lambda step, st, _: ckpt.save(step, st, {'step': step,
                                                                   'epoch': step / spe},
                                                         force=True))],
      nonfinite_hint=f'Lower config.optimizer.base_lr (now {o.base_lr}).')
  state = out.state
  return evaluate(state), total_steps
