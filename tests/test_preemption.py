"""Preemption and failures: SIGTERM checkpoints and exits, SIGKILL + restart equals an
uninterrupted run, NaN stops the run naming the step and keeps the last good checkpoint."""
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from conftest import TFDS_DATA_DIR
from harness import cli_env, real_config
from ssl_jax import train

pytestmark = pytest.mark.slow   # trains, and starts the trainer as a subprocess

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
STEPS = 8
OVERRIDES = {'total_steps': STEPS, 'batch_size': 16, 'log_every_steps': 1,
             'checkpoint.every_steps': 2, 'evals.knn.at_start': False,
             'evals.knn.at_end': False, 'evals.online_probe.at_start': False,
             'evals.online_probe.at_end': False, 'data.train_split': 'train[:256]',
             'data.shuffle_buffer': 256}


def _config():
  return real_config('moco', OVERRIDES)


def _cmd(workdir):
  return [sys.executable, '-m', 'ssl_jax.main', '--config=configs/moco.py:cifar10,runlocal',
          f'--workdir={workdir}', f'--config.data.data_dir={TFDS_DATA_DIR}'] + [
              f'--config.{k}={v}' for k, v in OVERRIDES.items()]


def _env():
  return cli_env()


LINE = re.compile(r'^step (\d+)/\d+ .*\| loss ([0-9.]+)')


def _run(workdir, *, signal_at=None, sig=None):
  """Run the CLI; send ``sig`` once the progress line of step ``signal_at`` is printed."""
  p = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  losses, log = {}, []
  for line in p.stdout:
    log.append(line)
    m = LINE.match(line)
    if m:
      losses[int(m.group(1))] = float(m.group(2))
      if signal_at is not None and int(m.group(1)) >= signal_at and p.poll() is None:
        p.send_signal(sig)
        signal_at = None
  p.wait(timeout=600)
  return p.returncode, losses, ''.join(log)


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10'
  work = tmp_path / 'killed'
  rc, l1, log1 = _run(work, signal_at=3, sig=signal.SIGTERM)
  assert rc == 0, log1[-3000:]
  assert 'preemption notice (SIGTERM)' in log1, log1[-3000:]
  stopped = max(l1)
  assert stopped < STEPS
  rc, l2, log2 = _run(work, signal_at=stopped + 3, sig=signal.SIGKILL)
  assert rc == -signal.SIGKILL, log2[-3000:]
  assert 'Resumed from' in log2
  rc, l3, log3 = _run(work)
  assert rc == 0, log3[-3000:]
  killed_curve = {**l1, **l2, **l3}
  # Steps replayed after the SIGKILL (since its last checkpoint) reproduce the same losses.
  for s in set(l2) & set(l3):
    assert l2[s] == l3[s], (s, l2[s], l3[s])

  ref = train.train_and_evaluate(_config(), str(tmp_path / 'straight'))
  ref_curve = dict(ref['loss_history'])
  assert sorted(killed_curve) == sorted(ref_curve) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([killed_curve[s] for s in range(1, STEPS + 1)],
                             [ref_curve[s] for s in range(1, STEPS + 1)], atol=1.5e-4)
  mngr = ocp.CheckpointManager(str(work / 'checkpoints'), item_names=('state', 'meta'))
  raw = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  ref_params = jax.tree.leaves(jax.device_get(ref['state'].params))
  got_params = jax.tree.leaves(raw['params'])
  assert len(ref_params) == len(got_params)
  for a, b in zip(ref_params, got_params):
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6, atol=1e-7)
  queue_ref = np.asarray(jax.device_get(ref['state'].method_state['queue']))
  np.testing.assert_allclose(np.asarray(raw['method_state']['queue']), queue_ref, atol=1e-7)


def test_nan_stops_with_step_and_metric_and_keeps_last_good_checkpoint(tmp_path):
  c = _config()
  c.data.train_split = 'train'
  c.optimizer.base_lr = 1e30
  c.checkpoint.every_steps = 1
  c.checkpoint.async_save = False
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(train.NonFiniteError,
                       match=r'(loss|grad_norm) is NaN or Inf at step \d+; stopping') as e:
      train.train_and_evaluate(c, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(e.value)).group(1))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  # Every step is checked before it is saved, so the newest checkpoint is the step before.
  assert steps and steps[-1] == bad_step - 1, (steps, bad_step)
  mngr = ocp.CheckpointManager(str(tmp_path / 'checkpoints'), item_names=('state', 'meta'))
  raw = mngr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(raw['params']))


def test_sigterm_during_compilation_exits_0_with_a_message(tmp_path):
  """The handler is installed before start-up: a notice while the step compiles is not a
  silent exit 143; the run ends 0 saying so, and the rerun continues normally."""
  work = tmp_path / 'w'
  p = subprocess.Popen(_cmd(work), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  log = []
  for line in p.stdout:
    log.append(line)
    if line.startswith('compiling the train step'):
      p.send_signal(signal.SIGTERM)
  p.wait(timeout=600)
  text = ''.join(log)
  assert p.returncode == 0, text[-3000:]
  assert ('Preemption notice (SIGTERM) before the first step' in text
          or 'preemption notice (SIGTERM)' in text), text[-3000:]
  # Either way the rerun finishes the run.
  rc, losses, log2 = _run(work)
  assert rc == 0 and max(losses) == STEPS, log2[-3000:]
