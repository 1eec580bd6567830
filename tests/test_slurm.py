"""launch/gpu_slurm.sh: on a real one-node Slurm cluster (started and stopped here), a job sent
Slurm's SIGTERM notice mid-training checkpoints, requeues itself and resumes to the same final
state as an uninterrupted job, bit for bit; and, with a stand-in ``srun``/``scontrol``, the
command and environment the script gives each task, its requeue decisions and how
``jax.distributed`` derives the processes and the coordinator from the Slurm variables."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TFDS_DATA_DIR
from test_preemption import LINE, OVERRIDES, _env

# Every test here but the skip check starts subprocesses (the script, a Slurm cluster, JAX
# processes): marked slow one by one.
SLOW = pytest.mark.slow

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'slurm')
SCRIPT = 'launch/gpu_slurm.sh'
CONFIG = 'configs/moco.py:cifar10,runlocal'
# test_preemption's short run, 12 steps: the notice at step 2 leaves 10 steps to spare.
STEPS = 12
VENV = sys.prefix   # the virtualenv running the tests (.venv, or CI's .ci_venv)
BINARIES = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'sinfo', 'scancel', 'scontrol')
APT = ['slurm-wlm', 'munge']
SBIN_PATH = '/usr/sbin:/sbin:/usr/bin'   # where the daemons are when not on a user's PATH
DONE = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY',
        'BOOT_FAIL', 'DEADLINE')


def _flags():
  return [f'--config.data.data_dir={TFDS_DATA_DIR}'] + [
      f'--config.{k}={v}' for k, v in dict(OVERRIDES, total_steps=STEPS).items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _port_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(('', port))
      return True
    except OSError:
      return False


def _jax_port(job_id: int) -> int:
  """JAX's coordinator port for a Slurm job (jax/_src/clusters/slurm_cluster.py)."""
  return job_id % 2**12 + 65535 - 2**12 + 1


def _which(name: str) -> str | None:
  return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


# =============================================================================================
# A local one-node cluster
# =============================================================================================
def slurm_missing() -> list[str]:
  """The Slurm/munge programs the local cluster needs that are not installed here."""
  return [b for b in BINARIES if _which(b) is None]


def require_slurm() -> None:
  """Skip (never install, never fail) where Slurm is absent: installing system packages is the
  job of whoever sets the machine up (.ci/run does, as root, before pytest)."""
  missing = slurm_missing()
  if missing:
    pytest.skip(f'Slurm is not installed (no {", ".join(missing)} on PATH or in {SBIN_PATH}): '
                f'this test starts a one-node Slurm cluster. To run it, install '
                f'`{" ".join(APT)}` (as root: apt-get install -y {" ".join(APT)}; .ci/run does).')


