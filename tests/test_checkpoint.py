"""Checkpoints: damaged or incomplete ones are skipped (named in a warning); config mismatch."""
import logging
import os

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import checkpoint


@flax.struct.dataclass
class Toy:
  step: jax.Array
  w: jax.Array


def _toy(step):
  return Toy(step=jnp.asarray(step, jnp.int32), w=jnp.full((64, 64), float(step)))


def _abstract():
  return jax.eval_shape(lambda: _toy(0))


def _largest_files(directory):
  files = []
  for root, _, names in os.walk(directory):
    files += [os.path.join(root, n) for n in names]
  return sorted(files, key=os.path.getsize, reverse=True)


def test_truncated_newest_checkpoint_is_skipped_and_previous_restored(tmp_path, caplog):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for step in (1, 2, 3):
    ck.save(step, _toy(step), {'step': step, 'epoch': 0.0})
  ck.wait()
  newest = os.path.join(ck.directory, '3')
  for f in _largest_files(newest)[:3]:  # truncate the data files of step 3
    with open(f, 'r+b') as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))
  with caplog.at_level(logging.WARNING):
    state, meta = ck.restore_latest(_abstract())
  assert meta['step'] == 2 and int(state.step) == 2
  np.testing.assert_array_equal(np.asarray(state.w), 2.0)
  assert any(newest in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
  ck.close()


def test_deleted_files_and_interrupted_write_are_skipped(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for step in (1, 2):
    ck.save(step, _toy(step), {'step': step, 'epoch': 0.0})
  ck.wait()
  # A write cut by a crash: Orbax's temporary directory, never finalised.
  os.makedirs(os.path.join(ck.directory, '7.orbax-checkpoint-tmp-123', 'state'))
  for f in _largest_files(os.path.join(ck.directory, '2'))[:2]:
    os.remove(f)
  state, meta = ck.restore_latest(_abstract())
  assert meta['step'] == 1 and int(state.step) == 1
  ck.close()


def test_no_checkpoint_gives_none(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
  assert ck.restore_latest(_abstract()) is None
  ck.close()


def _cfg(lr=0.1, log=10):
  return ml_collections.ConfigDict({'optimizer': {'base_lr': lr}, 'log_every_steps': log})


def test_workdir_of_a_different_config_is_refused(tmp_path):
  checkpoint.check_workdir_config(str(tmp_path), _cfg())
  os.makedirs(tmp_path / 'checkpoints' / '10')          # a checkpoint: now there is a run to protect
  checkpoint.check_workdir_config(str(tmp_path), _cfg(log=99))  # cadence may change
  with pytest.raises(checkpoint.ConfigMismatchError, match=r'optimizer\.base_lr: 0\.1 -> 0\.5'):
    checkpoint.check_workdir_config(str(tmp_path), _cfg(lr=0.5))
  checkpoint.check_workdir_config(str(tmp_path), _cfg(lr=0.5), allow_config_change=True)


def test_a_workdir_without_checkpoints_is_not_locked_by_its_config(tmp_path):
  """A first run that died before its first save (e.g. lr 1e30) must not lock the workdir."""
  import json
  checkpoint.check_workdir_config(str(tmp_path), _cfg(lr=1e30))
  os.makedirs(tmp_path / 'checkpoints')                   # Orbax made the folder, saved nothing
  checkpoint.check_workdir_config(str(tmp_path), _cfg(lr=0.1))
  assert json.load(open(tmp_path / 'config.json'))['optimizer']['base_lr'] == 0.1


def test_nan_message_says_plainly_when_no_checkpoint_exists():
  from ssl_jax import train, utils

  class NoCheckpoints:
    directory = '/w/checkpoints'
    def wait(self):
      pass
    def steps(self):
      return []

  bad = {'finite/loss': np.asarray(False), 'finite/grad_norm': np.asarray(True)}
  with pytest.raises(train.NonFiniteError) as e:
    utils.check_finite(3, bad, lambda: train.kept_checkpoint_text(NoCheckpoints()))
  assert 'No checkpoint was written before it' in str(e.value) and 'none' not in str(e.value)


def test_damaged_step_is_moved_aside_and_its_step_saved_again(tmp_path):
  """Truncated step 2: restore falls back to 1, step 2 moves to damaged-2 (kept), and a resumed
  run's save at step 2 is really written (Orbax refuses a step that exists)."""
  ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for step in (1, 2):
    ck.save(step, _toy(step), {'step': step, 'epoch': 0.0})
  ck.wait()
  for f in _largest_files(os.path.join(ck.directory, '2'))[:3]:
    with open(f, 'r+b') as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))
  state, meta = ck.restore_latest(_abstract())
  assert meta['step'] == 1
  assert os.path.isdir(os.path.join(ck.directory, 'damaged-2')) and ck.steps() == [1]
  ck.save(2, _toy(2), {'step': 2, 'epoch': 0.0})
  ck.wait()
  ck.require_saved(2)
  state, meta = ck.restore_latest(_abstract())
  assert meta['step'] == 2 and float(state.w[0, 0]) == 2.0
  ck.close()


def test_a_declined_save_is_an_error_not_a_silent_skip(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
  ck.save(3, _toy(3), {'step': 3, 'epoch': 0.0})
  ck.wait()
  with pytest.raises(checkpoint.CheckpointError, match='checkpoint 3 already exists'):
    ck.save(3, _toy(3), {'step': 3, 'epoch': 0.0})
  with pytest.raises(checkpoint.CheckpointError, match=r'final checkpoint \(step 4\) is missing'):
    ck.require_saved(4)
  ck.close()
