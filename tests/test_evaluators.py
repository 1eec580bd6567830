"""The evaluator protocol: the registry, the shared extraction, the final line, resumable
``evals.*`` fields, and ``--mode=eval`` reproducing a training run's own final evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import TFDS_DATA_DIR
from harness import cli_env, load_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, train
from ssl_jax import main as main_lib
from ssl_jax.evals import evaluators, features, knn_eval, online_probe

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
FINAL = (r'Final after 3 steps \| kNN top-1 \(weighted k=20, T=0.1, frozen backbone\): '
         r'\d+\.\d\d% \(untrained network: \d+\.\d\d%\) \| online-probe top-1: \d+\.\d\d% '
         r'\(untrained network: \d+\.\d\d%\)$')


# =============================================================================================
# Pure pieces
# =============================================================================================
def _ctx(cache=None, run_config=None):
  data = ml_collections.ConfigDict({'name': 'cifar10', 'train_split': 'train',
                                    'eval_split': 'test', 'folder_root': None})
  run_config = run_config or ml_collections.ConfigDict({'data': data.to_dict()})
  return evaluators.Context(run_config=run_config, data=data, mesh=None, num_classes=10,
                            cache=cache or features.ExtractionCache(None, data, None))


def test_presets_and_defaults_keep_the_sizes_of_before():
  """The kNN entry's values are those config_lib set before the evals package owned them, and
  the online probe scores the same eval images (same eval_examples and batch size)."""
  for preset, knn in [('cifar10', dict(every_epochs=10.0, at_start=False, train_examples=-1,
                                       eval_examples=-1, k=200)),
                      ('cifar10,quick', dict(every_epochs=-1.0, at_start=True,
                                             train_examples=10000, eval_examples=2000, k=200)),
                      ('cifar10,runlocal', dict(every_epochs=-1.0, at_start=True,
                                                train_examples=1024, eval_examples=512, k=20))]:
    c = load_config('moco', preset)
    assert list(c.evals) == ['knn', 'online_probe']
    assert {k: c.evals.knn[k] for k in knn} == knn, preset
    assert (c.evals.knn.temperature, c.evals.knn.at_end, c.evals.knn.batch_size) == (0.1, True, 512)
    for key in ('every_epochs', 'every_steps', 'at_start', 'at_end', 'eval_examples',
                'batch_size'):
      assert c.evals.online_probe[key] == c.evals.knn[key], (preset, key)
  c = load_config('byol', 'imagenet')     # a recipe's cadence: every evaluator
  assert c.evals.knn.every_epochs == c.evals.online_probe.every_epochs == 20.0
  assert c.evals.knn.train_examples == 100_000


def test_unknown_type_and_bad_fields_name_the_entry():
  c = load_config('byol', 'cifar10,runlocal')
  c.evals.online_probe.batch_size = 0
  with pytest.raises(config_lib.ConfigError, match=r'evals\.online_probe\.batch_size=0'):
    evaluators.validate(c)
  c = load_config('byol', 'cifar10,runlocal')
  c.evals.knn.type = 'knnn'
  with pytest.raises(config_lib.ConfigError, match=r"evals\.knn\.type='knnn' is invalid; "
                                                   r'accepted: knn, online_probe'):
    train.validate_config(c, num_devices=1)


def test_extraction_cache_shares_one_round_and_keeps_nothing_after(monkeypatch):
  calls = []

  def fake_extract(fn, variables, data_cfg, *, split, mesh, batch_size, max_examples,
                   subset_seed):
    del fn, data_cfg, mesh, subset_seed
    calls.append((split, max_examples, batch_size))
    return {'features': np.ones((4, 2)), 'label': np.arange(4),
            'probe_logits': np.eye(4)}

  monkeypatch.setattr(features, 'extract', fake_extract)
  cache = features.ExtractionCache(None, None, None)
  cfg = evaluators.default_config()
  ctx = _ctx(cache)
  knn = knn_eval.KnnEvaluator(cfg.knn, None, ctx)
  probe = online_probe.OnlineProbeEvaluator(cfg.online_probe, None, ctx)
  v1 = {'params': np.zeros(1)}
  knn.extract(v1, 'train', -1)
  a = knn.extract(v1, 'test', -1)
  b = probe.extract(v1, 'test', -1)
  assert a is b and calls == [('train', -1, 512), ('test', -1, 512)]
  assert not cache._entries and cache._leaves is None   # pylint: disable=protected-access
  # The probe alone (the kNN not due) extracts for itself; the next round starts afresh.
  probe.extract(v1, 'test', -1)
  v2 = {'params': np.zeros(1)}
  knn.extract(v2, 'test', -1)
  probe.extract(v2, 'test', -1)
  assert len(calls) == 4
  # Other sizes are other extractions.
  other = online_probe.OnlineProbeEvaluator(
      ml_collections.ConfigDict(dict(cfg.online_probe.to_dict(), eval_examples=100)), None, ctx)
  other.extract(v2, 'test', 100)
  assert calls[-1] == ('test', 100, 512)
  assert list(probe.run({'params': np.ones(1)})) == [('online_probe/test_top1', 1.0)]


def test_final_line_comes_from_each_evaluators_headline():
  cfg = evaluators.default_config()
  ctx = _ctx()

  def sched(ev):
    return evaluators.Scheduled(ev.name, None, True, True, ev)

  evs = [sched(knn_eval.KnnEvaluator(cfg.knn, None, ctx, name='knn')),
         sched(online_probe.OnlineProbeEvaluator(cfg.online_probe, None, ctx,
                                                 name='online_probe'))]
  final = {'monitor/knn_top1': 0.3405, 'online_probe/test_top1': 0.223}
  untrained = {'monitor/knn_top1': 0.2625, 'online_probe/test_top1': 0.0955}
  assert evaluators.final_line(evs, 780, final, untrained) == (
      'Final after 780 steps | kNN top-1 (weighted k=200, T=0.1, frozen backbone): 34.05% '
      '(untrained network: 26.25%) | online-probe top-1: 22.30% (untrained network: 9.55%)')
  # Without the kNN evaluator the probe's part is unchanged.
  assert evaluators.final_line(evs[1:], 5, {'online_probe/test_top1': 0.5}) == (
      'Final after 5 steps | online-probe top-1: 50.00%')


def test_any_evals_field_may_change_on_resume(tmp_path):
  c = load_config('moco', 'cifar10,runlocal')
  ckpt_lib.check_workdir_config(str(tmp_path), c)
  (tmp_path / 'checkpoints' / '10' / 'state').mkdir(parents=True)
  c2 = load_config('moco', 'cifar10,runlocal')
  c2.evals.knn.k = 5
  c2.evals.online_probe.eval_examples = 64
  del c2.evals['knn']
  ckpt_lib.check_workdir_config(str(tmp_path), c2)     # no ConfigMismatchError
  assert ckpt_lib.config_meta(c)['config_fingerprint'] == ckpt_lib.config_meta(c2)[
      'config_fingerprint']
  c3 = load_config('moco', 'cifar10,runlocal')
  c3.optimizer.base_lr = 0.5
  with pytest.raises(ckpt_lib.ConfigMismatchError, match='optimizer.base_lr'):
    ckpt_lib.check_workdir_config(str(tmp_path), c3)


# =============================================================================================
# A tiny run, then --mode=eval on it
# =============================================================================================
def _train_config():
  c = load_config('byol', 'cifar10,runlocal')
  c.total_steps = 3
  c.batch_size = 16
  c.log_every_steps = 3
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.data.data_dir = TFDS_DATA_DIR
  c.data.train_split = 'train[:1024]'
  c.data.eval_split = 'test[:512]'
  c.data.shuffle_buffer = 1024
  c.evals.knn.update({'train_examples': 256, 'eval_examples': 128, 'batch_size': 64})
  c.evals.online_probe.update({'eval_examples': 128, 'batch_size': 64})
  return c


def _eval_config(workdir, arg='runlocal'):   # no dataset: the run's data and splits
  c = load_config('eval', arg)
  c.pretrained = workdir
  c.evals.knn.update({'train_examples': 256, 'eval_examples': 128, 'batch_size': 64})
  c.evals.online_probe.update({'eval_examples': 128, 'batch_size': 64})
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 3-step BYOL resnet_tiny run evaluated at its start and end, with the extractions
  counted."""
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  mp = pytest.MonkeyPatch()
  calls = []
  real = features.extract

  def counting(*args, **kwargs):
    calls.append(kwargs['split'])
    return real(*args, **kwargs)

  mp.setattr(features, 'extract', counting)
  try:
    workdir = str(tmp_path_factory.mktemp('run'))
    res = train.train_and_evaluate(_train_config(), workdir)
  finally:
    mp.undo()
  return workdir, res, calls


