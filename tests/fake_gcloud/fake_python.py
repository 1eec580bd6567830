"""Stub `python3`, `python`, `pip`, `uv`, `curl` and `hostname` of a fake TPU worker (see fake_gcloud.py).

Each shim sets FAKE_ARGV0 (its own path: the tool, and for a venv's python which venv) and
FAKE_PY_VERSION (the Python version this interpreter claims to be; empty: the real one's).

* `python3 --version`, and `-c` code (run by this real interpreter, but `import sys` sees the
  claimed version_info): the launcher's version checks.
* `python3 -m venv DIR`: DIR/bin/{python,python3,pip} (this stub, same version) and DIR/bin/activate.
* `pip install ...` / `python -m pip install ...`: recorded in FAKE_GCLOUD_DIR/pip.jsonl; in a
  venv, `-r requirements.txt` (which must exist) installs jax at the fake's `jax_version` and
  `jax[tpu]==V` sets it to V. Outside a venv only `install --user ... uv` is accepted: it writes
  ~/.local/bin/uv (this stub). `worker_pip=False` in the fake: the system python3 has no pip.
* `uv python install 3.11` / `uv venv [--seed] --python 3.11 DIR`: recorded in uv.jsonl; the
  second needs the first (a "managed" 3.11 under ~/.local/share/uv) and makes DIR a venv whose
  python claims 3.11.
* `curl ... .../computeMetadata/v1/instance/attributes/agent-worker-number`: the worker's number
  (the TPU VM metadata server's answer); any other URL fails.
* `python -c '...import jax...'` prints the venv's jax version.
* `python -m ssl_jax.main ...`: a stub trainer. Recorded in trainer.jsonl; resumes from the
  newest `checkpoints/<step>` in the workdir (gs://B/P -> $FAKE_GCS_ROOT/B/P, the fake bucket),
  then waits for the other workers started by the same ssh call (as jax.distributed does);
  process 0 (worker 0) writes one checkpoint a step and prints step lines. At the step of a
  pending event: 'sigterm'/'preempt'/'hold': it writes FAKE_GCLOUD_DIR/reached_<step> and waits
  to be signalled (or released); 'fail': process 0 writes a failed outcome.json and every process
  exits 1; 'kill9': every process SIGKILLs itself (no outcome.json). SIGTERM: prints the
  trainer's stop line, waits `stop_s` (its checkpoint), writes a stopped outcome.json, exits 0.
  At the end process 0 prints the fake's `summary` (the real trainer's completion block), writes
  a done outcome.json, and every process exits 0. outcome.json is written by process 0 the way
  ssl_jax.train.write_outcome does (launch_id from SSL_JAX_LAUNCH_ID), unless the fake has
  `trainer_outcome=False` (a trainer that never writes one).
"""
import builtins
import collections
import datetime
import json
import os
import signal
import sys
import time

STATE_DIR = os.environ['FAKE_GCLOUD_DIR']
HERE = os.path.dirname(os.path.abspath(__file__))
_VersionInfo = collections.namedtuple('version_info', 'major minor micro releaselevel serial')


def _state():
  with open(os.path.join(STATE_DIR, 'state.json')) as f:
    return json.load(f)


def _record(name, entry):
  with open(os.path.join(STATE_DIR, f'{name}.jsonl'), 'a') as f:
    f.write(json.dumps(dict(entry, t=time.time())) + '\n')


def _version():
  v = os.environ.get('FAKE_PY_VERSION') or '%d.%d.%d' % sys.version_info[:3]
  return tuple(int(x) for x in v.split('.'))


def write_shim(path, version=''):
  """A stub tool at `path` (its name picks the tool) claiming Python `version` ('' = real)."""
  with open(path, 'w') as f:
    f.write(f'#!/bin/sh\nFAKE_PY_VERSION={version} FAKE_ARGV0="$0" '
            f'exec {sys.executable} -S {os.path.join(HERE, "fake_python.py")} "$@"\n')
  os.chmod(path, 0o755)


