"""The evaluation suite: linear probe, fine-tuning, kNN, embeddings, export — on a tiny pretrained
run on real CIFAR-10 — plus the pure pieces against scikit-learn / numpy references."""
from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import TFDS_DATA_DIR
from harness import knn_reference, load_config, split_images
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, sharding, train
from ssl_jax.evals import (embedding, eval_config, finetune, knn_eval, linear, score_plots,
                           supervised)

PRETRAIN_SPLIT = 'train[:1024]'
# The evals read these whole splits (no subset draw), in stored order: the tests' references
# read the same images with plain tfds.load.
TRAIN_SPLIT = 'train[:256]'
EVAL_SPLIT = 'test[:128]'


def _eval_config(name: str, arg: str, pretrained_dir: str):
  c = load_config(name, arg)
  c.pretrained = pretrained_dir
  c.train_split = TRAIN_SPLIT
  c.eval_split = EVAL_SPLIT
  c.train_examples = -1
  c.eval_examples = -1
  c.eval_batch_size = 64
  return c


def _tags(workdir: str) -> set[str]:
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def _scalars(workdir: str, tag: str) -> list[float]:
  """The values of one TensorBoard scalar, in step order."""
  out = []
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      out += [(event.step, float(tf.make_ndarray(v.tensor) if v.HasField('tensor')
                                 else v.simple_value)) for v in event.summary.value if v.tag == tag]
  return [v for _, v in sorted(out)]


def _pretrained_features(pretrained_dir: str, images: np.ndarray) -> np.ndarray:
  """Backbone features of the run's newest checkpoint, eval mode, without the eval code."""
  from ssl_jax.models import ssl_model
  pre, params, batch_stats, _ = ckpt_lib.load_pretrained(pretrained_dir)
  net = ssl_model.build_ssl_net(pre.model, image_size=images.shape[1], with_predictor=False)
  params, batch_stats = ({k: v for k, v in tree.items() if k in ('backbone', 'projector')}
                         for tree in (params, batch_stats))
  out = net.apply({'params': params, 'batch_stats': batch_stats}, images, train=False,
                  with_predictor=False)
  return np.asarray(out['features'], np.float64)


def _normalize(f: np.ndarray, mode: str, train: np.ndarray):
  """The probe's feature normalisation n(f) with statistics from ``train`` (MSF: l2 then
  standardise with the population std + 1e-6)."""
  if mode == 'none':
    return f
  l2 = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  if mode == 'l2':
    return l2(f)
  t = l2(train)
  return (l2(f) - t.mean(0)) / (t.std(0) + 1e-6)


def _probe_reference(train_f, train_y, *, steps: int, lr: float, momentum: float,
                     weight_decay: float, feature_norm: str, num_classes: int = 10):
  """``(W, b)`` of a full-batch softmax regression from W = 0, b = 0, in float64:
  ``g = grad mean CE(W n(f) + b, y) + wd W``, ``m <- g + momentum m``, ``theta <- theta - lr_t m``
  with the cosine schedule ``lr_t = lr (1 + cos(pi t / steps)) / 2``."""
  x = _normalize(train_f, feature_norm, train_f)
  onehot = np.eye(num_classes)[train_y]
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  for t in range(steps):
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(x)
    mw = x.T @ g + weight_decay * w + momentum * mw
    mb = g.sum(0) + momentum * mb
    lr_t = lr * (1 + np.cos(np.pi * t / steps)) / 2
    w, b = w - lr_t * mw, b - lr_t * mb
  return w, b


