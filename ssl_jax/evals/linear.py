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
  arrays (:func:`fit_cached`) — a whole epoch is one ``lax.scan`` (seconds per epoch, even for
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

The probe is fine-tuning with the backbone frozen: :func:`probe_net` describes it and
:func:`ssl_jax.evals.supervised.train` (the trainer ``--mode=finetune`` runs too) trains it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, optim, sharding, writers
from ssl_jax.evals import devices, features, report, supervised
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
# The probe: a frozen backbone (or its cached features), the normalisation and a linear head
# =============================================================================================
def probe_net(config: ml_collections.ConfigDict, num_classes: int, dim: int,
              data: supervised.Streamed | supervised.Cached, *, mesh,
              norm: Callable[[], dict[str, jax.Array]], frozen: Any = None,
              feature_fn: Callable | None = None) -> supervised.Net:
  """The probe as a :class:`~ssl_jax.evals.supervised.Net`: ``logits = W n(f) + b``, only
  ``{'head': {'kernel', 'bias'}}`` trained (from zero), by SGD with momentum on the schedule of
  ``config.optimizer``. ``f``: ``feature_fn(frozen, images)`` (the frozen backbone's features,
  no gradient) or, without ``feature_fn``, the cached features themselves. ``norm()`` gives the
  normalisation statistics of a fresh start (a resume reads them from the checkpoint)."""
  o, mode = config.optimizer, config.feature_norm
  lr_fn = optim.epoch_schedule(o.base_lr, data.batch_size, data.steps_per_epoch, config.epochs,
                               schedule=o.schedule, step_epochs=tuple(o.step_epochs),
                               step_factor=o.step_factor)
  tx = optim.probe_sgd(lr_fn, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay)

  def apply(st: supervised.State, frozen_vars, x, *, train: bool):
    del train   # the backbone stays in eval mode
    if feature_fn is not None:
      x = jax.lax.stop_gradient(feature_fn(frozen_vars, x))
    return head_logits(st.params['head'], apply_norm(x, mode, st.norm)), st.batch_stats

  def fresh(norm_stats_: dict[str, jax.Array]) -> supervised.State:
    head = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
    return supervised.new_state({'head': head}, tx, norm=norm_stats_)

  zeros = {'mean': jnp.zeros((dim,)), 'std': jnp.ones((dim,))}
  return supervised.Net(
      name='linear', tag=TAG, apply=apply, loss=_cross_entropy, tx=tx, lr_fn=lr_fn,
      abstract=jax.eval_shape(lambda: fresh(zeros)),
      init=lambda: jax.device_put(fresh(norm()), sharding.replicated(mesh)),
      frozen={} if frozen is None else frozen,
      about=('cached features' if feature_fn is None else f'augment={config.augment}'))


def fit_cached(config: ml_collections.ConfigDict, workdir: str, train, test, *,
               num_classes: int, mesh, writer) -> tuple[supervised.State, list[dict[str, Any]]]:
  """The probe on feature arrays ``train`` / ``test`` = ``{'features' [N, d], 'label' [N]}``
  (``cache_features=True``; label < 0: ignored): the final state and the evaluations."""
  data = supervised.Cached(train, test, config.batch_size, mesh)
  norm = lambda: jax.jit(norm_stats, static_argnums=1)(data.x, config.feature_norm,  # noqa: E731
                                                       data.valid)
  probe = probe_net(config, num_classes, data.x.shape[1], data, mesh=mesh, norm=norm)
  return supervised.train(config, workdir, probe, data, mesh=mesh, writer=writer)


# =============================================================================================
# Config validation
# =============================================================================================
def validate(c: ml_collections.ConfigDict) -> None:
  supervised.validate(c, optimizer_keys=('base_lr', 'momentum', 'weight_decay'))
  req = config_lib.require
  req(c.feature_norm in FEATURE_NORMS, 'feature_norm', c.feature_norm, ', '.join(FEATURE_NORMS))
  req(c.features in pre_lib.FEATURES, 'features', c.features, ', '.join(pre_lib.FEATURES))
  req(c.optimizer.schedule in optim.EVAL_SCHEDULES, 'optimizer.schedule', c.optimizer.schedule,
      ', '.join(optim.EVAL_SCHEDULES))
  if c.cache_features and c.augment != 'none':
    report.log("Note: cache_features=True extracts features once without augmentation; "
               f"config.augment={c.augment!r} is ignored.")


# =============================================================================================
# --mode=linear
# =============================================================================================
def run(config: ml_collections.ConfigDict, workdir: str, *,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Train and evaluate the offline linear probe; returns ``{'top1', 'top5', ...}``."""
  validate(config)
  mesh = devices.eval_mesh(config, ('batch_size', 'eval_batch_size'))
  ckpt_lib.check_workdir_config(workdir, config, allow_config_change=allow_config_change)
  pre, data_cfg, net, pre_step = pre_lib.load_for_eval(config)
  num_classes = int(data_cfg.num_classes)
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  t0 = time.time()
  with jax.set_mesh(mesh):
    variables = net.variables(mesh)
    feat_fn = jax.jit(net.feature_fn(config.features))

    def extract(split, max_examples):
      return features.extract(feat_fn, variables, data_cfg, split=split, mesh=mesh,
                              batch_size=config.eval_batch_size, max_examples=max_examples)

    if config.cache_features:
      train = extract(data_cfg.train_split, config.train_examples)
      test = extract(data_cfg.eval_split, config.eval_examples)
      report.log(f'Cached features: train {train["features"].shape}, test '
                 f'{test["features"].shape}.')
      _, history = fit_cached(config, workdir, train, test, num_classes=num_classes,
                              mesh=mesh, writer=writer)
    else:
      data = supervised.Streamed(data_cfg, config.batch_size,
                                 max_examples=config.train_examples)
      raw_fn = net.feature_fn(config.features)
      sample = jnp.zeros((2, int(data_cfg.image_size), int(data_cfg.image_size), 3), jnp.uint8)
      d = jax.eval_shape(lambda: raw_fn(net.variables(), sample)['features']).shape[-1]

      def norm():
        if config.feature_norm != 'l2_standardize':
          return norm_stats(jnp.zeros((1, d)), config.feature_norm)
        f = extract(data_cfg.train_split, config.train_examples)['features']
        return norm_stats(jnp.asarray(f), config.feature_norm)

      probe = probe_net(config, num_classes, d, data, mesh=mesh, norm=norm, frozen=variables,
                        feature_fn=lambda v, images: raw_fn(v, images)['features'])
      _, history = supervised.train(config, workdir, probe, data, mesh=mesh, writer=writer)
  writer.flush()
  accs = {k: history[-1][k] for k in ('top1', 'top5')}
  o = config.optimizer
  out = dict(accs)
  out.update({'pretrained': config.pretrained, 'pretrained_step': pre_step,
              'method': pre.method.name, 'backbone': pre.model.backbone,
              'dataset': data_cfg.name, 'features': config.features,
              'feature_norm': config.feature_norm, 'cache_features': bool(config.cache_features),
              'augment': 'none' if config.cache_features else config.augment,
              'epochs': config.epochs, 'base_lr': o.base_lr, 'weight_decay': o.weight_decay,
              'time_s': time.time() - t0})
  report.write_json(workdir, 'results.json', out)
  report.log(f'Offline linear probe ({config.features} features, {config.feature_norm}, '
             f'{config.epochs} epochs) on {data_cfg.name}/{data_cfg.eval_split}: '
             f'top-1 {100 * accs["top1"]:.2f}% | top-5 {100 * accs["top5"]:.2f}% '
             f'({out["time_s"]:.0f}s). Written to {workdir}/results.json.')
  return out
