"""launch/tpu_pod.sh against a recording fake gcloud (tests/fake_gcloud): no pod, no real gcloud.

The fake runs each `gcloud ... ssh --command` locally in a directory standing in for a worker's
home, so the launcher's real worker-side steps run: unpacking, the install (stub pip/python/uv
that record what they are asked), the detached start (setsid nohup, lock file), the log stream,
the log copies and the status checks. `gcloud storage cp|cat|ls` work on a local directory
standing in for the bucket. The trainer is a stub that resumes from the newest checkpoint of the
workdir, prints the real trainer's completion block (ssl_jax.train._summary_block) and writes
WORKDIR/outcome.json as ssl_jax.train.write_outcome does.
"""
import json
import os
import re
import shutil
import signal
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
    env.update(TPU_POLL_S='0.05', TPU_GRACE_S='0', TFDS_DATA_DIR='gs://bkt/tfds',
               TPU_LOG_SYNC_S='0.3')
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
  """compute tpus GROUP VERB ... -> a short name; ssh calls by worker and worker-side step;
  storage VERB ... -> storage-VERB."""
  if argv[0] == 'storage':
    return f'storage-{argv[1]}'
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
  """The launcher's own calls (not the workers' log and outcome.json copies), by label."""
  return ' '.join(_label(c['argv']) for c in calls if c.get('worker') is None) + ' '


def _launch_id(out):
  ids = set(re.findall(r'launch (\d{8}T\d{6}Z-[0-9a-f]{4})', out))
  assert len(ids) == 1, ids
  return ids.pop()


def _outcome(state_dir):
  with open(fg.gcs(state_dir, f'{WORKDIR}/outcome.json')) as f:
    return json.load(f)


def _bucket_logs(state_dir, launch_id):
  """{hostname: text} of WORKDIR/logs/<launch_id>/ in the fake bucket."""
  d = fg.gcs(state_dir, f'{WORKDIR}/logs/{launch_id}')
  out = {}
  for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    assert name.endswith('.log'), name
    with open(os.path.join(d, name)) as f:
      out[name[:-len('.log')]] = f.read()
  return out


def _worker_copies(state_dir, worker, what):
  """The `gcloud storage cp` calls worker `worker` made whose destination contains `what`."""
  return [c for c in fg.calls(state_dir) if c.get('worker') == worker
          and c['argv'][:2] == ['storage', 'cp'] and what in c['argv'][-1]]


def _wait_for(path, timeout=30):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert time.time() < deadline, f'{path} never appeared'
    time.sleep(0.02)


def _argv(calls, label):
  return [c['argv'] for c in calls if _label(c['argv']) == label]