def _topk(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Top-k accuracy; a tie counts against the label (equal scores of lower class ids rank
  above it)."""
  own = scores[np.arange(len(labels)), labels][:, None]
  ids = np.arange(scores.shape[1])[None, :]
  rank = np.sum((scores > own) | ((scores == own) & (ids < labels[:, None])), axis=1)
  return float(np.mean(rank < k))


@pytest.fixture(scope='module')
def eval_data():
  """The images the evals see: TRAIN_SPLIT (256) and EVAL_SPLIT (128), read with plain
  tfds.load (CIFAR's eval transform, resize to 32 + centre crop 32, is the identity)."""
  return split_images(TRAIN_SPLIT, 256), split_images(EVAL_SPLIT, 128)


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
  """A 3-step BYOL resnet_tiny run on real CIFAR-10 (its checkpoint is what we evaluate)."""
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c = load_config('byol', 'cifar10,runlocal')
  c.total_steps = 3
  c.batch_size = 16
  c.log_every_steps = 3
  c.checkpoint.every_steps = 2   # checkpoints at steps 2 and 3
  c.checkpoint.async_save = False
  for ev in c.evals.values():   # no evaluator during the pre-training
    ev.update({'at_start': False, 'at_end': False})
  c.data.train_split = PRETRAIN_SPLIT
  c.data.data_dir = TFDS_DATA_DIR
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  res = train.train_and_evaluate(c, workdir)
  assert res['final_step'] == 3
  return workdir


# =============================================================================================
# Pure pieces
# =============================================================================================
def test_class_balanced_subset_is_balanced_seeded_and_nested():
  rng = np.random.default_rng(0)
  sizes = {0: 500, 1: 300, 2: 1000, 3: 7}
  labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in sizes.items()] +
                                          [np.full(5, -1)]))
  sub = finetune.class_balanced_subset(labels, 0.1, seed=3)
  counts = np.bincount(labels[sub], minlength=4)
  assert counts.tolist() == [50, 30, 100, 1]          # round(0.1 n_c), at least 1
  assert (labels[sub] >= 0).all() and np.all(np.diff(sub) > 0)
  np.testing.assert_array_equal(sub, finetune.class_balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(sub, finetune.class_balanced_subset(labels, 0.1, seed=4))
  small = finetune.class_balanced_subset(labels, 0.01, seed=3)
  assert np.bincount(labels[small], minlength=4).tolist() == [5, 3, 10, 1]
  assert set(small) <= set(sub)                        # 1% inside 10% (same seed)
  assert len(finetune.class_balanced_subset(labels, 1.0)) == sum(sizes.values())
  assert finetune.parse_fraction('1%') == 0.01 and finetune.parse_fraction('10%') == 0.1
  assert finetune.parse_fraction('0.05') == 0.05 and finetune.parse_fraction('all') == 1.0
  for bad in ('0', '150%', 'ten', '-1%'):
    with pytest.raises(config_lib.ConfigError, match=f'label_fraction={bad!r}.*accepted'):
      finetune.parse_fraction(bad)
  ids = ['a/n01_1.JPEG', 'n01_2.JPEG', 'n02_3.JPEG']
  np.testing.assert_array_equal(finetune.match_ids(ids, ['n01_1.JPEG', 'n02_3.JPEG']), [0, 2])
  with pytest.raises(ValueError, match='not in the split'):
    finetune.match_ids(ids, ['missing.JPEG'])


def test_finetune_ema_update_matches_numpy_model_ema():
  """timm ModelEmaV2 on every leaf: ema <- d * ema + (1 - d) * w after each step; a float64
  numpy loop over a random weight trajectory is the reference."""
  rng = np.random.default_rng(0)
  shapes = {'backbone': {'w': (3, 4), 'b': (4,)}, 'head': {'kernel': (4, 2)}}
  init = jax.tree.map(lambda sh: rng.standard_normal(sh).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
  traj = [jax.tree.map(lambda a: (a + rng.standard_normal(a.shape)).astype(np.float32), init)
          for _ in range(30)]
  step = jax.jit(supervised.ema_update, static_argnums=2)
  for decay in (0.9, 0.99996):
    ema = jax.tree.map(jnp.asarray, init)
    ref = jax.tree.map(lambda a: a.astype(np.float64), init)
    for w in traj:
      ema = step(ema, w, decay)
      ref = jax.tree.map(lambda e, n: decay * e + (1 - decay) * n.astype(np.float64), ref, w)
    for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(ref)):
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Closed form for a constant target: ema_t = w + d^t (ema_0 - w).
  w = jax.tree.map(lambda a: a + 1.0, init)
  ema = jax.tree.map(jnp.asarray, init)
  for _ in range(10):
    ema = step(ema, w, 0.8)
  np.testing.assert_allclose(ema['head']['kernel'],
                             w['head']['kernel'] + 0.8 ** 10 * -1.0, rtol=1e-5, atol=1e-6)
  assert supervised.ema_update({}, {}, 0.5) == {}


def test_finetune_summarize_history_last_and_best():
  hist = [{'epoch': 1, 'step': 10, 'top1': 0.5, 'top5': 0.9, 'ema_top1': 0.4, 'ema_top5': 0.8},
          {'epoch': 2, 'step': 20, 'top1': 0.7, 'top5': 0.92, 'ema_top1': 0.6, 'ema_top5': 0.85},
          {'epoch': 3, 'step': 30, 'top1': 0.7, 'top5': 0.95, 'ema_top1': 0.65, 'ema_top5': 0.9},
          {'epoch': 4, 'step': 40, 'top1': 0.6, 'top5': 0.93, 'ema_top1': 0.66, 'ema_top5': 0.91}]
  s = supervised.summarize_history(hist)
  assert (s['top1_last'], s['top5_last'], s['last_epoch']) == (0.6, 0.93, 4)
  # Best top-1, the earliest on ties (official `acc > acc_best`); top-5 of that evaluation.
  assert (s['top1_best'], s['top5_best'], s['best_epoch']) == (0.7, 0.92, 2)
  assert (s['ema_top1_last'], s['ema_top1_best'], s['ema_best_epoch']) == (0.66, 0.66, 4)
  assert s['num_evals'] == 4
  text = finetune.format_summary(s)
  assert 'top-1 last 60.00% (epoch 4) | best 70.00% (epoch 2, of 4 evaluations)' in text
  assert 'EMA top-1 last 66.00% (epoch 4) | best 66.00% (epoch 4' in text
  plain = supervised.summarize_history([{k: v for k, v in h.items() if not k.startswith('ema')}
                                        for h in hist])
  assert not any(k.startswith('ema') for k in plain) and 'EMA' not in finetune.format_summary(plain)
  with pytest.raises(ValueError):
    supervised.summarize_history([])


def test_finetune_aps_preset_is_the_released_recipe():
  for vit, lr in (('vit_tiny', 2e-3), ('vit_small', 1e-3), ('vit_base', 5e-4)):
    c = load_config('eval_finetune', f'cifar100,aps,{vit}')
    # Released lr x B / 512 == our base_lr x B / 256.
    assert c.optimizer.base_lr * c.batch_size / 256 == pytest.approx(lr * 128 / 512)
    assert (c.label_fraction, c.epochs, c.batch_size, c.optimizer.name) == ('100%', 100, 128,
                                                                           'adamw')
    assert (c.optimizer.weight_decay, c.optimizer.warmup_epochs, c.label_smoothing) == (
        0.05, 5.0, 0.1)
    assert (c.drop_path, c.ema_decay, c.eval_every_epochs, c.recipe_backbone) == (
        0.1, 0.99996, 1, vit)
  default = load_config('eval_finetune', 'cifar10,1%')
  assert (default.drop_path, default.ema_decay, default.epochs) == (0.0, 0.0, 60)
  for bad in ('cifar10,vit_tiny', 'cifar10,aps,vit_huge'):
    with pytest.raises(config_lib.ConfigError, match='not recognised'):
      load_config('eval_finetune', bad)
  c = load_config('eval_finetune', 'cifar10,aps')
  c.pretrained = '/x'
  for key, value in (('drop_path', 1.0), ('ema_decay', -0.1), ('ema_decay', 1.0)):
    bad = c.copy_and_resolve_references()
    bad[key] = value
    with pytest.raises(config_lib.ConfigError, match=key):
      finetune.validate(bad)


def test_linear_probe_matches_sklearn_logistic_regression_on_random_features(tmp_path):
  """The cached-features probe of --mode=linear (the supervised trainer on feature arrays)."""
  from sklearn.linear_model import LogisticRegression
  from ssl_jax import writers
  rng = np.random.default_rng(0)
  n, d, c = 1200, 16, 4
  x = rng.normal(size=(n + 800, d)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(d, c)) + rng.gumbel(size=(n + 800, c)), 1)
  x_tr, y_tr, x_te, y_te = x[:n], y[:n], x[n:], y[n:]
  ref = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, y_tr)
  ref_acc = float(np.mean(ref.predict(x_te) == y_te))
  cfg = load_config('eval_linear', 'cifar10,cache')
  cfg.update({'epochs': 30, 'batch_size': 64, 'eval_every_epochs': 29})
  cfg.optimizer.base_lr = 0.4
  writer = writers.create(str(tmp_path), just_logging=False)
  state, history = linear.fit_cached(cfg, str(tmp_path), {'features': x_tr, 'label': y_tr},
                                     {'features': x_te, 'label': y_te}, num_classes=c,
                                     mesh=sharding.make_mesh(), writer=writer)
  writer.flush()
  assert [(h['epoch'], h['step']) for h in history] == [(29, 29 * 18), (30, 30 * 18)]
  assert int(state.step) == 30 * 18                         # 1200 // 64 = 18 steps per epoch
  acc = history[-1]
  assert abs(acc['top1'] - ref_acc) < 0.02, (acc, ref_acc)
  head = jax.device_get(state.params['head'])
  pred = np.argmax(x_te @ head['kernel'] + head['bias'], 1)
  assert np.mean(pred == ref.predict(x_te)) > 0.95
  assert abs(np.mean(pred == y_te) - acc['top1']) <= 1 / 800 and acc['top5'] == 1.0
  losses = _scalars(str(tmp_path), 'offline_linear/train_loss')
  assert len(losses) == 10 and losses[-1] < losses[0]      # ~10 log lines: every 3 epochs


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
def test_knn_classifier_equals_numpy_reference(metric):
  rng = np.random.default_rng(1)
  c = 5
  bank = rng.normal(size=(203, 8)).astype(np.float32)   # 203: padded to 4 shards
  labels = rng.integers(0, c, 203)
  queries = rng.normal(size=(37, 8)).astype(np.float32)
  ks, temps, unweighted = (1, 7, 300), (0.07, 0.5), (1, 20)
  if metric == 'euclidean':
    ks, temps, unweighted = (7,), (2.0,), (20,)
  scores = knn_eval.knn_classify(bank, labels, queries, num_classes=c, ks=ks,
                                 temperatures=temps, unweighted_ks=unweighted, metric=metric,
                                 l2_normalize=False, chunk_size=16, mesh=sharding.make_mesh())
  assert len(scores) == len(ks) * len(temps) + len(unweighted)
  for k in ks:
    for t in temps:
      ref = knn_reference(bank, labels, queries, c, k, t, True, metric)
      got = scores[knn_eval.weighted_name(k, t)]
      np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-5)
      np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
  for k in unweighted:
    ref = knn_reference(bank, labels, queries, c, k, 1.0, False, metric)
    np.testing.assert_array_equal(scores[knn_eval.unweighted_name(k)], ref)
  acc = knn_eval.accuracies(scores, labels[:37])
  assert set(acc) == {f'top{j}_{name}' for name in scores for j in (1, 5)}