def _venv():
  bin_dir = os.path.dirname(os.path.abspath(os.environ['FAKE_ARGV0']))
  return os.path.dirname(bin_dir) if os.path.exists(os.path.join(bin_dir, 'activate')) else None


def _make_venv(path, version):
  bin_dir = os.path.join(os.path.abspath(path), 'bin')
  os.makedirs(bin_dir, exist_ok=True)
  for name in ('python', 'python3', 'pip'):
    write_shim(os.path.join(bin_dir, name), version)
  with open(os.path.join(bin_dir, 'activate'), 'w') as f:
    f.write(f'export VIRTUAL_ENV={os.path.dirname(bin_dir)}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')


def _pip(args, via):
  venv = _venv()
  _record('pip', {'worker': os.environ.get('FAKE_WORKER_ID'), 'venv': venv, 'cwd': os.getcwd(),
                  'via': via, 'argv': args})
  if venv is None:
    if args[:1] == ['install'] and '--user' in args and 'uv' in args:
      bin_dir = os.path.join(os.environ['HOME'], '.local', 'bin')
      os.makedirs(bin_dir, exist_ok=True)
      write_shim(os.path.join(bin_dir, 'uv'))
      return
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


def _uv(args):
  _record('uv', {'worker': os.environ.get('FAKE_WORKER_ID'), 'cwd': os.getcwd(), 'argv': args})
  managed = os.path.join(os.environ['HOME'], '.local', 'share', 'uv', 'python', 'cpython-3.11')
  if args == ['python', 'install', '3.11']:
    os.makedirs(managed, exist_ok=True)
  elif args[:1] == ['venv'] and '--python' in args:
    want = args[args.index('--python') + 1]
    if want != '3.11' or not os.path.isdir(managed):
      sys.exit(f'fake uv: no managed Python {want} (run `uv python install {want}` first)')
    dest = [a for i, a in enumerate(args[1:], 1)
            if not a.startswith('-') and args[i - 1] != '--python']
    _make_venv(dest[0], '3.11.11')
    if '--seed' not in args:  # like uv: no pip in the venv unless seeded
      os.remove(os.path.join(dest[0], 'bin', 'pip'))
  else:
    sys.exit(f'fake uv: unsupported {args}')


def _curl(args):
  url = [a for a in args if a.startswith('http')]
  if url and url[0].endswith('/computeMetadata/v1/instance/attributes/agent-worker-number') and \
     'Metadata-Flavor: Google' in args:
    print(os.environ['FAKE_WORKER_ID'], end='')
    return
  sys.exit(22)


def _exec_code(code, argv):
  """`-c code`: run by this interpreter, with `import sys` seeing the claimed version."""
  v = _version()

  class _Sys:
    version_info = _VersionInfo(*v, 'final', 0)
    version = '.'.join(map(str, v))

    def __getattr__(self, k):
      return getattr(sys, k)

  fake_sys = _Sys()

  def imp(name, *a, **kw):
    return fake_sys if name == 'sys' else builtins.__import__(name, *a, **kw)

  sys.argv = ['-c'] + argv
  exec(compile(code, '<string>', 'exec'),
       {'__name__': '__main__', '__builtins__': dict(vars(builtins), __import__=imp)})


def _python(args):
  if args == ['--version']:
    print('Python ' + '.'.join(map(str, _version())))
  elif args[:2] == ['-m', 'venv']:
    _make_venv(args[2], os.environ.get('FAKE_PY_VERSION', ''))
  elif args[:2] == ['-m', 'pip']:
    if _venv() is None and not _state().get('worker_pip', True):
      sys.exit(f'{os.environ["FAKE_ARGV0"]}: No module named pip')
    if args[2:] == ['--version']:  # not recorded
      print('pip 22.0.2 (fake)')
      return
    _pip(args[2:], 'python -m pip')
  elif args[:1] == ['-c'] and 'import jax' in args[1]:
    venv = _venv()
    path = os.path.join(venv or '/nonexistent', 'jax_version')
    if not os.path.exists(path):
      sys.exit("ModuleNotFoundError: No module named 'jax'")
    with open(path) as f:
      print(f.read())
  elif args[:1] == ['-c']:  # e.g. the launcher's Python version check, outcome.json handling
    _exec_code(args[1], args[2:])
  elif args[:2] == ['-m', 'ssl_jax.main']:
    _trainer(args[2:])
  else:
    sys.exit(f'fake python: unsupported {args}')