@pytest.mark.parametrize('preempted_before', ['qr-describe', 'vm-describe'])
def test_spot_watch_survives_a_stop_and_a_preemption_then_reports_done(fake, preempted_before):
  # Stops at step 2 (SIGTERM on a healthy slice) and is preempted at step 4 (spot slice lost).
  # The launcher's poll reads the queued resource, then its node: the preemption lands before
  # the first read (queued resource SUSPENDED) or between the two (queued resource ACTIVE, then
  # its node gone while the queued resource remains). Either way it is deleted, then requested
  # again (a create while it remains fails with ALREADY_EXISTS).
  state_dir, env = fake(total_steps=6, step_s=0.05,
                        events=[{'at_step': 2, 'kind': 'sigterm'},
                                {'at_step': 4, 'kind': 'preempt', 'on': preempted_before}])
  r = _launch(env, '--spot', '--watch', '--config.batch_size=64')
  assert r.returncode == 0, r.stdout + r.stderr
  calls = fg.calls(state_dir)
  fg_calls = [c for c in calls if _label(c['argv']) != 'ssh-0:logs']  # the stream: background
  poll = r'(qr-describe vm-describe ssh-all:status )'
  assert re.fullmatch(
      r'qr-describe qr-create (qr-describe )+vm-describe '    # absent -> request -> wait ACTIVE
      r'scp ssh-all:install ssh-all:start '                   # copy, install, detached start
      + poll + r'+storage-cat ssh-all:start '                 # outcome.json: stopped -> restart
      + poll + r'*qr-describe '                               # ... SUSPENDED: preempted, or
      + ('vm-describe ' if preempted_before == 'vm-describe' else '')  # ACTIVE, node gone
      + r'qr-delete qr-create (qr-describe )+vm-describe '      # delete + request again, wait
      r'scp ssh-all:install ssh-all:start '                   # fresh workers: copy, install, rerun
      + poll + r'+storage-cat ', _sequence(fg_calls)), _sequence(fg_calls)
  assert [c['argv'] for c in calls if c['argv'][:2] == ['storage', 'cat']
          and c['worker'] is None] == [['storage', 'cat', f'{WORKDIR}/outcome.json']] * 2

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
  # This machine's python3 (>= 3.11, as TPU_PYTHON is not set) made the venvs: no uv.
  assert len(re.findall(r'Python: python3 \(Python 3\.\d+\.\d+, >= 3\.11\)', r.stdout)) == 4
  assert fg.records(state_dir, 'uv') == []

  # Three starts on both workers with the same flags and workdir; each resumes where the last
  # one stopped; every start detached (its own session and process group).
  runs = fg.records(state_dir, 'trainer')
  lid = _launch_id(r.stdout)  # one launch: one id for its three starts
  assert all(t['launch_id'] == lid for t in runs)
  assert sorted((t['worker'], t['argv']) for t in runs) == (
      [('0', TRAINER_ARGV)] * 3 + [('1', TRAINER_ARGV)] * 3)
  assert [t['start_step'] for t in runs if t['worker'] == '0'] == [0, 2, 4]
  assert all(t['tfds'] == 'gs://bkt/tfds' and t['pgid'] == t['sid'] != os.getsid(0)
             for t in runs)

  # The streamed log reached the launcher; the outcome is the trainer's outcome.json.
  assert 'Stopping at step 2' in r.stdout and 'step 6/6' in r.stdout
  assert f'Outputs in {WORKDIR}:' in r.stdout
  assert (f'tpu_pod: ssl-test is '
          f'{"SUSPENDED" if preempted_before == "qr-describe" else "NODE_ABSENT"} (preempted): '
          'recreating it') in r.stdout
  # One stream at a time: an ended stream does not go on printing the restarted run's lines.
  assert [r.stdout.count(f'resuming from step {s}') for s in (0, 2, 4)] == [2, 1, 1]
  assert 'pop_var_context' not in r.stdout + r.stderr  # bash's error, of a trap in a function
  assert ('the run stopped before finishing (gs://bkt/run): outcome.json: stopped, exit code 0: '
          'Stopping at step 2') in r.stdout
  assert ('tpu_pod: the run is done (gs://bkt/run): outcome.json: done, exit code 0: '
          'Final after 6 steps') in r.stdout
  outcome = _outcome(state_dir)
  assert (outcome['status'], outcome['exit_code'], outcome['step'], outcome['launch_id']) == (
      'done', 0, 6, lid)
  assert 'written_by' not in outcome
  homes = fg.worker_homes(state_dir)
  assert [open(os.path.join(h, 'ssl_jax_run', 'outcome')).read().strip() for h in homes] == [
      'exited', 'exited']  # the per-worker bookkeeping: exit code 0

  # Every worker's log in the bucket, under this launch: the preempted slice's (g1: at least up
  # to the stop, copied when it ended; the restart there appends, copied every TPU_LOG_SYNC_S
  # until the preemption killed it) and the new slice's (g2, to the end).
  logs = _bucket_logs(state_dir, lid)
  assert sorted(logs) == ['ssl-test-g1-w0', 'ssl-test-g1-w1', 'ssl-test-g2-w0', 'ssl-test-g2-w1']
  assert 'Stopping at step 2' in logs['ssl-test-g1-w0']
  assert "outcome.json (the trainer's): status stopped" in logs['ssl-test-g1-w0']
  assert 'step 6/6' in logs['ssl-test-g2-w0'] and f'Outputs in {WORKDIR}:' in logs['ssl-test-g2-w0']
  assert "outcome.json (the trainer's): status done" in logs['ssl-test-g2-w0']
  assert 'trainer exit code 0' in logs['ssl-test-g2-w1']


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
  assert re.fullmatch(r'vm-describe ssh-all:status ssh-0:logs (ssh-all:status )+storage-cat ',
                      _sequence(fg.calls(state_dir)[n:]))
  lid = _launch_id(r.stdout)  # the re-attaching launch adopts the running run's launch id
  assert f'is already running on ssl-test (launch {lid}): attaching to its log' in out
  assert _outcome(state_dir)['launch_id'] == lid and _outcome(state_dir)['status'] == 'done'
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


