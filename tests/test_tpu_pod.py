"""launch/tpu_pod.sh against a recording fake gcloud (tests/fake_gcloud): no pod, no real gcloud.

The fake runs each `gcloud ... ssh --command` locally in a directory standing in for a worker's
home, so the launcher's real worker-side steps run: unpacking, the install (stub pip/python that
record what they are asked), the detached start (setsid nohup, lock file), the log stream and
the status checks. The trainer is a stub that resumes from the newest checkpoint of the workdir
and prints the real trainer's completion block (ssl_jax.train._summary_block).
"""
import os
import re
import shutil
import subprocess
import time

import jax
import pytest

from fake_gcloud import fake_gcloud as fg
from ssl_jax import train

pytestmark = pytest.mark.slow  # runs the launcher and its fake gcloud in subprocesses

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
LAUNCHER = os.path.join(REPO, 'launch', 'tpu_pod.sh')
LIBTPU = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
WORKDIR = 'gs://bkt/run'
CONFIG = 'configs/byol.py:imagenet'
TRAINER_ARGV = [f'--config={CONFIG}', f'--workdir={WORKDIR}', '--distributed=yes',
                '--config.batch_size=64']


@pytest.fixture
def fake(tmp_path):
  state_dir = str(tmp_path / 'gcloud')
  made = []

  def make(**kw):
    env = fg.setup(state_dir, jax_version=jax.__version__,
                   summary=train._summary_block(None, WORKDIR), **kw)
    env.pop('PREEMPTIBLE', None)
    env.update(TPU_POLL_S='0.05', TPU_GRACE_S='0', TFDS_DATA_DIR='gs://bkt/tfds')
    # The fake comes first on PATH: /usr/bin/gcloud (a real one) is never reached.
    assert shutil.which('gcloud', path=env['PATH']) == os.path.join(state_dir, 'bin', 'gcloud')
    made.append(env)
    return state_dir, env

  yield make
  if made:
    fg.kill_runs(state_dir)


def _launch(env, *args, workdir=WORKDIR, wait=True):
  cmd = ['bash', LAUNCHER, 'ssl-test', 'zone-a', 'v4-16', CONFIG, workdir, *args]
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, cwd=REPO)


def _label(argv):
  """compute tpus GROUP VERB ... -> a short name; ssh calls by worker and worker-side step."""
  group, verb = argv[2], argv[3]
  if group == 'queued-resources':
    return f'qr-{verb}'
  if verb != 'ssh':
    return 'scp' if verb == 'scp' else f'vm-{verb}'
  worker = next(a.split('=', 1)[1] for a in argv if a.startswith('--worker='))
  cmd = argv[argv.index('--command') + 1]
  step = re.findall(r'tpu_pod\.sh (_\w+)', cmd)
  assert len(step) == 1, cmd
  return f'ssh-{worker}:{step[0][1:]}'


def _sequence(calls):
  return ' '.join(_label(c['argv']) for c in calls) + ' '


def _argv(calls, label):
  return [c['argv'] for c in calls if _label(c['argv']) == label]


def test_spot_watch_survives_a_stop_and_a_preemption_then_reports_done(fake):
  # Stops at step 2 (SIGTERM on a healthy slice) and is preempted at step 4 (spot slice lost).
  state_dir, env = fake(total_steps=6, step_s=0.05,
                        events=[{'at_step': 2, 'kind': 'sigterm'},
                                {'at_step': 4, 'kind': 'preempt'}])
  r = _launch(env, '--spot', '--watch', '--config.batch_size=64')
  assert r.returncode == 0, r.stdout + r.stderr
  calls = fg.calls(state_dir)
  fg_calls = [c for c in calls if _label(c['argv']) != 'ssh-0:logs']  # the stream: background
  poll = r'(qr-describe vm-describe ssh-all:status )'
  assert re.fullmatch(
      r'qr-describe qr-create (qr-describe )+vm-describe '    # absent -> request -> wait ACTIVE
      r'scp ssh-all:install ssh-all:start '                   # copy, install, detached start
      + poll + r'+ssh-all:start '                             # stopped (SIGTERM): restart in place
      + poll + r'*qr-describe '                               # ... SUSPENDED: preempted
      r'qr-delete qr-create (qr-describe )+vm-describe '      # delete + request again, wait
      r'scp ssh-all:install ssh-all:start '                   # fresh workers: copy, install, rerun
      + poll + r'+', _sequence(fg_calls)), _sequence(fg_calls)

  create = ['compute', 'tpus', 'queued-resources', 'create', 'ssl-test', '--zone', 'zone-a',
            '--node-id', 'ssl-test', '--accelerator-type', 'v4-16',
            '--runtime-version', 'tpu-ubuntu2204-base', '--spot']
  assert _argv(calls, 'qr-create') == [create, create]
  assert _argv(calls, 'qr-delete') == [['compute', 'tpus', 'queued-resources', 'delete',
                                        'ssl-test', '--zone', 'zone-a', '--force', '--quiet']]
  for argv in _argv(calls, 'qr-describe'):
    assert argv[4:] == ['ssl-test', '--zone', 'zone-a', '--format=value(state.state)']
  for argv in _argv(calls, 'scp'):
    assert argv[5:] == ['ssl-test:ssl_jax.tgz', '--zone', 'zone-a', '--worker=all']

  # One log stream on worker 0 after each start, before the next start.
  starts = [c['t'] for c in calls if _label(c['argv']) == 'ssh-all:start'] + [float('inf')]
  streams = [c['t'] for c in calls if _label(c['argv']) == 'ssh-0:logs']
  assert len(streams) == 3
  for i, t in enumerate(streams):
    assert starts[i] < t < starts[i + 1]

  # The pin: jax[tpu] == the jax version requirements.txt installed, on every worker's venv
  # (2 slices x 2 workers), after the requirements.
  pip = fg.records(state_dir, 'pip')
  venvs = sorted({p['venv'] for p in pip})
  assert len(venvs) == 4
  for venv in venvs:
    assert [p['argv'] for p in pip if p['venv'] == venv] == [
        ['install', '-q', '-U', 'pip'], ['install', '-q', '-r', 'requirements.txt'],
        ['install', '-q', f'jax[tpu]=={jax.__version__}', '-f', LIBTPU]]
  assert r.stdout.count(f'installed jax {jax.__version__} with jax[tpu]=={jax.__version__}') == 4

  # Three starts on both workers with the same flags and workdir; each resumes where the last
  # one stopped; every start detached (its own session and process group).
  runs = fg.records(state_dir, 'trainer')
  assert sorted((t['worker'], t['argv']) for t in runs) == (
      [('0', TRAINER_ARGV)] * 3 + [('1', TRAINER_ARGV)] * 3)
  assert [t['start_step'] for t in runs if t['worker'] == '0'] == [0, 2, 4]
  assert all(t['tfds'] == 'gs://bkt/tfds' and t['pgid'] == t['sid'] != os.getsid(0)
             for t in runs)

  # The streamed log reached the launcher, the done signal is recorded on the workers.
  assert 'Stopping at step 2' in r.stdout and 'step 6/6' in r.stdout
  assert f'Outputs in {WORKDIR}:' in r.stdout
  assert 'tpu_pod: the run is done (gs://bkt/run)' in r.stdout
  homes = fg.worker_homes(state_dir)
  outcome = [open(os.path.join(h, 'ssl_jax_run', 'outcome')).read().strip() for h in homes]
  assert outcome == ['done', 'exited']  # only process 0 prints the completion line