class LocalSlurm:
  """munged + slurmctld + slurmd in the foreground, everything under ``root``."""

  def __init__(self, root):
    self.root = str(root)
    self.procs: dict[str, subprocess.Popen] = {}
    self.conf = os.path.join(self.root, 'slurm.conf')
    self.env = dict(os.environ, SLURM_CONF=self.conf)

  def start(self) -> None:
    for d in ('state', 'spool', 'log', 'munge', 'munge_key'):
      os.makedirs(os.path.join(self.root, d), exist_ok=True)
    os.chmod(os.path.join(self.root, 'munge_key'), 0o700)
    key = os.path.join(self.root, 'munge_key', 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(self.root, 'munge', 'munge.socket')
    self._spawn('munged', [_which('munged'), '--foreground', '--force', f'--key-file={key}',
                           f'--socket={sock}', f'--pid-file={self.root}/munge/munged.pid',
                           f'--log-file={self.root}/log/munged.log',
                           f'--seed-file={self.root}/munge/munged.seed'])
    self._wait(lambda: os.path.exists(sock), 'munged to create its socket', 'munged')
    first_job_id = next(i for i in range(1 + os.getpid() % 3000, 4000)
                        if all(_port_free(_jax_port(j)) for j in range(i, i + 8)))
    with open(os.path.join(HERE, 'slurm.conf.in')) as f:
      conf = f.read().format(root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
                             munge_socket=sock, first_job_id=first_job_id,
                             cpus=os.cpu_count(), memory_mb=1000)
    with open(self.conf, 'w') as f:
      f.write(conf)
    self._spawn('slurmctld', [_which('slurmctld'), '-D', '-f', self.conf])
    self._spawn('slurmd', [_which('slurmd'), '-D', '-N', 'localhost', '-f', self.conf])
    self._wait(lambda: self.run('sinfo', '-h', '-o', '%t', check=False).stdout.strip() == 'idle',
               'the node to be idle in sinfo')

  def _spawn(self, name, cmd):
    log = open(os.path.join(self.root, 'log', f'{name}.out'), 'w')  # pylint: disable=consider-using-with
    self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.root)

  def _wait(self, ready, what, daemon=None, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
      if ready():
        return
      dead = [n for n, p in self.procs.items() if p.poll() is not None]
      if dead:
        break
      time.sleep(0.2)
    pytest.fail(f'local Slurm cluster: timed out waiting for {what} '
                f'(exited: {dead or "none"})\n{self.logs()}', pytrace=False)

  def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True,
                       timeout=60)
    if check and r.returncode:
      raise AssertionError(f'{" ".join(cmd)}: exit {r.returncode}: {r.stderr.strip()}')
    return r

  def job(self, job_id: str) -> dict[str, str]:
    out = self.run('scontrol', 'show', 'job', '-o', job_id).stdout
    return dict(kv.split('=', 1) for kv in out.split() if '=' in kv)

  def logs(self) -> str:
    text = []
    for name in ('slurmctld.log', 'slurmd.log', 'munged.log', 'slurmctld.out', 'slurmd.out'):
      path = os.path.join(self.root, 'log', name)
      if os.path.exists(path):
        with open(path, errors='replace') as f:
          text.append(f'--- {name}\n' + ''.join(f.readlines()[-25:]))
    return '\n'.join(text)

  def stop(self) -> None:
    if 'slurmctld' in self.procs and self.procs['slurmctld'].poll() is None:
      jobs = self.run('squeue', '-h', '-o', '%i', check=False).stdout.split()
      if jobs:
        self.run('scancel', '--full', '--signal=KILL', *jobs, check=False)
        self.run('scancel', *jobs, check=False)
        t0 = time.time()
        while (time.time() - t0 < 60
               and self.run('squeue', '-h', '-o', '%i', check=False).stdout.split()):
          time.sleep(0.5)
    for name in ('slurmd', 'slurmctld', 'munged'):
      p = self.procs.get(name)
      if p is not None and p.poll() is None:
        p.terminate()
        try:
          p.wait(timeout=30)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()


@pytest.fixture(scope='module')
def slurm_cluster(tmp_path_factory):
  require_slurm()
  cluster = LocalSlurm(tmp_path_factory.mktemp('slurm'))
  try:
    cluster.start()
    yield cluster
  finally:
    cluster.stop()


def test_without_slurm_the_cluster_test_skips_with_the_reason(tmp_path, monkeypatch):
  """A machine without Slurm (simulated: PATH and the sbin fallback point at a folder holding
  only a stand-in ``munged``) skips the cluster test with the missing programs and how to get
  them; nothing is installed and nothing fails."""
  (tmp_path / 'munged').write_text('#!/bin/sh\n')
  (tmp_path / 'munged').chmod(0o755)
  monkeypatch.setenv('PATH', str(tmp_path))
  monkeypatch.setattr(sys.modules[__name__], 'SBIN_PATH', str(tmp_path))
  assert slurm_missing() == [b for b in BINARIES if b != 'munged']
  with pytest.raises(pytest.skip.Exception) as skipped:
    require_slurm()
  reason = str(skipped.value)
  assert reason.startswith('Slurm is not installed (no slurmctld, slurmd, sbatch, ')
  assert 'apt-get install -y slurm-wlm munge' in reason and 'munged,' not in reason
  (tmp_path / 'munged').unlink()
  assert slurm_missing() == list(BINARIES)


def _losses(text: str) -> dict[int, str]:
  """Step -> the loss as printed, from a job log (the last print of a step wins)."""
  return {int(m.group(1)): m.group(2) for m in map(LINE.match, text.splitlines()) if m}


def _read(path) -> str:
  if not os.path.exists(path):
    return ''
  with open(path, errors='replace') as f:
    return f.read()


def _numpy(x) -> np.ndarray:
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _final_state(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                               item_names=('state', 'meta'))
  assert mngr.latest_step() == STEPS, (workdir, mngr.all_steps())
  state = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  return state