def _installs(state_dir, worker):
  """The install commands one worker ran, in order: ('pip', argv, venv) / ('uv', argv)."""
  recs = [('pip', r) for r in fg.records(state_dir, 'pip')] + [
      ('uv', r) for r in fg.records(state_dir, 'uv')]
  recs = sorted((r for r in recs if r[1]['worker'] == worker), key=lambda r: r[1]['t'])
  return [(tool, r['argv']) + ((r['venv'],) if tool == 'pip' else ()) for tool, r in recs]


def test_default_image_python310_gets_a_uv_managed_python311_and_runs_to_done(fake):
  """The default TPU VM image (tpu-ubuntu2204-base: python3 is 3.10), TPU_PYTHON/TPU_SETUP unset.

  What the fake proves: the launcher's decision logic and command sequence on such a worker —
  python3 is < 3.11 and TPU_PYTHON is not set, so it installs uv with python3's pip (--user),
  has uv install a managed CPython 3.11, makes ~/ssl_jax/.venv with it (seeded with pip), then
  installs requirements.txt and the jax[tpu]==<that jax> pin into that venv, and the run starts
  and completes with it. What it does not prove: that uv's download of CPython works on a real
  TPU VM, or that jax[tpu] installs and finds the TPU there (stub python3, pip and uv here).
  """
  state_dir, env = fake(total_steps=3, step_s=0.05, worker_python='3.10.12')
  r = _launch(env, '--config.batch_size=64')
  assert r.returncode == 0, r.stdout + r.stderr
  assert _sequence(fg.calls(state_dir)) == (
      'vm-describe vm-create vm-describe scp ssh-all:install ssh-all:start ssh-0:logs '
      'ssh-all:status storage-cat ')
  assert r.stdout.count('Python: a uv-managed Python 3.11 (python3 is Python 3.10.12, < 3.11, '
                        'and TPU_PYTHON is not set)') == 2
  for w, home in enumerate(fg.worker_homes(state_dir)):
    venv = os.path.join(home, 'ssl_jax', '.venv')
    assert _installs(state_dir, str(w)) == [
        ('pip', ['install', '--user', '-q', 'uv'], None),      # python3 -m pip, outside a venv
        ('uv', ['python', 'install', '3.11']),
        ('uv', ['venv', '--seed', '--python', '3.11', '.venv']),
        ('pip', ['install', '-q', '-U', 'pip'], venv),
        ('pip', ['install', '-q', '-r', 'requirements.txt'], venv),
        ('pip', ['install', '-q', f'jax[tpu]=={jax.__version__}', '-f', LIBTPU], venv)]
    assert [p['via'] for p in fg.records(state_dir, 'pip') if p['worker'] == str(w)][0] == (
        'python -m pip')
    assert os.path.exists(os.path.join(home, '.local', 'bin', 'uv'))
  assert r.stdout.count(f'installed jax {jax.__version__} with jax[tpu]=={jax.__version__}') == 2

  lid = _launch_id(r.stdout)
  runs = fg.records(state_dir, 'trainer')
  assert sorted((t['worker'], t['launch_id']) for t in runs) == [('0', lid), ('1', lid)]
  assert 'step 3/3' in r.stdout and f'Outputs in {WORKDIR}:' in r.stdout
  assert ('tpu_pod: the run is done (gs://bkt/run): outcome.json: done, exit code 0: '
          'Final after 3 steps') in r.stdout
  outcome = _outcome(state_dir)
  assert {k: outcome[k] for k in ('status', 'exit_code', 'step', 'launch_id')} == {
      'status': 'done', 'exit_code': 0, 'step': 3, 'launch_id': lid}
  logs = _bucket_logs(state_dir, lid)
  assert sorted(logs) == ['ssl-test-g1-w0', 'ssl-test-g1-w1']
  assert 'step 3/3' in logs['ssl-test-g1-w0'] and 'trainer exit code 0' in logs['ssl-test-g1-w1']
  # `gcloud storage ls` of the fake bucket lists them too.
  ls = subprocess.run(['gcloud', 'storage', 'ls', f'{WORKDIR}/logs/{lid}/'], env=env,
                      capture_output=True, text=True, check=True).stdout.split()
  assert ls == [f'{WORKDIR}/logs/{lid}/ssl-test-g1-w0.log', f'{WORKDIR}/logs/{lid}/ssl-test-g1-w1.log']