def _write_outcome(st, local, status, code, line, step):
  if not st.get('trainer_outcome', True):
    return
  tmp = os.path.join(local, '.outcome.json.tmp')
  with open(tmp, 'w') as f:
    json.dump({'status': status, 'exit_code': code, 'final_line': line, 'step': step,
               'launch_id': os.environ.get('SSL_JAX_LAUNCH_ID') or None,
               'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
              f)
  os.replace(tmp, os.path.join(local, 'outcome.json'))


def _trainer(args):
  st = _state()
  flags = dict(a.split('=', 1) for a in args if '=' in a)
  workdir = flags['--workdir']
  assert workdir.startswith('gs://'), workdir
  local = os.path.join(os.environ['FAKE_GCS_ROOT'], workdir[len('gs://'):])
  ckpts = os.path.join(local, 'checkpoints')
  os.makedirs(ckpts, exist_ok=True)
  start = max([int(s) for s in os.listdir(ckpts)], default=0)
  worker = os.environ['FAKE_WORKER_ID']
  first = worker == '0'
  _record('trainer', {'worker': worker, 'argv': args, 'cwd': os.getcwd(), 'start_step': start,
                      'tfds': os.environ.get('TFDS_DATA_DIR'), 'pgid': os.getpgid(0),
                      'sid': os.getsid(0), 'pid': os.getpid(),
                      'launch_id': os.environ.get('SSL_JAX_LAUNCH_ID')})
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
  line = ''
  for step in range(start + 1, total + 1):
    time.sleep(st['step_s'])
    if first:
      os.makedirs(os.path.join(ckpts, str(step)), exist_ok=True)
      line = f'step {step}/{total} | loss {1.0 / step:.4f}'
      print(line, flush=True)
    kind = pending.get(step)
    if kind == 'kill9':
      os.kill(os.getpid(), signal.SIGKILL)
    if kind == 'fail':
      if first:
        line = f'RuntimeError: fake failure at step {step}'
        print('Traceback (most recent call last):\n  ...\n' + line, flush=True)
        _write_outcome(st, local, 'failed', 1, line, None)
      sys.exit(1)
    if kind is not None:
      if first:
        open(os.path.join(STATE_DIR, f'reached_{step}'), 'w').close()
      release = os.path.join(STATE_DIR, f'release_{step}')
      deadline = time.time() + 30
      while not stop and not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.02)
      if not stop and not os.path.exists(release):
        sys.exit(f'fake trainer: the {kind} event at step {step} never came')
    if stop:
      if first:
        line = (f'Stopping at step {step} (preemption notice (SIGTERM)): saving a checkpoint '
                'and exiting.')
        print(line, flush=True)
      time.sleep(st.get('stop_s', 0))
      if first:
        _write_outcome(st, local, 'stopped', 0, line, step)
      _record('trainer_exit', {'worker': worker, 'status': 'stopped'})
      sys.exit(0)
  if first:
    line = f'Final after {total} steps | kNN top-1 ...'
    print(line, flush=True)
    print(st['summary'], flush=True)
    _write_outcome(st, local, 'done', 0, line, total)
  _record('trainer_exit', {'worker': worker, 'status': 'done'})


def main():
  name = os.path.basename(os.environ.get('FAKE_ARGV0', 'python3'))
  if name == 'hostname':
    print(os.environ.get('FAKE_HOSTNAME', 'fake-worker'))
  elif name == 'pip':
    _pip(sys.argv[1:], 'pip')
  elif name == 'uv':
    _uv(sys.argv[1:])
  elif name == 'curl':
    _curl(sys.argv[1:])
  else:
    _python(sys.argv[1:])


if __name__ == '__main__':
  main()