def test_score_plot_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  path = score_plots.write_score_plot(str(tmp_path / 'sub' / 'scores.png'),
                                      rng.uniform(0.5, 1, 64), rng.uniform(-0.3, 0.6, (64, 16)),
                                      'epoch 1')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  img = score_plots.render_score_plot([0.9, np.nan], np.zeros((3, 2)), 't')
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3


def test_load_pretrained_errors_name_the_problem(tmp_path):
  with pytest.raises(ckpt_lib.PretrainedNotFound, match='config.json does not exist'):
    ckpt_lib.load_pretrained(str(tmp_path))
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ckpt_lib.PretrainedNotFound, match='No checkpoint in'):
    ckpt_lib.load_pretrained(str(tmp_path))
  c = load_config('eval_knn', 'cifar10')
  c.metric = 'dot'
  c.pretrained = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="metric='dot'.*accepted: cosine, euclidean"):
    knn_eval.validate(c)
  with pytest.raises(config_lib.ConfigError, match="'bogus'.*accepted"):
    load_config('eval_linear', 'cifar10,bogus')


# =============================================================================================
# Each mode on the tiny pretrained run
# =============================================================================================
@pytest.mark.slow
def test_load_pretrained_and_export(pretrained_dir, tmp_path):
  from ssl_jax import export
  from ssl_jax import main as main_lib
  config, params, batch_stats, step = ckpt_lib.load_pretrained(pretrained_dir)
  assert step == 3 and config.method.name == 'byol'
  assert {'backbone', 'projector'} <= set(params) and 'backbone' in batch_stats
  # A damaged newest checkpoint is skipped: the previous one is loaded.
  broken = tmp_path / 'broken'
  shutil.copytree(pretrained_dir, broken)
  for f in (broken / 'checkpoints' / '3' / 'state').rglob('*'):
    if f.is_file() and f.name not in ('_METADATA', '_CHECKPOINT_METADATA'):
      f.write_bytes(b'')
  assert ckpt_lib.load_pretrained(str(broken))[3] == 2
  c = _eval_config('eval_linear', 'cifar10', pretrained_dir)
  out = main_lib.run_eval('export', c, str(tmp_path))
  assert sorted(out) == ['npz', 'pth']
  for fmt in ('pth', 'npz'):
    p, s, fc = export.load_resnet(tmp_path / f'backbone.{fmt}')
    assert fc is None
    np.testing.assert_array_equal(p['conv1']['kernel'], params['backbone']['conv1']['kernel'])
    np.testing.assert_array_equal(s['bn1']['mean'], batch_stats['backbone']['bn1']['mean'])
  import json
  how = json.load(open(tmp_path / 'export.json'))['load']
  assert str(tmp_path / 'backbone.pth') in how['drop_in']
  assert how['preprocessing']['mean'] == [0.485, 0.456, 0.406] and how['preprocessing']['scale'] == '1/255'
  # The model is exported by the file; torchvision_model rebuilds it and matches our features.
  tv = export.torchvision_model(tmp_path / 'backbone.pth')
  assert tv[1].conv1.kernel_size == (3, 3)   # the CIFAR stem