def test_explicit_tpu_python_older_than_311_is_a_one_line_error(fake):
  state_dir, env = fake(worker_python='3.10.12')
  r = _launch(dict(env, TPU_PYTHON='python3.10'))
  assert r.returncode == 1, r.stdout + r.stderr
  errors = [l for l in r.stderr.splitlines() if ': error: ' in l and 'tpu_pod[' in l]
  assert len(errors) == 2  # one line from each worker
  for e in errors:
    assert re.fullmatch(
        r'tpu_pod\[ssl-test-g1-w[01]\]: error: TPU_PYTHON=python3\.10 is Python 3\.10\.12, too old: '
        r'jax>=0\.10 \(requirements\.txt\) needs Python >= 3\.11\. Unset TPU_PYTHON .*'
        r'TPU_PYTHON=python3\.11 .*', e), e
  assert 'tpu_pod: installing on ssl-test failed' in r.stdout
  assert fg.records(state_dir, 'uv') == [] and fg.records(state_dir, 'pip') == []
  assert fg.records(state_dir, 'trainer') == []


def test_python310_without_pip_names_the_fix(fake):
  state_dir, env = fake(worker_python='3.10.12', worker_pip=False)
  r = _launch(env)
  assert r.returncode == 1, r.stdout + r.stderr
  errors = [l for l in r.stderr.splitlines() if ': error: ' in l and 'tpu_pod[' in l]
  assert len(errors) == 2
  for e in errors:
    assert 'python3 (Python 3.10.12) has no pip, needed to install uv' in e
    assert "TPU_SETUP='sudo apt-get update -qq && sudo apt-get install -y python3-pip'" in e
  assert fg.records(state_dir, 'uv') == [] and fg.records(state_dir, 'trainer') == []


