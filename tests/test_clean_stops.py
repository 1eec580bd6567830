"""Runs that cannot lie and stops that are clean, through the CLI as a user runs it.

Each case here gave a wrong result with exit 0, or buried its cause, at 96165f0: a lost
config.json (a changed lr resumed silently; another method's checkpoints were called damaged),
a corrupt config.json (a traceback), a rerun of a finished run (re-evaluated, a second events
file), Ctrl-C (a traceback, nothing saved), a full disk (1,421 lines), a damaged checkpoint
(10,599 lines of asyncio tracebacks), a NaN stop (a traceback).
"""
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TFDS_DATA_DIR
from harness import cli_env
from ssl_jax import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow   # the trainer as a subprocess

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
STEPS = 8
BASE = ['--config=configs/moco.py:cifar10,runlocal', f'--config.data.data_dir={TFDS_DATA_DIR}',
        '--config.batch_size=16', '--config.log_every_steps=1', '--config.checkpoint.every_steps=2',
        '--config.evals.knn.at_start=False', '--config.evals.online_probe.at_start=False',
        '--config.data.train_split=train[:256]',
        '--config.data.shuffle_buffer=256']
LINE = re.compile(r'^step (\d+)/\d+ ')


def _env():
  return cli_env()


def _cli(workdir, *extra, steps=STEPS, signal_at=None, sig=signal.SIGINT, argv=None):
  """(returncode, stdout, stderr); ``sig`` is sent once step ``signal_at``'s line is out."""
  cmd = argv or [sys.executable, '-m', 'ssl_jax.main', *BASE, f'--config.total_steps={steps}',
                 f'--workdir={workdir}', *extra]
  p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  out = []
  for line in p.stdout:
    out.append(line)
    m = LINE.match(line)
    if signal_at is not None and m and int(m.group(1)) >= signal_at and p.poll() is None:
      p.send_signal(sig)
      signal_at = None
  err = p.stderr.read()
  p.wait(timeout=900)
  return p.returncode, ''.join(out), err


def _err_lines(err):
  return [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """One finished run (8 steps), copied by each test that changes it."""
  work = tmp_path_factory.mktemp('finished') / 'run'
  rc, out, err = _cli(work)
  assert rc == 0, out[-3000:] + err[-3000:]
  return work


def _copy(src, tmp_path):
  dst = tmp_path / 'run'
  shutil.copytree(src, dst)
  return dst


def test_lost_config_json_and_a_changed_lr_is_refused(finished, tmp_path):
  work = _copy(finished, tmp_path)
  os.remove(work / 'config.json')
  rc, out, err = _cli(work, '--config.optimizer.base_lr=0.5', steps=12)
  assert rc == 2, out[-3000:] + err[-3000:]
  assert _err_lines(err) == [
      f'Config error: workdir {work} belongs to a different config (2 keys differ: '
      'optimizer.base_lr: 0.3 -> 0.5; total_steps: 8 -> 12). Accepted: a new --workdir, the '
      'same config, or --allow_config_change to resume anyway.'], err
  assert 'config.json is missing: checking this config against the checkpoint' in out
  assert not (work / 'config.json').exists()    # nothing rewritten


def test_lost_config_json_and_another_method_is_refused_even_when_allowed(finished, tmp_path):
  work = _copy(finished, tmp_path)
  os.remove(work / 'config.json')
  for extra in ([], ['--allow_config_change']):
    rc, out, err = _cli(None, argv=[
        sys.executable, '-m', 'ssl_jax.main', '--config=configs/byol.py:cifar10,runlocal',
        f'--config.data.data_dir={TFDS_DATA_DIR}', f'--workdir={work}', *extra])
    assert rc == 2, out[-3000:] + err[-3000:]
    assert _err_lines(err) == [
        f"Config error: the checkpoints in {work} are of method 'moco', which 'byol' cannot "
        'load (another network and state). Accepted: a new --workdir, or the same method.'], err
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '6', '8']   # nothing moved aside