@SLOW
def test_sbatch_sigterm_requeue_resumes_to_the_uninterrupted_result(slurm_cluster, tmp_path):
  """Two jobs from the same command on the node at once: one left alone, one sent
  ``scancel --signal=TERM`` (what ``--signal=TERM@120`` delivers) once it logs step 2. The
  second must stop with a checkpoint, requeue itself once, resume, and end with a final
  checkpoint identical to the first's: every array of the train state, bit for bit."""
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10'
  assert os.path.exists(os.path.join(VENV, 'bin', 'activate')), (
      f'run the tests from a virtualenv (sys.prefix={VENV} has no bin/activate)')
  env = dict(_env(), SLURM_CONF=slurm_cluster.conf, SSL_JAX_VENV=VENV)
  jobs = {}
  for name in ('straight', 'interrupted'):
    r = subprocess.run(
        [_which('sbatch'), '--parsable', '--gpus-per-node=0', '--cpus-per-task=1',
         f'--job-name={name}', f'--output={tmp_path}/{name}.out', SCRIPT, CONFIG,
         str(tmp_path / name), *_flags()],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs[name] = r.stdout.strip().split(';')[0]

  def report():
    return '\n'.join(f'=== {n} (job {j}): {slurm_cluster.job(j).get("JobState")}\n'
                     + _read(tmp_path / f'{n}.out')[-4000:] for n, j in jobs.items()
                     ) + '\n' + slurm_cluster.logs()

  deadline = time.time() + 1200
  signalled, states, polled = False, {}, 0.0
  while time.time() < deadline:
    if not signalled:   # the notice as soon as step 2 is logged (10 steps before the end)
      steps = _losses(_read(tmp_path / 'interrupted.out'))
      if steps and max(steps) >= 2:
        slurm_cluster.run('scancel', '--signal=TERM', jobs['interrupted'])
        signalled = True
    if time.time() - polled > 1:
      polled = time.time()
      states = {n: slurm_cluster.job(j) for n, j in jobs.items()}
      if all(s['JobState'] in DONE for s in states.values()):
        break
      assert signalled or states['interrupted']['JobState'] in ('PENDING', 'RUNNING'), report()
    time.sleep(0.1)
  else:
    pytest.fail('the jobs did not finish within 20 minutes\n' + report())

  assert signalled, report()
  for name in jobs:
    assert states[name]['JobState'] == 'COMPLETED', report()
    assert states[name]['ExitCode'] == '0:0', report()
  assert states['straight']['Restarts'] == '0', report()
  assert states['interrupted']['Restarts'] == '1', report()   # requeued exactly once

  straight, interrupted = _read(tmp_path / 'straight.out'), _read(tmp_path / 'interrupted.out')
  stopped = re.search(r'Stopping at step (\d+) \(preemption notice \(SIGTERM\)\)', interrupted)
  assert stopped and int(stopped.group(1)) < STEPS, report()
  job = jobs['interrupted']
  assert (f'stopped at step {stopped.group(1)} of {STEPS} (preemption or time-limit notice); '
          f'requeueing job {job} to resume there.') in interrupted, report()
  assert f'job {job} attempt 2 on 1 node(s)' in interrupted, report()
  assert f'at checkpoint step {stopped.group(1)}' in interrupted, report()
  assert f'Resumed from {tmp_path}/interrupted/checkpoints/{stopped.group(1)}' in interrupted
  assert f'gpu_slurm.sh: run complete (step {STEPS} of {STEPS}).' in interrupted, report()
  assert 'Resumed from' not in straight and 'requeueing' not in straight, report()
  # Every step's loss as printed, across both attempts, equals the uninterrupted job's.
  assert _losses(straight) == _losses(interrupted), report()
  assert sorted(_losses(straight)) == list(range(1, STEPS + 1)), report()

  ref, got = _final_state(tmp_path / 'straight'), _final_state(tmp_path / 'interrupted')
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
  assert len(jax.tree.leaves(ref['params'])) > 10
  assert int(np.asarray(got['step'])) == STEPS
  for (path, a), (_, b) in zip(ref_leaves, got_leaves):
    a, b = _numpy(a), _numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape, path
    assert a.tobytes() == b.tobytes(), (jax.tree_util.keystr(path),
                                        float(np.max(np.abs(a.astype(np.float64) - b))))


# =============================================================================================
# The script with a stand-in srun/scontrol (no cluster)
# =============================================================================================
JOB_ID = '4242'


def _fake_bin(tmp_path) -> str:
  d = tmp_path / 'bin'
  d.mkdir()
  for name in ('srun', 'scontrol'):
    shutil.copy(os.path.join(HERE, 'fake_bin', name), d / name)
    os.chmod(d / name, 0o755)
  return str(d)


def _workdir(path, *, steps=(), total_steps=STEPS, total_epochs=1000, steps_per_epoch=16):
  """A workdir as the trainer leaves it: config.json and checkpoints of ``steps``."""
  from ssl_jax import checkpoint
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'total_steps': total_steps, 'total_epochs': total_epochs}, f)
  if steps:
    ckpt = checkpoint.Checkpointer(str(path), async_save=False)
    for s in steps:
      ckpt.save(s, {'w': np.full(3, s, np.float32)},
                {'step': s, 'epoch': s / steps_per_epoch, 'config_method': 'moco'})
    ckpt.close()
  return str(path)


