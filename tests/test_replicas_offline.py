"""The offline modes and export on a replicas run (issue 26): ``--config.replica``.

One tiny replicas run (3 replicas, 2 steps, real CIFAR-10) is trained once for the module; on
it: export of one replica is that replica's slice of the checkpoint, ``--mode=knn`` with
``replica=-1`` evaluates each replica as ``--config.replica=r`` runs do and aggregates them,
and bad ``replica`` values are one line on stderr with exit code 2. The frozen-replica path and
the checkpoint readers run on small hand-made checkpoints (no training needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TFDS_DATA_DIR
from harness import REPO, cli_env, load_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, export, main, train
from ssl_jax.evals import replicas

REPLICAS = 3


@pytest.fixture(scope='module')
def replicas_dir(tmp_path_factory):
  """A 2-step BYOL resnet_tiny run with 3 replicas on real CIFAR-10 (no evaluator)."""
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c = load_config('byol', 'cifar10,runlocal')
  c.replicas = REPLICAS
  c.total_steps = 2
  c.batch_size = 16
  c.log_every_steps = 2
  c.checkpoint.async_save = False
  for ev in c.evals.values():
    ev.update(at_start=False, at_end=False)
  c.data.train_split = 'train[:1024]'
  c.data.data_dir = TFDS_DATA_DIR
  workdir = str(tmp_path_factory.mktemp('replicas'))
  assert train.train_and_evaluate(c, workdir)['final_step'] == 2
  return workdir


def _eval_config(name: str, arg: str, pretrained: str, **fields):
  c = load_config(name, arg)
  c.pretrained = pretrained
  c.update(fields)
  return c


def _slice(tree, r):
  return jax.tree.map(lambda x: np.asarray(x)[r], tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# =============================================================================================
# On the trained replicas run
# =============================================================================================
@pytest.mark.slow
def test_export_of_one_replica_is_its_slice_of_the_checkpoint(replicas_dir, tmp_path):
  out = main.run_eval('export', _eval_config('eval_linear', 'cifar10', replicas_dir, replica=1),
                      str(tmp_path))
  raw, step = ckpt_lib.restore_state(replicas_dir, items=('params', 'batch_stats'))
  assert step == 2 and jax.tree.leaves(raw)[0].shape[0] == REPLICAS   # stored: replica axis
  params, stats, fc = export.load_resnet(out['npz'])
  assert fc is None
  _assert_trees_equal(params, _slice(raw['params']['backbone'], 1))
  _assert_trees_equal(stats, _slice(raw['batch_stats']['backbone'], 1))
  other = _slice(raw['params']['backbone'], 0)
  assert not np.array_equal(params['conv1']['kernel'], other['conv1']['kernel'])
  record = json.loads((tmp_path / 'export.json').read_text())
  assert (record['replica'], record['seed'], record['step']) == (1, 1, 2)


@pytest.mark.slow
def test_knn_on_every_replica_equals_single_replica_runs(replicas_dir, tmp_path):
  sizes = dict(train_examples=256, eval_examples=128, eval_batch_size=64)
  c = _eval_config('eval_knn', 'cifar10,runlocal', replicas_dir, **sizes)
  agg = main.run_eval('knn', c, str(tmp_path / 'all'))
  saved = json.loads((tmp_path / 'all' / 'results.json').read_text())
  assert saved['results'] == agg['results'] and saved['ddof'] == 1
  assert (saved['replicas'], saved['seeds'], saved['in_mean'], saved['frozen']) == (
      REPLICAS, [0, 1, 2], [0, 1, 2], {})
  for r in range(REPLICAS):
    one = main.run_eval('knn', _eval_config('eval_knn', 'cifar10,runlocal', replicas_dir,
                                            replica=r, **sizes), str(tmp_path / f'one_{r}'))
    mine = json.loads((tmp_path / 'all' / f'replica_{r}' / 'results.json').read_text())
    assert any((tmp_path / 'all' / f'replica_{r}').glob('events.out.tfevents*'))
    drop = ('time_s', 'time_features_s')
    assert {k: v for k, v in mine.items() if k not in drop} == {
        k: v for k, v in one.items() if k not in drop}
    for key in ('test_top1', 'test_top5', 'accuracies.top1_unweighted_k1'):
      name, _, sub = key.partition('.')
      assert agg['results'][key]['per_replica'][r] == (one[name][sub] if sub else one[name])
  top1 = agg['results']['test_top1']
  assert top1['mean'] == pytest.approx(np.mean(top1['per_replica']))
  assert top1['std'] == pytest.approx(np.std(top1['per_replica'], ddof=1))
  each = ' / '.join(f'{100 * v:.2f}' for v in top1['per_replica'])
  assert agg['final_line'] == (
      f'--mode=knn over 3 of 3 replicas (mean ± std, ddof=1): test_top1 '
      f'{100 * top1["mean"]:.2f} ± {100 * top1["std"]:.2f}% (replicas {each}).')


@pytest.mark.slow
def test_bad_replica_values_are_one_line_exit_2(replicas_dir, tmp_path):
  plain = tmp_path / 'plain'   # a run without replicas: only its config.json is read
  plain.mkdir()
  cfg = json.loads(open(os.path.join(replicas_dir, 'config.json')).read())
  (plain / 'config.json').write_text(json.dumps(dict(cfg, replicas=1)))
  cases = [
      (['--mode=export', '--config=configs/eval_linear.py', f'--config.pretrained={replicas_dir}'],
       f'config.replica=-1 (every replica) reads no single network: {replicas_dir} holds 3 '
       'replicas (trained with --config.replicas=3); add --config.replica=r with r one of '
       '0, 1, 2 (replica r: seed 0 + r).'),
      (['--mode=knn', '--config=configs/eval_knn.py', f'--config.pretrained={replicas_dir}',
        '--config.replica=3'],
       f'config.replica=3 is invalid; accepted: -1 (every replica) or 0..2 ({replicas_dir} was '
       'trained with --config.replicas=3)'),
      (['--mode=eval', '--config=configs/eval.py', f'--config.pretrained={plain}',
        '--config.replica=1'],
       f'config.replica=1 is invalid; accepted: -1 or 0 ({plain} was trained without '
       'replicas)'),
  ]
  procs = [subprocess.Popen([sys.executable, '-m', 'ssl_jax.main', *args,
                             f'--workdir={tmp_path / f"out_{i}"}'], cwd=REPO,
                            env=cli_env(JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i, (args, _) in enumerate(cases)]
  for i, (p, (_, line)) in enumerate(zip(procs, cases)):
    stdout, stderr = p.communicate(timeout=300)
    assert (p.returncode, stderr, stdout) == (2, f'Config error: {line}\n', ''), stderr[-3000:]
    assert not (tmp_path / f'out_{i}').exists()


# =============================================================================================
# Hand-made checkpoints and results
# =============================================================================================
def _fake_run(root, steps) -> tuple[str, dict]:
  """A replicas run's workdir with one checkpoint (step max(steps)): config.json and a state of
  ``params``/``batch_stats``/``step`` with a leading replica axis."""
  n = len(steps)
  rng = np.random.default_rng(0)
  state = {'step': np.asarray(steps, np.int32),
           'params': {'backbone': {'w': rng.normal(size=(n, 3, 2)).astype(np.float32)}},
           'batch_stats': {'backbone': {'mean': rng.normal(size=(n, 2)).astype(np.float32)}}}
  ocp.PyTreeCheckpointer().save(os.path.join(root, 'checkpoints', str(max(steps)), 'state'),
                                state)
  with open(os.path.join(root, 'config.json'), 'w') as f:
    json.dump({'method': {'name': 'byol'}, 'seed': 5, 'replicas': n}, f)
  return root, state


def test_load_pretrained_reads_one_replica_and_names_a_frozen_one(tmp_path, capsys):
  root, state = _fake_run(str(tmp_path), [4, 3, 4])
  config, params, stats, step = ckpt_lib.load_pretrained(root, replica=1)
  assert (step, config.seed, config.replicas, config.replica_of) == (4, 6, 1, 3)
  _assert_trees_equal(params, _slice(state['params'], 1))
  _assert_trees_equal(stats, _slice(state['batch_stats'], 1))
  assert (f'WARNING: replica 1 (seed 6) of {root} was frozen after step 3 (NaN or Inf at step '
          '4); checkpoint 4 holds its state after step 3') in capsys.readouterr().out
  ckpt_lib.load_pretrained(root, replica=2)
  assert 'WARNING' not in capsys.readouterr().out
  with pytest.raises(config_lib.ConfigError, match=r'add --config.replica=r with r one of 0, 1, '
                     r'2 \(replica r: seed 5 \+ r\)'):
    ckpt_lib.load_pretrained(root)
  raw, _ = ckpt_lib.restore_state(root, items=('step',))
  np.testing.assert_array_equal(raw['step'], [4, 3, 4])
  assert ckpt_lib.restore_state(root, items=('step',), replica=0)[0]['step'] == 4


def test_replica_index_accepts_and_names():
  plain = ml_collections.ConfigDict({'seed': 0})
  assert ckpt_lib.replica_index(plain, -1, 'W') is None
  assert ckpt_lib.replica_index(plain, 0, 'W') is None
  for bad in (1, -2, True):
    with pytest.raises(config_lib.ConfigError, match=rf'^config.replica={bad!r} is invalid; '
                       r'accepted: -1 or 0 \(W was trained without replicas\)$'):
      ckpt_lib.replica_index(plain, bad, 'W')
  reps = ml_collections.ConfigDict({'seed': 0, 'replicas': 2})
  assert ckpt_lib.replica_index(reps, 1, 'W') == 1
  assert ckpt_lib.replica_index(reps, -1, 'W', every=True) == -1
  with pytest.raises(config_lib.ConfigError, match=r'^config.replica=2 is invalid; accepted: '
                     r'0..1 \(W was trained with --config.replicas=2\)$'):
    ckpt_lib.replica_index(reps, 2, 'W')


def test_every_replica_leaves_a_frozen_one_out_of_the_mean(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(replicas, 'replica_steps', lambda config: np.array([4, 3, 4]))
  seen = []

  def mode_run(config, workdir):
    r = config.replica
    seen.append((r, workdir))
    return {'test_top1': [0.5, 0.1, 0.7][r], 'accuracies': {'top1_x': 0.25 * r},
            'selected': 'x', 'done': True, 'grid': [1, 2]}

  c = _eval_config('eval_knn', 'cifar10', str(tmp_path / 'run'))
  pre = ml_collections.ConfigDict({'seed': 5, 'replicas': 3})
  out = replicas.evaluate_every('knn', mode_run, c, str(tmp_path / 'ev'), pre)
  assert seen == [(r, str(tmp_path / 'ev' / f'replica_{r}')) for r in range(3)]
  assert c.replica == -1                                  # the caller's config is unchanged
  assert (out['frozen'], out['in_mean'], out['ddof']) == ({'1': 3}, [0, 2], 1)
  assert sorted(out['results']) == ['accuracies.top1_x', 'test_top1']
  top1 = out['results']['test_top1']
  assert top1['per_replica'] == [0.5, 0.1, 0.7]
  assert top1['mean'] == pytest.approx(0.6) and top1['std'] == pytest.approx(np.std(
      [0.5, 0.7], ddof=1))
  assert out['final_line'] == ('--mode=knn over 2 of 3 replicas (mean ± std, ddof=1): '
                               'test_top1 60.00 ± 14.14% (replicas 50.00 / 10.00 (frozen) / '
                               '70.00).')
  warning = (f'WARNING: replica 1 (seed 6) was frozen after step 3 (NaN or Inf at step 4; the '
             f'others reached step 4): it is evaluated into {tmp_path / "ev" / "replica_1"} but '
             'left out of the means.')
  assert out['warnings'] == [warning] and warning in capsys.readouterr().out
  assert json.loads((tmp_path / 'ev' / 'results.json').read_text())['frozen'] == {'1': 3}
