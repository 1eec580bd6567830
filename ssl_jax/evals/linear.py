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
(:func:`labelled_train_iterator`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib
from ssl_jax import sharding
from ssl_jax import writers
from ssl_jax.evals import pretrained as pre_lib

FEATURE_NORMS = ('none', 'l2', 'l2_standardize')
SCHEDULES = ('cosine', 'step', 'constant')
AUGMENTS = ('rrc_flip', 'none')
TAG = 'offline_linear'


# =============================================================================================
# Labelled train input (shared with --mode=finetune)
# =============================================================================================
_INT64_MAX = np.iinfo(np.int64).max


def _tf():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf


@functools.lru_cache(maxsize=None)
def _view_spec(size: int, crop_scale: tuple[float, float]):
  from ssl_jax.data import views  # pylint: disable=import-outside-toplevel
  return (views.ViewSpec('image', size=size, crop_scale=crop_scale, flip_p=0.5,
                         jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                         solarize_p=0.0),)


def _int_seed(*values: int) -> int:
  """A 31-bit integer seed from integers (for tf.data / TFDS arguments that take ints)."""
  state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)
  return int(state[0] & 0x7FFFFFFF)


def example_ids(data_cfg, split: str) -> np.ndarray:
  """Per-example string ids of ``split`` in reading order: TFDS 'file_name' (ImageNet) or 'id'
  (CIFAR); folder datasets: the file name. Used to match a subset file of image ids."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  if data_cfg.get('source', 'tfds') == 'folder':
    src = sources.build_source(data_cfg, split, 0, 1)
    return np.array([os.path.basename(p) for p in src.paths])
  builder = sources.tfds_builder(data_cfg)
  key = next((k for k in ('file_name', 'id') if k in builder.info.features), None)
  if key is None:
    raise ValueError(f'{data_cfg.name} has no per-example id feature (file_name / id), so a '
                     'subset file cannot be matched; accepted: a label fraction instead.')
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=sources.deterministic_options()))
  ds = ds.map(_tf().autograph.experimental.do_not_convert(lambda e: e[key])).batch(4096)
  return np.concatenate([b.astype(str) for b in ds.as_numpy_iterator()])


def split_labels(data_cfg, split: str) -> np.ndarray:
  """All labels of ``split`` in reading order (for subset selection)."""
  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  src = sources.build_source(data_cfg, split, 0, 1)
  if isinstance(src, (sources.ArraySource, sources.FolderSource)):
    return np.asarray(src.labels)
  ds = src.dataset(shuffle_seed=None).map(
      _tf().autograph.experimental.do_not_convert(lambda e: e['label'])).batch(4096)
  return np.concatenate(list(ds.as_numpy_iterator())).astype(np.int32)


@dataclasses.dataclass
class LabelledInput:
  """An infinite iterator of ``{'image': uint8 [b, S, S, 3], 'label': int32 [b]}`` (this host's
  slice of each global batch) and the number of steps that make one epoch of the (subset)."""
  iterator: Iterator[dict[str, np.ndarray]]
  steps_per_epoch: int
  num_examples: int


def num_selected(data_cfg, split: str, indices: np.ndarray | None = None,
                 max_examples: int = -1) -> int:
  """How many examples :func:`labelled_train_iterator` draws from (one epoch = this // batch)."""
  from ssl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  total = pipeline.num_examples(data_cfg, split) if indices is None else len(indices)
  return min(total, max_examples) if max_examples > 0 else total


def labelled_train_iterator(data_cfg, *, split: str, global_batch_size: int, seed: int,
                            augment: str = 'rrc_flip',
                            crop_scale: Sequence[float] = (0.08, 1.0), start_step: int = 0,
                            indices: np.ndarray | None = None, max_examples: int = -1,
                            process_index: int | None = None,
                            process_count: int | None = None) -> LabelledInput:
  """Shuffled, augmented, labelled batches of ``split`` (or of its examples ``indices``).

  Deterministic in ``(seed, step)``: ``start_step=s`` yields what a fresh iterator yields from
  its s-th batch on. Epoch ``e`` visits the selected examples in a permutation seeded by
  ``(seed, e)`` (drop remainder); crops are seeded by each example's stream position and flips
  by the step. Random-access sources (in-memory arrays, image folders) select exactly
  ``indices`` over the whole split and give each host an even share. Streamed TFDS sources read
  each host's own slice; there ``indices`` refer to positions in the full split too.

  ``augment``: ``'rrc_flip'`` (RandomResizedCrop(``crop_scale``, 3/4-4/3) + flip p 0.5) or
  ``'none'`` (the eval transform: shorter side to ``eval_resize``, centre crop).
  """
  if augment not in AUGMENTS:
    raise ValueError(f'augment={augment!r} is invalid; accepted: {", ".join(AUGMENTS)}')
  from ssl_jax.data import augment as aug_lib  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import pipeline, sources, views  # pylint: disable=import-outside-toplevel
  tf = _tf()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  b = pipeline.local_batch_size(global_batch_size, pc)
  size = int(data_cfg.image_size)
  resize = int(data_cfg.get('eval_resize') or size)
  specs = _view_spec(size, (float(crop_scale[0]), float(crop_scale[1])))
  root = tf.constant([_int_seed(seed, 0), _int_seed(seed, 1)], tf.int64)
  shuffle_root = aug_lib.fold_in(root, 1)
  example_root = aug_lib.fold_in(aug_lib.fold_in(root, pi), 4)
  flip_root = aug_lib.fold_in(aug_lib.fold_in(root, pi), 3)

  full = sources.build_source(data_cfg, split, 0, 1)
  if not isinstance(full, sources.TfdsSource):  # random access over the whole split
    src = full
    sel = np.arange(src.num_examples) if indices is None else np.asarray(indices, np.int64)
    if max_examples > 0:
      sel = sel[:max_examples]
    total = len(sel)
    spe = total // global_batch_size
    if spe < 1:
      raise ValueError(f'batch_size={global_batch_size} exceeds the {total} selected examples '
                       f'of {data_cfg.name}/{split}; accepted: a batch <= {total}.')
    mine = sel[sources.even_slice(total, pi, pc)]
    n_h = len(mine)
    per_epoch = spe * b
    if isinstance(src, sources.ArraySource):
      images = tf.constant(src.images[mine])
      labels = tf.constant(src.labels[mine])

      def load(i):
        return tf.gather(images, i), tf.gather(labels, i)
    else:
      paths = tf.constant(src.paths[mine].astype(str))
      labels = tf.constant(src.labels[mine])

      def load(i):
        return sources.decode_image(tf.io.read_file(tf.gather(paths, i))), tf.gather(labels, i)

    def read(pos):
      seed_e = aug_lib.fold_in(shuffle_root, pos // per_epoch)
      i = tf.random.experimental.index_shuffle(pos % per_epoch, seed=seed_e, max_index=n_h - 1)
      image, label = load(i)
      return {'image': image, 'label': label, '_pos': pos}

    ds = tf.data.Dataset.range(start_step * b, _INT64_MAX)
    ds = ds.map(tf.autograph.experimental.do_not_convert(read),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:  # streamed TFDS: this host's slice, filtered to the selected positions
    src = sources.build_source(data_cfg, split, pi, pc)
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    ds = src.builder.as_dataset(split=src.split, shuffle_files=indices is None,
                                decoders={'image': tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(
                                    shuffle_seed=_int_seed(seed, pi),
                                    options=sources.deterministic_options()))
    has_labels = src.has_labels
    dnc = tf.autograph.experimental.do_not_convert
    ds = ds.map(dnc(lambda e: {'image': e['image'], 'label': tf.cast(e['label'], tf.int32)
                               if has_labels else tf.constant(-1, tf.int32)}))
    total = pipeline.num_examples(data_cfg, split)
    if indices is not None:
      # Positions of this host's slice within the split (TFDS even split into pc parts).
      offset = sum(sources.tfds_num_examples(data_cfg, split, p, pc) for p in range(pi))
      sel = np.asarray(indices, np.int64)
      local = sel[(sel >= offset) & (sel < offset + src.num_examples)] - offset
      table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
          tf.constant(local, tf.int64), tf.ones(len(local), tf.int64)), default_value=0)
      ds = ds.enumerate().filter(dnc(lambda i, e: table.lookup(i) > 0)).map(dnc(lambda i, e: e))
      total = len(sel)
    if max_examples > 0:
      ds = ds.take(max(1, max_examples // pc))
      total = min(total, max_examples)
    spe = total // global_batch_size
    if spe < 1:
      raise ValueError(f'batch_size={global_batch_size} exceeds the {total} selected examples '
                       f'of {data_cfg.name}/{split}; accepted: a batch <= {total}.')
    buffer = int(min(data_cfg.get('shuffle_buffer') or 10_000, max(total // pc, 1)))
    ds = ds.repeat().shuffle(buffer, seed=_int_seed(seed, pi, 1), reshuffle_each_iteration=True)
    ds = ds.skip(start_step * b).enumerate(start=start_step * b)
    ds = ds.map(dnc(lambda pos, e: {'image': sources.decode_image(e['image']),
                                    'label': e['label'], '_pos': pos}),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  if augment == 'rrc_flip':
    crop = views.traced_crop_views_example(specs)
    finish = views.traced_finish_views_batch(specs)

    def per_example(e):
      out = crop(e['image'], aug_lib.fold_in(example_root, e['_pos']))
      out['label'] = e['label']
      out['_pos'] = e['_pos']
      return out

    def per_batch(batch):
      step = batch['_pos'][0] // b
      out = finish(batch, aug_lib.fold_in(flip_root, step))
      return {'image': out['image'], 'label': out['label']}
  else:
    def per_example(e):
      return {'image': aug_lib.resize_shorter_center_crop(e['image'], resize, size),
              'label': e['label']}

    def per_batch(batch):
      return batch

  dnc = tf.autograph.experimental.do_not_convert
  ds = ds.map(dnc(per_example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.map(dnc(per_batch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(sources.deterministic_options())
  return LabelledInput(iterator=ds.as_numpy_iterator(), steps_per_epoch=spe,
                       num_examples=total)


# =============================================================================================
# Pure pieces: normalisation, schedule, loss, accuracy
# =============================================================================================
def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def norm_stats(feats: jax.Array, mode: str, valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """``{'mean', 'std'}`` [d] of the normalised features (``l2_standardize``), else 0 / 1."""
  if mode not in FEATURE_NORMS:
    raise ValueError(f'feature_norm={mode!r} is invalid; accepted: {", ".join(FEATURE_NORMS)}')
  d = feats.shape[-1]
  if mode != 'l2_standardize':
    return {'mean': jnp.zeros((d,), jnp.float32), 'std': jnp.ones((d,), jnp.float32)}
  f = l2_normalize(feats.astype(jnp.float32))
  w = jnp.ones(f.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(f * w[:, None], 0) / n
  var = jnp.sum(jnp.square(f - mean) * w[:, None], 0) / n
  return {'mean': mean, 'std': jnp.sqrt(var) + 1e-6}


def apply_norm(feats: jax.Array, mode: str, stats: dict[str, jax.Array]) -> jax.Array:
  f = feats.astype(jnp.float32)
  if mode == 'none':
    return f
  f = l2_normalize(f)
  if mode == 'l2':
    return f
  return (f - stats['mean']) / stats['std']


def lr_schedule(base_lr: float, batch_size: int, steps_per_epoch: int, epochs: float, *,
                schedule: str = 'cosine', step_epochs: Sequence[float] = (),
                step_factor: float = 0.1, warmup_epochs: float = 0.0) -> optax.Schedule:
  """``lr = base_lr * B / 256``; cosine to 0 over the run, steps of ``step_factor`` at
  ``step_epochs``, or constant; optional linear warm-up."""
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule={schedule!r} is invalid; accepted: {", ".join(SCHEDULES)}')
  peak = base_lr * batch_size / 256.0
  total = max(int(round(epochs * steps_per_epoch)), 1)
  warm = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
  if schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(total - warm, 1))
  elif schedule == 'step':
    main = optax.piecewise_constant_schedule(
        peak, {max(int(round(e * steps_per_epoch)) - warm, 1): step_factor
               for e in step_epochs})
  else:
    main = optax.constant_schedule(peak)
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def sgd(schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD + momentum; weight decay on weight matrices only (not biases), as a probe should."""
  parts = []
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay,
                                           mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.maximum(labels, 0))
  m = (labels >= 0) if mask is None else (mask & (labels >= 0))
  m = m.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
                 ) -> dict[int, jax.Array]:
  """Number of rows whose label is among the top-k logits, per k (rows with label < 0 skipped).

  Ties count against the label: rank = #classes with a strictly larger logit, plus the
  equal-logit classes with a lower id.
  """
  c = logits.shape[-1]
  own = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)
  ids = jnp.arange(c)[None, :]
  rank = jnp.sum((logits > own) | ((logits == own) & (ids < labels[:, None])), axis=1)
  ok = labels >= 0
  return {k: jnp.sum((rank < k) & ok) for k in ks}


def top1_top5(logits, labels) -> dict[str, float]:
  """Top-1 / top-5 accuracy (top-C when there are fewer than 5 classes) over labels >= 0."""
  c = logits.shape[-1]
  corr = topk_correct(jnp.asarray(logits), jnp.asarray(labels), (1, min(5, c)))
  n = max(int(np.sum(np.asarray(labels) >= 0)), 1)
  return {'top1': float(corr[1]) / n, 'top5': float(corr[min(5, c)]) / n}


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
  lr_fn = lr_schedule(base_lr, bs, spe, epochs, schedule=schedule, step_epochs=step_epochs,
                      step_factor=step_factor)
  tx = sgd(lr_fn, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
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
      loss, grads = jax.value_and_grad(lambda h: cross_entropy(head_logits(h, x), y))(st.head)
      updates, opt_state = tx.update(grads, st.opt_state, st.head)
      return st.replace(step=st.step + 1, head=optax.apply_updates(st.head, updates),
                        opt_state=opt_state), loss

    state, losses = jax.lax.scan(one_step, state, idx)
    return state, jnp.mean(losses)

  history = []
  for epoch in range(start_epoch, epochs):
    state, loss = run_epoch(state, f_dev, y_dev, jnp.int32(epoch))
    history.append(float(loss))
    if not math.isfinite(history[-1]):
      raise FloatingPointError(f'linear probe loss is {history[-1]} at epoch {epoch + 1}; lower '
                               f'config.optimizer.base_lr (now {base_lr}) or use '
                               "feature_norm='l2_standardize'.")
    if on_epoch is not None:
      on_epoch(epoch + 1, state, history[-1])
  return LinearResult(state=state, feature_norm=feature_norm, epoch_losses=history)


def evaluate_arrays(result: LinearResult, feats, labels, ks: Sequence[int] = (1, 5)
                    ) -> dict[str, float]:
  """Top-k accuracies of a probe on feature arrays (k capped at the number of classes)."""
  logits = result.logits(feats)
  c = logits.shape[-1]
  labels = jnp.asarray(labels, jnp.int32)
  correct = topk_correct(logits, labels, tuple(min(k, c) for k in ks))
  n = max(int(jnp.sum(labels >= 0)), 1)
  return {f'top{k}': float(correct[min(k, c)]) / n for k in ks}


# =============================================================================================
# Config validation
# =============================================================================================
def validate(c: ml_collections.ConfigDict) -> None:
  pre_lib.validate_common(c)
  req = pre_lib.require
  req(c.feature_norm in FEATURE_NORMS, 'feature_norm', c.feature_norm, ', '.join(FEATURE_NORMS))
  req(c.augment in AUGMENTS, 'augment', c.augment, ', '.join(AUGMENTS))
  req(c.features in pre_lib.FEATURES, 'features', c.features, ', '.join(pre_lib.FEATURES))
  req(c.optimizer.schedule in SCHEDULES, 'optimizer.schedule', c.optimizer.schedule,
      ', '.join(SCHEDULES))
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
  metrics, final_step = result
  writer.write_scalars(final_step, {f'{TAG}/test_{k}': v for k, v in metrics.items()})
  writer.flush()
  out = dict(metrics)
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
              f'top-1 {100 * metrics["top1"]:.2f}% | top-5 {100 * metrics["top5"]:.2f}% '
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
  train = pre_lib.extract(feat_fn, variables, data_cfg, split=data_cfg.train_split, mesh=mesh,
                          batch_size=bs, max_examples=config.train_examples)
  test = pre_lib.extract(feat_fn, variables, data_cfg, split=data_cfg.eval_split, mesh=mesh,
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
  tx = sgd(lr_schedule(o.base_lr, config.batch_size, spe, config.epochs), momentum=o.momentum,
           nesterov=o.nesterov, weight_decay=o.weight_decay)
  zeros = {'mean': jnp.zeros((d,)), 'std': jnp.ones((d,))}
  state, meta = _restore(ckpt, _abstract(jax.eval_shape(
      lambda: init_probe(d, num_classes, tx, zeros)), mesh))
  start_epoch = int(meta['epoch']) if meta else 0
  every = max(1, int(config.checkpoint_every_epochs))
  eval_every = int(config.eval_every_epochs)

  def on_epoch(epoch, st, loss):
    step = int(st.step)
    writer.write_scalars(step, {f'{TAG}/train_loss': loss, f'{TAG}/epoch': epoch})
    if eval_every > 0 and epoch % eval_every == 0 and epoch != config.epochs:
      res = evaluate_arrays(LinearResult(st, config.feature_norm, []), test['features'],
                            test['label'])
      writer.write_scalars(step, {f'{TAG}/test_{k}': v for k, v in res.items()})
      pre_lib.log(f'[linear epoch {epoch}/{config.epochs}] loss {loss:.4f} | '
                  f'test top-1 {100 * res["top1"]:.2f}%')
    if epoch % every == 0 or epoch == config.epochs:
      ckpt.save(step, st, {'step': step, 'epoch': epoch}, force=True)

  result = train_linear(train['features'], train['label'], state=state,
                        start_epoch=start_epoch, on_epoch=on_epoch, **kw)
  metrics = evaluate_arrays(result, test['features'], test['label'])
  return metrics, int(result.state.step)


def _run_streaming(config, data_cfg, net, variables, feat_fn, mesh, ckpt, writer, num_classes):
  o = config.optimizer
  key = 'features' if config.features == 'backbone' else 'proj'
  bs = config.batch_size
  n_train = num_selected(data_cfg, data_cfg.train_split, max_examples=config.train_examples)
  spe = n_train // bs
  if spe < 1:
    raise config_lib.ConfigError(f'config.batch_size={bs} exceeds the {n_train} train '
                                 f'examples; accepted: a batch <= {n_train}.')
  total_steps = spe * config.epochs
  lr_fn = lr_schedule(o.base_lr, bs, spe, config.epochs, schedule=o.schedule,
                      step_epochs=tuple(o.step_epochs), step_factor=o.step_factor)
  tx = sgd(lr_fn, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
  sample = jnp.zeros((2, int(data_cfg.image_size), int(data_cfg.image_size), 3), jnp.uint8)
  d = jax.eval_shape(lambda: net.apply(net.variables(), sample)[key]).shape[-1]

  abstract = _abstract(jax.eval_shape(lambda: init_probe(
      d, num_classes, tx, {'mean': jnp.zeros((d,)), 'std': jnp.ones((d,))})), mesh)
  state, meta = _restore(ckpt, abstract)
  if state is None:
    if config.feature_norm == 'l2_standardize':
      stats_src = pre_lib.extract(feat_fn, variables, data_cfg, split=data_cfg.train_split,
                                  mesh=mesh, batch_size=config.eval_batch_size,
                                  max_examples=config.train_examples)
      norm = norm_stats(jnp.asarray(stats_src['features']), config.feature_norm)
    else:
      norm = norm_stats(jnp.zeros((1, d)), config.feature_norm)
    state = jax.device_put(init_probe(d, num_classes, tx, norm), sharding.replicated(mesh))
  start = int(jax.device_get(state.step))
  probe_in = labelled_train_iterator(data_cfg, split=data_cfg.train_split,
                                     global_batch_size=bs, seed=config.seed,
                                     augment=config.augment, crop_scale=tuple(config.crop_scale),
                                     start_step=start, max_examples=config.train_examples)
  assert probe_in.steps_per_epoch == spe, (probe_in.steps_per_epoch, spe)

  def train_step(st: ProbeState, frozen, batch):
    f = jax.lax.stop_gradient(net.apply(frozen, batch['image'])[key]).astype(jnp.float32)
    x = apply_norm(f, config.feature_norm, st.norm)
    loss, grads = jax.value_and_grad(
        lambda h: cross_entropy(head_logits(h, x), batch['label']))(st.head)
    updates, opt_state = tx.update(grads, st.opt_state, st.head)
    return st.replace(step=st.step + 1, head=optax.apply_updates(st.head, updates),
                      opt_state=opt_state), {'loss': loss, 'lr': lr_fn(st.step)}

  step_fn = jax.jit(train_step, donate_argnums=(0,),
                    out_shardings=(jax.tree.map(lambda a: a.sharding, abstract), None))

  def logits_fn(frozen_and_state, images):
    frozen, st = frozen_and_state
    f = net.apply(frozen, images)[key].astype(jnp.float32)
    return {'logits': head_logits(st.head, apply_norm(f, config.feature_norm, st.norm))}
  logits_fn = jax.jit(logits_fn)

  def evaluate(st) -> dict[str, float]:
    out = pre_lib.extract(logits_fn, (variables, st), data_cfg, split=data_cfg.eval_split,
                          mesh=mesh, batch_size=config.eval_batch_size,
                          max_examples=config.eval_examples)
    return top1_top5(out['logits'], out['label'])

  pre_lib.log(f'Linear probe: {probe_in.num_examples} train examples, batch {bs}, {spe} '
              f'steps/epoch x {config.epochs} epochs, augment={config.augment}, from step '
              f'{start}.')
  every = max(1, int(config.checkpoint_every_epochs)) * spe
  eval_every = int(config.eval_every_epochs) * spe
  log_every = max(1, int(config.log_every_steps))
  losses: list[Any] = []
  t_last = time.time()
  for step in range(start + 1, total_steps + 1):
    batch = sharding.global_batch(mesh, next(probe_in.iterator))
    state, m = step_fn(state, variables, batch)
    losses.append(m)
    if step % log_every == 0 or step == total_steps:
      host = jax.device_get(losses)
      losses.clear()
      loss = float(np.mean([h['loss'] for h in host]))
      if not math.isfinite(loss):
        raise FloatingPointError(f'linear probe loss is {loss} at step {step}; lower '
                                 f'config.optimizer.base_lr (now {o.base_lr}).')
      now = time.time()
      writer.write_scalars(step, {f'{TAG}/train_loss': loss, f'{TAG}/lr': float(host[-1]['lr']),
                                  f'{TAG}/epoch': step / spe,
                                  f'{TAG}/steps_per_sec': len(host) / max(now - t_last, 1e-9)})
      t_last = now
      pre_lib.log(f'[linear step {step}/{total_steps}] loss {loss:.4f}')
    if eval_every > 0 and step % eval_every == 0 and step != total_steps:
      res = evaluate(state)
      writer.write_scalars(step, {f'{TAG}/test_{k}': v for k, v in res.items()})
      pre_lib.log(f'[linear epoch {step // spe}] test top-1 {100 * res["top1"]:.2f}%')
    if step % every == 0 or step == total_steps:
      ckpt.save(step, state, {'step': step, 'epoch': step / spe}, force=True)
  return evaluate(state), total_steps