def _run_script(tmp_path, workdir, *, args=None, drop=(), **env_vars):
  """``bash launch/gpu_slurm.sh CONFIG WORKDIR ARGS`` as a 1-node job with 8 GPUs and 32 CPUs."""
  log = tmp_path / 'srun_log'
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.pop('VIRTUAL_ENV', None)
  env.update({'PATH': f'{_fake_bin(tmp_path)}:{env["PATH"]}', 'FAKE_SRUN_LOG': str(log),
              'SLURM_JOB_ID': JOB_ID, 'SLURM_SUBMIT_DIR': REPO, 'SLURM_JOB_NUM_NODES': '1',
              'SLURM_NNODES': '1', 'SLURM_NTASKS': '1', 'SLURM_NTASKS_PER_NODE': '1',
              'SLURM_JOB_NODELIST': 'localhost', 'SLURM_GPUS_PER_NODE': 'h100:8',
              'SLURM_CPUS_PER_TASK': '32', 'SSL_JAX_VENV': VENV,
              'TFDS_DATA_DIR': TFDS_DATA_DIR or ''})
  env.update(env_vars)
  for k in drop:
    env.pop(k, None)
  r = subprocess.run(['bash', os.path.join(REPO, SCRIPT), CONFIG, workdir,
                      *(['--config.batch_size=16'] if args is None else args)],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  tasks = sorted(log.glob('task_*.json')) if log.exists() else []
  recorded = [json.loads(p.read_text()) for p in tasks]
  scontrol = (log / 'scontrol.txt').read_text() if (log / 'scontrol.txt').exists() else ''
  return r, recorded, scontrol


@SLOW
def test_script_starts_one_task_per_node_with_all_its_gpus_and_cpus(tmp_path):
  work = _workdir(tmp_path / 'w', steps=(STEPS,))
  r, tasks, scontrol = _run_script(tmp_path, work, XLA_PYTHON_CLIENT_MEM_FRACTION='')
  assert r.returncode == 0, r.stderr
  assert len(tasks) == 1
  t = tasks[0]
  assert t['options'] == ['--kill-on-bad-exit=1', '--cpus-per-task=32']
  assert t['command'] == ['python', '-m', 'ssl_jax.main', f'--config={CONFIG}',
                          f'--workdir={work}', '--distributed=yes', '--config.batch_size=16']
  assert os.path.samefile(t['cwd'], REPO)   # submitted from elsewhere: runs in SLURM_SUBMIT_DIR
  e = t['env']
  assert e['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'
  assert e['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert os.path.samefile(e['VIRTUAL_ENV'], VENV)
  assert e['PATH'].split(':')[0] == os.path.join(e['VIRTUAL_ENV'], 'bin')
  assert e['TFDS_DATA_DIR'] == (TFDS_DATA_DIR or '')
  assert f'job {JOB_ID} attempt 1 on 1 node(s) (8 GPU(s) each)' in r.stdout
  assert f'run complete (step {STEPS} of {STEPS}).' in r.stdout
  assert scontrol == ''


@SLOW
def test_script_leaves_gpus_to_jax_with_one_task_per_gpu_and_keeps_user_settings(tmp_path):
  work = _workdir(tmp_path / 'w', steps=(STEPS,))
  r, tasks, _ = _run_script(tmp_path, work, args=[], SLURM_NTASKS_PER_NODE='8',
                            SLURM_GPUS_ON_NODE='8', XLA_PYTHON_CLIENT_MEM_FRACTION='0.5',
                            drop=('SLURM_CPUS_PER_TASK',))
  assert r.returncode == 0, r.stderr
  e = tasks[0]['env']
  assert 'JAX_LOCAL_DEVICE_IDS' not in e   # JAX's default: GPU $SLURM_LOCALID per task
  assert e['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'
  assert tasks[0]['options'] == ['--kill-on-bad-exit=1']
  assert tasks[0]['command'][-1] == '--distributed=yes'


@SLOW
def test_script_requeues_a_run_stopped_early_with_a_new_checkpoint(tmp_path):
  """The trainer exits 0 at step 5 of an epoch-based run (2 epochs of 16 steps): requeue."""
  work = _workdir(tmp_path / 'w', total_steps=-1, total_epochs=2)
  staged = _workdir(tmp_path / 'staged', steps=(5,), total_steps=-1, total_epochs=2)
  r, _, scontrol = _run_script(
      tmp_path, work, FAKE_SRUN_MOVE=f'{staged}/checkpoints={work}/checkpoints')
  assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)
  assert scontrol == f'requeue {JOB_ID}\n'
  assert 'at checkpoint step -1' in r.stdout
  assert (f'stopped at step 5 of 32 (preemption or time-limit notice); requeueing job '
          f'{JOB_ID} to resume there.') in r.stdout


@SLOW
def test_script_does_not_requeue_a_stop_without_a_newer_checkpoint(tmp_path):
  work = _workdir(tmp_path / 'w', steps=(5,))
  r, _, scontrol = _run_script(tmp_path, work)
  assert r.returncode == 1
  assert scontrol == ''
  assert r.stderr.strip().splitlines() == [
      f'gpu_slurm.sh: the trainer exited 0 at checkpoint step 5 of {STEPS} without saving a '
      'newer one; not requeueing (submit the same command again to continue).']


@SLOW
def test_script_fails_the_job_when_the_trainer_fails(tmp_path):
  work = _workdir(tmp_path / 'w')
  r, _, scontrol = _run_script(tmp_path, work, FAKE_SRUN_RC='3')
  assert r.returncode == 3
  assert scontrol == ''
  assert r.stderr.strip().splitlines() == [
      'gpu_slurm.sh: the trainer failed (exit 3); not requeueing.']


@SLOW
@pytest.mark.parametrize('case', ['no_job', 'no_venv', 'not_checkout'])
def test_script_user_errors_are_one_line(tmp_path, case):
  env, drop = {}, ()
  if case == 'no_job':
    drop = ('SLURM_JOB_ID',)
    want = 'not inside a Slurm job; usage: sbatch'
  elif case == 'no_venv':
    env = {'SSL_JAX_VENV': str(tmp_path / 'nowhere')}
    want = f'gpu_slurm.sh: no virtualenv at {tmp_path / "nowhere"} (set SSL_JAX_VENV'
  else:
    env = {'SLURM_SUBMIT_DIR': str(tmp_path)}
    want = f'gpu_slurm.sh: {tmp_path} is not an ssl_jax checkout; submit from its root'
  r, tasks, _ = _run_script(tmp_path, str(tmp_path / 'w'), drop=drop, **env)
  assert r.returncode != 0 and not tasks
  assert len(r.stderr.strip().splitlines()) == 1 and want in r.stderr, r.stderr


@SLOW
def test_distributed_processes_and_coordinator_come_from_slurm(tmp_path):
  """Two tasks on two "nodes" (both this machine) run the trainer's own distributed start-up
  with srun's environment: process id = SLURM_PROCID, count = SLURM_NTASKS, coordinator = the
  first host of SLURM_STEP_NODELIST at 61440 + SLURM_JOB_ID % 4096, all 8 GPUs visible per
  task (JAX_LOCAL_DEVICE_IDS; JAX alone would pick GPU $SLURM_LOCALID), and a cross-process
  gather (gloo on CPU) that sees both."""
  job_id = next(j for j in range(int(JOB_ID), int(JOB_ID) + 4096) if _port_free(_jax_port(j)))
  work = _workdir(tmp_path / 'w', steps=(STEPS,))
  r, tasks, _ = _run_script(
      tmp_path, work, SLURM_JOB_ID=str(job_id), SLURM_NTASKS='2', SLURM_JOB_NUM_NODES='2',
      SLURM_NNODES='2', SLURM_JOB_NODELIST='localhost,node2', SLURM_GPUS_PER_NODE='8',
      FAKE_SRUN_EXEC=f'python {os.path.join(HERE, "dist_probe.py")}')
  assert r.returncode == 0, r.stdout + r.stderr
  assert len(tasks) == 2
  probes = [json.loads((tmp_path / 'srun_log' / f'probe_{i}.json').read_text()) for i in (0, 1)]
  for i, p in enumerate(probes):
    assert p['process_index'] == i
    assert p['process_count'] == 2
    assert p['coordinator_address'] == f'localhost:{61440 + job_id % 4096}'
    assert p['cuda_visible_devices'] == '0,1,2,3,4,5,6,7'
    assert p['gathered'] == [0, 1]