def test_detached_run_survives_a_dropped_stream_and_is_never_started_twice(fake):
  # The run holds at step 3 until the test releases it (after re-attaching).
  state_dir, env = fake(total_steps=6, step_s=0.02, drop_stream_after_s=0.5,
                        events=[{'at_step': 3, 'kind': 'hold'}])
  r = _launch(env, '--config.batch_size=64')
  assert r.returncode == 0, r.stdout + r.stderr
  assert re.fullmatch(r'vm-describe vm-create vm-describe scp ssh-all:install ssh-all:start '
                      r'ssh-0:logs ssh-all:status ', _sequence(fg.calls(state_dir)))
  create = fg.calls(state_dir)[1]['argv']
  assert create == ['compute', 'tpus', 'tpu-vm', 'create', 'ssl-test', '--zone', 'zone-a',
                    '--accelerator-type', 'v4-16', '--version', 'tpu-ubuntu2204-base']
  assert 'the log stream ended (ssh exit 255) but the run goes on' in r.stdout
  # The ssh session is gone, the run is not: each worker's lock is still held.
  for home in fg.worker_homes(state_dir):
    lock = os.path.join(home, 'ssl_jax_run', 'lock')
    assert subprocess.run(['flock', '-n', lock, 'true']).returncode == 1

  n = len(fg.calls(state_dir))
  busy = _launch(env, workdir='gs://bkt/other')  # another run on a busy slice: refused
  assert busy.returncode == 2
  assert 'ssl-test is running another run (gs://bkt/run)' in busy.stderr
  assert _sequence(fg.calls(state_dir)[n:]) == 'vm-describe ssh-all:status '

  n = len(fg.calls(state_dir))
  again = _launch(env, '--config.batch_size=64', wait=False)  # the same command: re-attaches
  deadline = time.time() + 30
  while 'ssh-0:logs' not in _sequence(fg.calls(state_dir)[n:]) and time.time() < deadline:
    time.sleep(0.05)
  fg.release(state_dir, 3)
  out, err = again.communicate(timeout=60)
  assert again.returncode == 0, out + err
  assert re.fullmatch(r'vm-describe ssh-all:status ssh-0:logs (ssh-all:status )+',
                      _sequence(fg.calls(state_dir)[n:]))
  assert 'is already running on ssl-test: attaching to its log' in out
  assert 'step 6/6' in out and f'Outputs in {WORKDIR}:' in out
  assert 'tpu_pod: the run is done' in out
  runs = fg.records(state_dir, 'trainer')  # one start per worker, from step 0
  assert sorted((t['worker'], t['argv']) for t in runs) == [('0', TRAINER_ARGV),
                                                            ('1', TRAINER_ARGV)]
  assert [t['start_step'] for t in runs if t['worker'] == '0'] == [0]


def test_failed_spot_request_is_an_error(fake):
  state_dir, env = fake(qr_fail=True)
  r = _launch(env, '--spot')
  assert r.returncode == 1
  assert 'creating ssl-test failed: the queued resource is FAILED' in r.stderr
  calls = fg.calls(state_dir)
  assert re.fullmatch(r'qr-describe qr-create (qr-describe )+', _sequence(calls))
  assert calls[-1]['argv'][4:] == ['ssl-test', '--zone', 'zone-a']  # the full description