def test_sigterm_stop_is_reported_and_a_watch_rerun_resumes(fake):
  # The run holds at step 2; the test sends SIGTERM to every worker's run (a maintenance
  # notice); the trainer takes stop_s to checkpoint. No periodic log copies (TPU_LOG_SYNC_S=600):
  # each worker's log is copied exactly at the SIGTERM and at the end.
  state_dir, env = fake(total_steps=5, step_s=0.05, stop_s=0.5, worker_python='3.10.12',
                        events=[{'at_step': 2, 'kind': 'hold'}])
  p = _launch(dict(env, TPU_LOG_SYNC_S='600'), '--config.batch_size=64', wait=False)
  _wait_for(os.path.join(state_dir, 'reached_2'))
  fg.kill_runs(state_dir, signal.SIGTERM)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 1, out + err
  lid1 = _launch_id(out)
  assert ('tpu_pod: error: the run stopped before finishing (gs://bkt/run): outcome.json: '
          'stopped, exit code 0: Stopping at step 2') in err
  assert 'run the same command again to resume' in err
  outcome = _outcome(state_dir)
  assert (outcome['status'], outcome['step'], outcome['launch_id']) == ('stopped', 2, lid1)
  logs = _bucket_logs(state_dir, lid1)
  assert sorted(logs) == ['ssl-test-g1-w0', 'ssl-test-g1-w1']
  assert 'Stopping at step 2' in logs['ssl-test-g1-w0']
  assert all('trainer exit code 0 (SIGTERM)' in t for t in logs.values())
  exits = {t['worker']: t['t'] for t in fg.records(state_dir, 'trainer_exit')}
  for w in ('0', '1'):
    copies = _worker_copies(state_dir, w, f'/logs/{lid1}/')
    assert len(copies) == 2, copies  # at the SIGTERM (before the trainer exited), at the end
    assert copies[0]['t'] < exits[w] < copies[1]['t']

  # The same command with --watch: the workers' run has ended, so it reinstalls (the .venv is
  # reused: no uv this time) and starts again; the trainer resumes from step 2 and finishes.
  n = len(fg.calls(state_dir))
  r = _launch(env, '--watch', '--config.batch_size=64')
  assert r.returncode == 0, r.stdout + r.stderr
  seq = _sequence(c for c in fg.calls(state_dir)[n:] if _label(c['argv']) != 'ssh-0:logs')
  assert re.fullmatch(r'vm-describe ssh-all:status scp ssh-all:install ssh-all:start '
                      r'(vm-describe ssh-all:status )+storage-cat ', seq), seq
  lid2 = _launch_id(r.stdout)
  assert lid2 != lid1
  assert r.stdout.count('Python: reusing ~/ssl_jax/.venv (Python 3.11.11)') == 2
  assert len(fg.records(state_dir, 'uv')) == 4  # 2 per worker, all from the first install
  assert [t['start_step'] for t in fg.records(state_dir, 'trainer') if t['worker'] == '0'] == [0, 2]
  assert 'tpu_pod: the run is done (gs://bkt/run)' in r.stdout
  outcome = _outcome(state_dir)
  assert (outcome['status'], outcome['step'], outcome['launch_id']) == ('done', 5, lid2)
  logs2 = _bucket_logs(state_dir, lid2)
  assert sorted(logs2) == ['ssl-test-g1-w0', 'ssl-test-g1-w1']
  assert 'step 5/5' in logs2['ssl-test-g1-w0'] and 'Stopping' not in logs2['ssl-test-g1-w0']
  assert _bucket_logs(state_dir, lid1) == logs  # the first launch's logs are kept


def test_trainer_failure_is_reported_from_its_outcome_json(fake):
  state_dir, env = fake(events=[{'at_step': 2, 'kind': 'fail'}])
  r = _launch(env, '--config.batch_size=64')
  assert r.returncode == 1, r.stdout + r.stderr
  lid = _launch_id(r.stdout)
  assert ('tpu_pod: error: the run failed (gs://bkt/run): outcome.json: failed, exit code 1: '
          f'RuntimeError: fake failure at step 2 (logs: {WORKDIR}/logs/{lid}/)') in r.stderr
  outcome = _outcome(state_dir)
  assert (outcome['status'], outcome['exit_code'], outcome['launch_id']) == ('failed', 1, lid)
  assert 'written_by' not in outcome  # the trainer's own
  assert _worker_copies(state_dir, '0', 'outcome.json') == []
  logs = _bucket_logs(state_dir, lid)
  assert sorted(logs) == ['ssl-test-g1-w0', 'ssl-test-g1-w1']
  assert 'RuntimeError: fake failure at step 2' in logs['ssl-test-g1-w0']
  assert "outcome.json (the trainer's): status failed" in logs['ssl-test-g1-w0']


