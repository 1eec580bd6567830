"""Stub `python3`, `python`, `pip` and `hostname` of a fake TPU worker (see fake_gcloud.py).

* `python3 -m venv DIR`: DIR/bin/{python,python3,pip} (this stub) and DIR/bin/activate.
* `pip install ...`: recorded in FAKE_GCLOUD_DIR/pip.jsonl; `-r requirements.txt` (which must
  exist) installs jax at the fake's `jax_version`; `jax[tpu]==V` sets it to V.
* `python -c '...import jax...'` prints the venv's jax version; other `-c` code runs in this
  (real) interpreter (the launcher's Python version check).
* `python -m ssl_jax.main ...`: a stub trainer. Recorded in trainer.jsonl; resumes from the
  newest `checkpoints/<step>` in the (gs:// -> FAKE_GCLOUD_DIR/gcs) workdir, then waits for
  the other workers started by the same ssh call (as jax.distributed does); process 0
  (worker 0) writes one checkpoint a step and prints step lines. At the step of a pending
  event it writes FAKE_GCLOUD_DIR/reached_<step> and waits to be signalled (or released). SIGTERM: prints
  the trainer's stop line and exits 0. At the end process 0 prints the fake's `summary` (the
  real trainer's completion block) and every process exits 0.
"""
import json
import os
import signal
import sys
import time

STATE_DIR = os.environ['FAKE_GCLOUD_DIR']
HERE = os.path.dirname(os.path.abspath(__file__))


def _state():
  with open(os.path.join(STATE_DIR, 'state.json')) as f:
    return json.load(f)


def _record(name, entry):
  with open(os.path.join(STATE_DIR, f'{name}.jsonl'), 'a') as f:
    f.write(json.dumps(entry) + '\n')


def _venv():
  bin_dir = os.path.dirname(os.path.abspath(os.environ['FAKE_ARGV0']))
  return os.path.dirname(bin_dir) if os.path.exists(os.path.join(bin_dir, 'activate')) else None


def _make_venv(path):
  bin_dir = os.path.join(os.path.abspath(path), 'bin')
  os.makedirs(bin_dir, exist_ok=True)
  with open(os.path.join(os.environ['FAKE_GCLOUD_DIR'], 'worker_bin', 'python3')) as f:
    shim = f.read()
  for name in ('python', 'python3', 'pip'):
    with open(os.path.join(bin_dir, name), 'w') as f:
      f.write(shim)
    os.chmod(os.path.join(bin_dir, name), 0o755)
  with open(os.path.join(bin_dir, 'activate'), 'w') as f:
    f.write(f'export VIRTUAL_ENV={os.path.dirname(bin_dir)}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')


def _pip(args):
  venv = _venv()
  _record('pip', {'worker': os.environ.get('FAKE_WORKER_ID'), 'venv': venv, 'cwd': os.getcwd(),
                  'argv': args})
  if venv is None:
    sys.exit('fake pip: not in a venv')
  version_file = os.path.join(venv, 'jax_version')
  if args[:1] == ['install'] and '-r' in args:
    req = args[args.index('-r') + 1]
    if not os.path.exists(req):
      sys.exit(f'fake pip: no {req} in {os.getcwd()}')
    with open(version_file, 'w') as f:
      f.write(_state()['jax_version'])
  for a in args:
    if a.startswith('jax[tpu]=='):
      with open(version_file, 'w') as f:
        f.write(a.split('==', 1)[1])


def _python(args):
  if args[:2] == ['-m', 'venv']:
    _make_venv(args[2])
  elif args[:1] == ['-c'] and 'import jax' in args[1]:
    venv = _venv()
    path = os.path.join(venv or '/nonexistent', 'jax_version')
    if not os.path.exists(path):
      sys.exit("ModuleNotFoundError: No module named 'jax'")
    with open(path) as f:
      print(f.read())
  elif args[:1] == ['-c']:  # e.g. the launcher's Python version check: this interpreter's answer
    sys.argv = ['-c'] + args[2:]
    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
  elif args[:2] == ['-m', 'ssl_jax.main']:
    _trainer(args[2:])
  else:
    sys.exit(f'fake python: unsupported {args}')


def _trainer(args):
  st = _state()
  flags = dict(a.split('=', 1) for a in args if '=' in a)
  workdir = flags['--workdir']
  assert workdir.startswith('gs://'), workdir
  local = os.path.join(STATE_DIR, 'gcs', workdir[len('gs://'):])
  ckpts = os.path.join(local, 'checkpoints')
  os.makedirs(ckpts, exist_ok=True)
  start = max([int(s) for s in os.listdir(ckpts)], default=0)
  worker = os.environ['FAKE_WORKER_ID']
  first = worker == '0'
  _record('trainer', {'worker': worker, 'argv': args, 'cwd': os.getcwd(), 'start_step': start,
                      'tfds': os.environ.get('TFDS_DATA_DIR'), 'pgid': os.getpgid(0),
                      'sid': os.getsid(0)})
  stop = []
  signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
  # Like jax.distributed.initialize: wait for the processes started by the same ssh call, so
  # every process has read the resume step before process 0 writes a checkpoint.
  barrier = os.path.join(STATE_DIR, 'barrier', os.environ['FAKE_SSH_ID'])
  os.makedirs(barrier, exist_ok=True)
  open(os.path.join(barrier, worker), 'w').close()
  deadline = time.time() + 30
  while len(os.listdir(barrier)) < int(os.environ['FAKE_NUM_WORKERS']):
    if time.time() > deadline:
      sys.exit('fake trainer: not every process started')
    time.sleep(0.02)
  total = st['total_steps']
  pending = {e['at_step']: e['kind'] for e in st['events'] if not e['fired']}
  if first:
    print(f'fake trainer | {workdir} | {total} steps | resuming from step {start}', flush=True)
  for step in range(start + 1, total + 1):
    time.sleep(st['step_s'])
    if first:
      os.makedirs(os.path.join(ckpts, str(step)), exist_ok=True)
      print(f'step {step}/{total} | loss {1.0 / step:.4f}', flush=True)
    if step in pending:
      if first:
        open(os.path.join(STATE_DIR, f'reached_{step}'), 'w').close()
      release = os.path.join(STATE_DIR, f'release_{step}')
      deadline = time.time() + 30
      while not stop and not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.02)
      if not stop and not os.path.exists(release):
        sys.exit(f'fake trainer: the {pending[step]} event at step {step} never came')
    if stop:
      if first:
        print(f'Stopping at step {step} (preemption notice (SIGTERM)): saving a checkpoint and '
              'exiting.', flush=True)
      sys.exit(0)
  if first:
    print(f'Final after {total} steps | kNN top-1 ...', flush=True)
    print(st['summary'], flush=True)


def main():
  name = os.path.basename(os.environ.get('FAKE_ARGV0', 'python3'))
  if name == 'hostname':
    print(os.environ.get('FAKE_HOSTNAME', 'fake-worker'))
  elif name == 'pip':
    _pip(sys.argv[1:])
  else:
    _python(sys.argv[1:])


if __name__ == '__main__':
  main()