@pytest.mark.slow
def test_training_reports_both_evaluators_extracting_once_per_split(trained):
  import re
  _, res, calls = trained
  assert res['final_step'] == 3
  for when in ('untrained', 'final'):
    assert set(res[when]) == {'monitor/knn_top1', 'online_probe/test_top1'}, res[when]
  # At the start and at the end: the bank and the queries once each (not the queries twice).
  assert calls == ['train[:1024]', 'test[:512]'] * 2, calls
  assert re.fullmatch(FINAL, res['final_line']), res['final_line']


@pytest.mark.slow
def test_mode_eval_reproduces_the_final_evaluation(trained, tmp_path):
  workdir, res, _ = trained
  out = main_lib.run_eval('eval', _eval_config(workdir), str(tmp_path / 'e'))
  assert out['pretrained_step'] == 3
  assert out['values'] == res['final']          # the same evaluators: the same numbers, exactly
  saved = json.loads((tmp_path / 'e' / 'results.json').read_text())
  assert saved['values'] == res['final']
  # Dropping the kNN evaluator loses nothing else.
  c = _eval_config(workdir)
  del c.evals['knn']
  only = main_lib.run_eval('eval', c, str(tmp_path / 'p'))
  assert only['values'] == {'online_probe/test_top1': res['final']['online_probe/test_top1']}
  # The probe belongs to the online network on the pretraining data.
  c = _eval_config(workdir)
  c.weights = 'target'
  with pytest.raises(config_lib.ConfigError, match=r'evals\.online_probe .*weights=online'):
    main_lib.run_eval('eval', c, str(tmp_path / 't'))
  c = _eval_config(workdir, 'cifar100,runlocal')
  with pytest.raises(config_lib.ConfigError, match=r'evals\.online_probe .*pretraining dataset'):
    main_lib.run_eval('eval', c, str(tmp_path / 'c100'))


@pytest.mark.slow
def test_mode_eval_from_the_command_line(trained, tmp_path):
  """The CLI as a user runs it: a clean screen (nothing on stderr) and the summary line."""
  workdir, res, _ = trained
  r = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.main', '--mode=eval',
       '--config=configs/eval.py:runlocal', f'--config.pretrained={workdir}',
       '--config.evals.knn.train_examples=256', '--config.evals.knn.eval_examples=128',
       '--config.evals.knn.batch_size=64', '--config.evals.online_probe.eval_examples=128',
       '--config.evals.online_probe.batch_size=64', f'--workdir={tmp_path / "cli"}'],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0 and not r.stderr.strip(), r.stdout[-3000:] + r.stderr[-3000:]
  knn, probe = (100 * res['final'][k] for k in ('monitor/knn_top1', 'online_probe/test_top1'))
  assert (f'Evaluated {workdir} at step 3 | kNN top-1 (weighted k=20, T=0.1, frozen backbone): '
          f'{knn:.2f}% | online-probe top-1: {probe:.2f}%') in r.stdout, r.stdout[-3000:]