@pytest.mark.slow
def test_linear_probe_cached_and_streaming(pretrained_dir, eval_data, tmp_path):
  (train_x, train_y), (test_x, test_y) = eval_data
  train_f = _pretrained_features(pretrained_dir, train_x)
  test_f = _pretrained_features(pretrained_dir, test_x)
  # Cached, full batch (256 = all train examples): 5 epochs are 5 gradient steps on the whole
  # set, which a float64 numpy softmax regression on independently computed features repeats.
  c = _eval_config('eval_linear', 'cifar10,runlocal,cache', pretrained_dir)
  c.epochs = 5
  c.batch_size = 256
  c.optimizer.base_lr = 0.5
  c.optimizer.weight_decay = 1e-3
  res = linear.run(c, str(tmp_path / 'cached'))
  assert res['cache_features']
  w, b = _probe_reference(train_f, train_y, steps=5, lr=0.5, momentum=0.9, weight_decay=1e-3,
                          feature_norm='none')
  probe, step = ckpt_lib.restore_state(str(tmp_path / 'cached'), items=('params',))
  assert step == 5
  head = probe['params']['head']
  scale = np.abs(w).max()
  np.testing.assert_allclose(head['kernel'], w, rtol=1e-3, atol=1e-3 * scale)
  np.testing.assert_allclose(head['bias'], b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
  ref = test_f @ w + b
  # One example of slack (1/128) for a float32-vs-float64 near-tie.
  assert abs(res['top1'] - _topk(ref, test_y, 1)) <= 1 / 128 + 1e-9, (res, _topk(ref, test_y, 1))
  assert abs(res['top5'] - _topk(ref, test_y, 5)) <= 1 / 128 + 1e-9, (res, _topk(ref, test_y, 5))
  # Resume: the finished run restores its last checkpoint and reports the same numbers.
  again = linear.run(c, str(tmp_path / 'cached'))
  assert (again['top1'], again['top5']) == (res['top1'], res['top5'])

  # Streaming, MSF protocol, augmented: the checkpointed probe is the one that was scored, and
  # its normalisation holds the train features' l2-then-standardise statistics.
  s = _eval_config('eval_linear', 'cifar10,runlocal,msf', pretrained_dir)
  s.epochs = 1
  s.batch_size = 32
  stream = linear.run(s, str(tmp_path / 'stream'))
  assert stream['augment'] == 'rrc_flip' and stream['feature_norm'] == 'l2_standardize'
  probe, step = ckpt_lib.restore_state(str(tmp_path / 'stream'), items=('params', 'norm'))
  probe['head'] = probe['params']['head']
  assert step == 8                                                # 256 / 32 steps x 1 epoch
  l2 = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  np.testing.assert_allclose(probe['norm']['mean'], l2.mean(0), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(probe['norm']['std'], l2.std(0) + 1e-6, rtol=1e-3, atol=1e-5)
  logits = (_normalize(test_f, 'l2_standardize', train_f) @ probe['head']['kernel']
            + probe['head']['bias'])
  assert np.abs(probe['head']['kernel']).max() > 0                # trained from W = 0
  assert abs(stream['top1'] - _topk(logits, test_y, 1)) <= 1 / 128 + 1e-9, stream
  assert abs(stream['top5'] - _topk(logits, test_y, 5)) <= 1 / 128 + 1e-9, stream
  for d, r in (('cached', res), ('stream', stream)):
    tags = _tags(str(tmp_path / d))
    assert {'offline_linear/test_top1', 'offline_linear/test_top5',
            'offline_linear/train_loss'} <= tags, tags
    assert not any(t.startswith(('online_probe', 'monitor')) for t in tags)
    assert os.listdir(tmp_path / d / 'checkpoints')
    saved = json.loads((tmp_path / d / 'results.json').read_text())
    assert (saved['top1'], saved['top5']) == (r['top1'], r['top5'])


def _finetuned_accuracies(state, backbone, test_x, test_y) -> dict[str, float]:
  """Top-1 / top-5 of the fine-tuned network (online and EMA) on the eval images, in eval
  mode, computed here rather than by the eval."""
  net = finetune.FinetuneNet(backbone, 10)
  out = {}
  for prefix, p, bs in (('', state.params, state.batch_stats),
                        ('ema_', state.ema_params, state.ema_batch_stats)):
    if p:
      logits = np.asarray(net.apply({'params': jax.device_get(p),
                                     'batch_stats': jax.device_get(bs)}, test_x, train=False))
      out.update({f'{prefix}top1': _topk(logits, test_y, 1),
                  f'{prefix}top5': _topk(logits, test_y, 5)})
  return out


@pytest.mark.slow
def test_finetune_on_label_subset(pretrained_dir, eval_data, tmp_path):
  from ssl_jax.models import ssl_model
  c = _eval_config('eval_finetune', 'cifar10,10%,runlocal', pretrained_dir)
  c.epochs = 2
  c.eval_every_epochs = 1
  c.ema_decay = 0.5   # large, so that the EMA visibly differs from both ends of the run
  res = finetune.run(c, str(tmp_path))
  # The reported last numbers are the final network's (online and EMA) on the 128 eval images.
  pre = ckpt_lib.load_pretrained(pretrained_dir)[0]
  ref = _finetuned_accuracies(res['final_state'], ssl_model.build_backbone(pre.model, 32),
                              *eval_data[1])
  for key in ('top1', 'top5', 'ema_top1', 'ema_top5'):
    assert abs(res[f'{key}_last'] - ref[key]) <= 1 / 128 + 1e-9, (key, res[f'{key}_last'], ref)
  # Last and best, online and EMA, over the per-epoch evaluations.
  assert [h['epoch'] for h in res['history']] == [1, 2]
  assert res['top1'] == res['top1_last'] == res['history'][-1]['top1']
  assert res['top1_best'] == max(h['top1'] for h in res['history']) >= res['top1_last']
  assert res['best_epoch'] in (1, 2) and res['ema_best_epoch'] in (1, 2)
  saved = json.loads((tmp_path / 'results.json').read_text())
  for key in ('top1_last', 'top5_last', 'top1_best', 'top5_best', 'best_epoch', 'ema_top1_last',
              'ema_top1_best', 'ema_best_epoch', 'history'):
    assert saved[key] == res[key], key
  st = res['final_state']
  k = ('backbone', 'conv1', 'kernel')
  ema_k = np.asarray(jax.device_get(st.ema_params['backbone']['conv1']['kernel']))
  online_k = np.asarray(jax.device_get(st.params['backbone']['conv1']['kernel']))
  assert not np.array_equal(ema_k, online_k), k
  assert set(jax.device_get(st.ema_batch_stats)['backbone']) == set(st.batch_stats['backbone'])
  # A rerun resumes the finished run; its history comes back from the checkpoint metadata.
  again = finetune.run(c, str(tmp_path))
  assert again['history'] == res['history'] and again['top1_best'] == res['top1_best']
  # Drop-path is a ViT option.
  bad = c.copy_and_resolve_references()
  bad.drop_path = 0.1
  with pytest.raises(config_lib.ConfigError, match='drop_path=0.1 needs a ViT backbone'):
    finetune.run(bad, str(tmp_path / 'dp'))
  sub = np.load(tmp_path / 'subset_indices.npy')
  assert res['num_labelled'] == len(sub) and 20 <= len(sub) <= 30   # 10% of 256
  tags = _tags(str(tmp_path))
  assert {'finetune/train_loss', 'finetune/train_top1', 'finetune/test_top1', 'finetune/test_top5',
          'finetune/test_ema_top1', 'finetune/test_top1_best',
          'finetune/test_ema_top1_best'} <= tags, tags
  # The backbone was trained, not only the head.
  _, params, _, _ = ckpt_lib.load_pretrained(pretrained_dir)
  new = jax.device_get(res['final_state'].params['backbone']['conv1']['kernel'])
  assert not np.array_equal(new, params['backbone']['conv1']['kernel'])


def _fake_aps_run(workdir: str):
  """An APS (vit_test) "training run" written directly: config.json + one checkpoint of random
  weights, in the trainer's layout. (Running the APS trainer here would add a minute of
  compiles; the fine-tuning is what is tested.)"""
  from ssl_jax.models import ssl_model
  p = load_config('aps', 'cifar10,runlocal')
  p.data.data_dir = TFDS_DATA_DIR
  net = ssl_model.build_ssl_net(p.model, image_size=32)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    base = 1.0 if name.endswith(("['scale']", "['var']")) else 0.0
    noise = 0.0 if name.endswith(("['mean']", "['var']")) else 0.05
    return (base + noise * rng.standard_normal(leaf.shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  ckpt_lib.check_workdir_config(workdir, p)
  ck = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
  ck.save(2, {'step': np.int32(2), 'params': variables['params'],
              'batch_stats': variables['batch_stats']}, {'step': 2, 'epoch': 0.0}, force=True)
  ck.close()


@pytest.mark.slow
def test_finetune_aps_vit_with_drop_path_and_ema(eval_data, tmp_path):
  """The APS fine-tune preset on an APS (vit_test) checkpoint: drop-path active in the train
  step only (eval is deterministic), EMA evaluated alongside, last / best reported."""
  from ssl_jax.models import ssl_model
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  pre_dir = str(tmp_path / 'aps')
  _fake_aps_run(pre_dir)
  pre, params, _, _ = ckpt_lib.load_pretrained(pre_dir)
  assert 'bias' not in params['backbone']['block_0']['attn']['qkv']   # the official APS ViT
  assert (pre.model.qkv_bias, pre.model.layer_norm_eps) == (False, 1e-5)

  c = _eval_config('eval_finetune', 'cifar10,aps,runlocal', pre_dir)
  c.epochs = 2
  c.eval_every_epochs = 1
  c.ema_decay = 0.9
  assert c.drop_path == 0.1 and c.optimizer.name == 'adamw'
  res = finetune.run(c, str(tmp_path / 'ft'))
  assert [h['epoch'] for h in res['history']] == [1, 2]
  assert res['drop_path'] == 0.1 and res['backbone'] == 'vit_test'
  assert res['top1_best'] == max(h['top1'] for h in res['history'])
  assert res['ema_top1_best'] == max(h['ema_top1'] for h in res['history'])
  # The last numbers are the final ViT's (online and EMA, eval mode: no drop-path).
  ref = _finetuned_accuracies(res['final_state'], ssl_model.build_backbone(pre.model, 32),
                              *eval_data[1])
  for key in ('top1', 'top5', 'ema_top1', 'ema_top5'):
    assert abs(res[f'{key}_last'] - ref[key]) <= 1 / 128 + 1e-9, (key, res[f'{key}_last'], ref)
  # The fine-tuning network: drop-path rates 0 .. 0.1 over the 2 blocks; train mode draws
  # per-sample masks from the 'dropout' rng, eval mode is deterministic.
  net = finetune.FinetuneNet(ssl_model.build_backbone(pre.model, 32, drop_path_rate=0.1), 10)
  st = res['final_state']
  v = {'params': jax.device_get(st.params)}
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)), jnp.uint8)
  ev = net.apply(v, x, train=False)
  np.testing.assert_array_equal(ev, net.apply(v, x, train=False))
  tr = [net.apply(v, x, train=True, rngs={'dropout': jax.random.key(i)}) for i in (0, 1)]
  assert not np.allclose(tr[0], tr[1]) and not np.allclose(tr[0], ev)
  # With drop_path 0 the train forward equals the eval forward (no other stochastic layer).
  plain = finetune.FinetuneNet(ssl_model.build_backbone(pre.model, 32), 10)
  np.testing.assert_allclose(plain.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)}),
                             ev, atol=1e-5)