def test_corrupt_config_json_is_one_line_naming_it(finished, tmp_path):
  work = _copy(finished, tmp_path)
  (work / 'config.json').write_text('{"method": {"na')
  rc, out, err = _cli(work)
  assert rc == 2
  assert _err_lines(err) == [
      f'Config error: {work}/config.json is not valid JSON (Unterminated string starting at at '
      'line 1); restore it from a copy, or move it away to start this workdir afresh.'], err


def test_rerun_of_a_finished_run_says_already_complete_and_writes_nothing(finished, tmp_path):
  work = _copy(finished, tmp_path)
  before = sorted(os.listdir(work))
  events = [n for n in before if n.startswith('events.out.tfevents')]
  rc, out, err = _cli(work)
  assert rc == 0, out[-3000:] + err[-3000:]
  assert f'Already complete: {work} holds the final checkpoint (step {STEPS} of {STEPS})' in out
  assert re.search(rf'^Final after {STEPS} steps \| kNN top-1', out, re.M), out
  assert 'compiling' not in out and '[eval' not in out
  assert [n for n in os.listdir(work) if n.startswith('events.out.tfevents')] == events


def test_ctrl_c_saves_resumes_exactly_and_a_second_one_exits_at_once(finished, tmp_path):
  work = tmp_path / 'interrupted'
  rc, out, err = _cli(work, signal_at=1)   # early: the run must not reach its end first
  assert rc == 0, out[-3000:] + err[-3000:]
  assert 'Ctrl-C: saving a checkpoint after this step, then exiting' in out
  stopped = int(re.search(r'Stopping at step (\d+) \(Ctrl-C \(SIGINT\)\)', out).group(1))
  assert stopped < STEPS and 'Traceback' not in err
  assert ckpt_lib.checkpoint_steps(str(work))[-1] == stopped
  rc, out, err = _cli(work)
  assert rc == 0 and f'Resumed from {work}/checkpoints/{stopped} ' in out, out[-3000:] + err
  a, _ = ckpt_lib.restore_state(str(work), items=())
  b, _ = ckpt_lib.restore_state(str(finished), items=())
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Two Ctrl-C during start-up (reading the data, building, the start-up kNN evaluation, some
  # seconds): out at once, one line, exit 130. The second is sent once the first is
  # acknowledged (two pending signals merge into one).
  start_up = [a for a in BASE if not a.startswith('--config.evals.')]
  p = subprocess.Popen([sys.executable, '-m', 'ssl_jax.main', *start_up,
                        '--config.total_steps=400', f'--workdir={tmp_path / "twice"}'],
                       cwd=REPO, env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in p.stdout:
    if line.startswith('Reading cifar10'):
      p.send_signal(signal.SIGINT)
    if line.startswith('Ctrl-C: saving a checkpoint'):
      p.send_signal(signal.SIGINT)
      break
  p.stdout.read()
  err = p.stderr.read()
  assert p.wait(timeout=300) == 130
  assert _err_lines(err) == ['Interrupted: Ctrl-C: exiting at once, nothing saved since the last '
                             'checkpoint; rerun the same command to resume'], err


def test_damaged_checkpoint_is_a_few_lines_and_kept(finished, tmp_path):
  work = _copy(finished, tmp_path)
  for d in ('d', 'ocdbt.process_0'):   # the array data of the newest step, truncated
    for root, _, files in os.walk(work / 'checkpoints' / str(STEPS) / 'state' / d):
      for f in files:
        os.truncate(os.path.join(root, f), 10)
  rc, out, err = _cli(work, '--allow_config_change', steps=10)
  assert rc == 0, out[-3000:] + err[-3000:]
  assert len(_err_lines(err)) <= 5 and 'Event loop is closed' not in err, err
  assert f'skipping damaged checkpoint {work}/checkpoints/{STEPS}' in out
  assert (work / 'checkpoints' / f'damaged-{STEPS}').is_dir()


def test_nan_stop_is_a_few_lines_and_keeps_the_last_good_checkpoint(tmp_path):
  work = tmp_path / 'nan'
  rc, out, err = _cli(work, '--config.optimizer.base_lr=1e30',
                      '--config.checkpoint.every_steps=1', '--config.checkpoint.async_save=False')
  assert rc == 1, out[-3000:] + err[-3000:]
  lines = _err_lines(err)
  assert len(lines) <= 5 and 'Traceback' not in err, err
  m = re.match(r'Stopped: (loss|grad_norm|online_probe/train_loss) is NaN or Inf at step (\d+); '
               r'stopping\. The last good checkpoint \(.*/checkpoints/(\d+)\) is kept\.', lines[0])
  assert m and int(m.group(3)) == int(m.group(2)) - 1, lines
  assert lines[-1] == f'(full traceback: {work}/error.log; or rerun with --verbosity=0 to print it)'
  assert 'NonFiniteError' in (work / 'error.log').read_text()
  outcome = ckpt_lib.paths.read_json(str(work / 'outcome.json'))
  assert (outcome['status'], outcome['exit_code']) == ('failed', 1)


def test_disk_full_is_a_few_lines_and_keeps_the_earlier_checkpoint(tmp_path):
  """A 2 MiB tmpfs (in a private mount namespace) fills up at the second checkpoint (each is
  1.3 MiB)."""
  mnt = tmp_path / 'small'
  mnt.mkdir()
  work = mnt / 'run'
  cmd = [sys.executable, '-m', 'ssl_jax.main', *BASE, '--config.total_steps=10',
         '--config.checkpoint.every_steps=5', '--config.evals.knn.at_end=False',
         '--config.evals.online_probe.at_end=False',
         '--config.model.projector.hidden_dim=16', f'--workdir={work}']
  script = (f'mount -t tmpfs -o size=2m tmpfs {mnt} && '
            f'{subprocess.list2cmdline(cmd)}; echo "rc=$?"; ls {work}/checkpoints')
  unshare = ['unshare', '--mount'] if os.geteuid() == 0 else ['unshare', '-rm']
  r = subprocess.run([*unshare, 'sh', '-c', script], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=900)
  assert 'rc=1' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
  lines = _err_lines(r.stderr)
  assert len(lines) <= 5 and 'Traceback' not in r.stderr, r.stderr
  # The last line, or the one before the pointer to error.log (written when space was freed).
  if lines[-1].startswith('(full traceback: '):
    assert lines[-1] == (f'(full traceback: {work}/error.log; or rerun with --verbosity=0 to '
                         'print it)'), lines
    lines = lines[:-1]
  assert re.fullmatch(r'Error: No space left on device writing \S+: the disk is full\. Free space '
                      r'or choose another --workdir, then rerun the same command \(it resumes '
                      r'from the last complete checkpoint\)\.', lines[-1]), lines
  kept = r.stdout.split('rc=1', 1)[1].split()
  assert '5' in kept, r.stdout   # the checkpoint before the full disk is still there


def test_tensorboard_shows_the_config_and_the_score_plots(finished):
  """TensorBoard's Text tab holds the run's config, its Images tab the pos/neg score plot."""
  from tensorboard.backend.event_processing import event_accumulator
  tags, config_text = set(), ''
  for name in os.listdir(finished):
    if name.startswith('events.out.tfevents'):
      acc = event_accumulator.EventAccumulator(str(finished / name), size_guidance={
          event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
      acc.Reload()
      tags |= set(acc.Tags()['tensors']) | set(acc.Tags()['images'])
      if 'config' in acc.Tags()['tensors']:
        config_text = acc.Tensors('config')[0].tensor_proto.string_val[0].decode()
  assert {'config', 'scores/distribution'} <= tags, tags
  assert '"name": "moco"' in config_text and '"total_steps": 8' in config_text