def _stale_outcome(state_dir, *, step):
  """An earlier launch's outcome.json ("done") in the fake bucket's workdir."""
  stale = fg.gcs(state_dir, f'{WORKDIR}/outcome.json')
  os.makedirs(os.path.dirname(stale))
  with open(stale, 'w') as f:
    json.dump({'status': 'done', 'exit_code': 0, 'final_line': 'old', 'step': step,
               'launch_id': '20200101T000000Z-0bad', 'time': '2020-01-01T00:00:00+00:00'}, f)


def test_trainer_killed_hard_gets_a_failed_outcome_from_worker_0(fake):
  # Every trainer process is SIGKILLed at step 2 (as the OOM killer would): no outcome.json from
  # the trainer. An earlier launch's outcome.json is in the workdir: it does not count.
  state_dir, env = fake(events=[{'at_step': 2, 'kind': 'kill9'}])
  _stale_outcome(state_dir, step=6)
  r = _launch(env, '--config.batch_size=64')
  assert r.returncode == 1, r.stdout + r.stderr
  lid = _launch_id(r.stdout)
  outcome = _outcome(state_dir)
  # final_line: the log's last line (not the wrapper's own tpu_pod lines): bash's report.
  assert re.fullmatch(r'.*tpu_pod\.sh: line \d+: +\d+ Killed +python -m ssl_jax\.main .*',
                      outcome.pop('final_line')), outcome
  assert {k: v for k, v in outcome.items() if k != 'time'} == {
      'status': 'failed', 'exit_code': 137, 'step': None, 'launch_id': lid,
      'written_by': 'launcher'}
  assert ('tpu_pod: error: the run failed (gs://bkt/run): outcome.json: failed, exit code 137 '
          '(written by worker 0: the trainer died without writing it): ') in r.stderr
  assert 'step 2/6 | loss 0.5000' in r.stdout
  # Only worker 0's wrapper wrote it, once (through gcloud storage cp).
  assert len(_worker_copies(state_dir, '0', 'outcome.json')) == 1
  assert _worker_copies(state_dir, '1', 'outcome.json') == []
  logs = _bucket_logs(state_dir, lid)
  assert sorted(logs) == ['ssl-test-g1-w0', 'ssl-test-g1-w1']
  assert 'the trainer wrote no outcome.json for this start' in logs['ssl-test-g1-w0']
  assert all('trainer exit code 137' in t for t in logs.values())


def test_stale_outcome_json_is_ignored_and_failed_copies_are_warnings(fake):
  # A trainer that writes no outcome.json, and a bucket that refuses the workers' copies (the
  # logs and worker 0's outcome.json): the run goes on to its end, each failed copy is one
  # warning line in the log, and the earlier launch's outcome.json ("done") is not taken.
  state_dir, env = fake(total_steps=3, trainer_outcome=False, gcs_fail=['/logs/', 'outcome.json'])
  _stale_outcome(state_dir, step=3)
  r = _launch(env, '--config.batch_size=64')
  assert r.returncode == 1, r.stdout + r.stderr
  lid = _launch_id(r.stdout)
  assert 'step 3/3' in r.stdout  # the run went on
  warn = [l for l in r.stdout.splitlines() if 'warning: could not copy the log' in l]
  assert warn and all(re.fullmatch(
      r'tpu_pod\[ssl-test-g1-w0\]: warning: could not copy the log to '
      rf'{WORKDIR}/logs/{lid}/ssl-test-g1-w0\.log: ERROR: \(gcloud\.storage\.cp\) .*', l)
      for l in warn), warn
  assert ('tpu_pod[ssl-test-g1-w0]: warning: could not write gs://bkt/run/outcome.json '
          '(status failed, exit code 0)') in r.stdout
  assert ('tpu_pod: error: could not tell how the run ended: gs://bkt/run/outcome.json is from '
          f'launch 20200101T000000Z-0bad, not this one ({lid}): ignored') in r.stderr
  assert _outcome(state_dir)['launch_id'] == '20200101T000000Z-0bad'
  assert _bucket_logs(state_dir, lid) == {}