def test_holdout_split_is_stratified_disjoint_and_seeded():
  labels = np.repeat(np.arange(5), [10, 20, 30, 1, 40])
  fit, held = knn_eval.holdout_split(labels, 0.1, seed=0)
  assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(labels)
  counts = np.bincount(labels[held], minlength=5)
  assert counts.tolist() == [1, 2, 3, 0, 4]          # 10% of each class; a singleton stays
  again = knn_eval.holdout_split(labels, 0.1, seed=0)[1]
  other = knn_eval.holdout_split(labels, 0.1, seed=1)[1]
  np.testing.assert_array_equal(again, held)
  assert not np.array_equal(other, held)


def test_knn_grid_sorts_numerically():
  names = ['weighted_k100_t0.1', 'weighted_k10_t0.5', 'weighted_k10_t0.07', 'unweighted_k20',
           'unweighted_k1']
  grid = knn_eval._grid({n: 0.5 for n in names}, {n: 0.9 for n in names})
  assert [r['setting'] for r in grid] == ['weighted_k10_t0.07', 'weighted_k10_t0.5',
                                          'weighted_k100_t0.1', 'unweighted_k1', 'unweighted_k20']


@pytest.mark.slow
def test_knn_and_embed_modes(pretrained_dir, eval_data, tmp_path):
  c = _eval_config('eval_knn', 'cifar10,runlocal', pretrained_dir)
  c.temperatures = (0.07, 0.1)
  res = knn_eval.run(c, str(tmp_path / 'knn'))
  acc = res['accuracies']
  assert set(acc) == {f'top{j}_{s}' for j in (1, 5) for s in
                      ('weighted_k20_t0.07', 'weighted_k20_t0.1', 'unweighted_k1',
                       'unweighted_k20')}
  assert res['bank_size'] == 256
  # Every setting's test and held-out numbers against a numpy kNN on features computed here
  # (bank: the 256 train images; held out: the seeded stratified 10% of them).
  (train_x, train_y), (test_x, test_y) = eval_data
  bank, test = _pretrained_features(pretrained_dir, train_x), _pretrained_features(
      pretrained_dir, test_x)
  fit, held = knn_eval.holdout_split(train_y, 0.1, seed=0)
  grid = {r['setting']: r for r in res['holdout_grid']}
  for name, k, t, weighted in (('weighted_k20_t0.07', 20, 0.07, True),
                               ('weighted_k20_t0.1', 20, 0.1, True),
                               ('unweighted_k1', 1, 1.0, False),
                               ('unweighted_k20', 20, 1.0, False)):
    ref = knn_reference(bank, train_y, test, 10, k, t, weighted)
    val = knn_reference(bank[fit], train_y[fit], bank[held], 10, k, t, weighted)
    for j in (1, 5):   # one query of slack for a float32 near-tie among the neighbours
      assert abs(acc[f'top{j}_{name}'] - _topk(ref, test_y, j)) <= 1 / 128 + 1e-9, (name, j)
      assert abs(grid[name][f'top{j}'] - _topk(val, train_y[held], j)) <= 1 / len(held) + 1e-9, (
          name, j)
  assert 'offline_knn/top1_unweighted_k20' in _tags(str(tmp_path / 'knn'))
  # Honest selection: the setting with the best held-out (train-split) top-1, the first in
  # grid order on ties; its test accuracy is reported; grids come in numeric order.
  hold = res['holdout_grid']
  best = max(hold, key=lambda r: (r['top1'], -hold.index(r)))
  assert res['selected'] == best['setting'] and res['selected_holdout_top1'] == best['top1']
  assert res['test_top1'] == acc[f'top1_{res["selected"]}']
  assert [r['setting'] for r in hold] == ['weighted_k20_t0.07', 'weighted_k20_t0.1',
                                          'unweighted_k1', 'unweighted_k20']
  assert [r['setting'] for r in res['test_grid_for_reference_only']] == [r['setting'] for r in hold]
  held = int(res['selected_on'].split()[0])       # ~10% of each class of the 256-image bank
  assert 20 <= held <= 30 and 'held-out train' in res['selected_on'], res['selected_on']

  c.embed.num_examples = 128   # the whole eval split, in order
  c.embed.score_examples = 32
  res = embedding.run(c, str(tmp_path / 'embed'))
  assert res['embedding_method'] in ('umap', 'tsne')
  assert res['legend'][:3] == ['airplane', 'automobile', 'bird']   # class names, not ids
  for name in ('embedding.png', 'scores.png'):
    with open(tmp_path / 'embed' / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  saved = np.load(tmp_path / 'embed' / 'embedding.npz')
  assert saved['coords'].shape == (128, 2)
  np.testing.assert_array_equal(saved['labels'], test_y)
  # Two views of one image score higher than views of different images (cosine, in [-1, 1]).
  assert -1.0 <= res['neg_mean'] < res['pos_mean'] <= 1.0, res


def test_eval_data_overrides_that_would_be_ignored_are_errors():
  """`--config.folder_root` on a TFDS evaluation used to be ignored silently."""
  import ml_collections
  from ssl_jax import config_lib, data
  pre = ml_collections.ConfigDict({'data': data.default_data_config('cifar10').to_dict()})
  c = load_config('eval_knn', 'cifar10')
  c.pretrained = '/runs/x'
  c.folder_root = '/data/my_folder'
  with pytest.raises(config_lib.ConfigError, match=r'folder_root=.* is not read: .*TFDS dataset '
                     r"'cifar10'.*--config.source=folder"):
    eval_config.eval_data_config(c, pre)
  c.source = 'folder'
  d = eval_config.eval_data_config(c, pre)
  assert d.source == 'folder' and d.folder_root == '/data/my_folder'
  c2 = load_config('eval_knn', '')
  c2.pretrained = '/runs/x'
  c2.source, c2.data_dir = 'folder', '/tfds'
  with pytest.raises(config_lib.ConfigError, match=r'data_dir=.* is not read.*folder_root'):
    eval_config.eval_data_config(c2, pre)
