"""A recording fake of the `gcloud` calls launch/tpu_pod.sh makes, for tests/test_tpu_pod.py.

`setup(state_dir, ...)` writes a `gcloud` shim (first on the returned PATH) and the initial
state. Each call appends its argv to `state_dir/calls.jsonl` and works on `state_dir/state.json`:

* `compute tpus queued-resources create|describe|delete` and `compute tpus tpu-vm
  create|describe|delete` simulate one slice. A queued resource reads WAITING_FOR_RESOURCES for
  its first `wait_polls` describes, then ACTIVE with its node READY (or FAILED with
  `qr_fail=True`). A slice of type vX-N has max(1, N // 8) workers.
* `tpu-vm scp SRC NAME:DEST` copies SRC into every worker's home; `tpu-vm ssh --command CMD`
  runs `bash -c CMD` locally in each selected worker's home (a fresh directory per created
  slice), with PATH = stub `python3`/`python3.10`/`curl`/`hostname` (fake_python.py) + this
  shim + /usr/bin:/bin and FAKE_GCS_ROOT = the fake bucket root (for the stub trainer), in a new
  process group that is SIGKILLed when the command returns or this fake gcloud is killed
  (SIGTERM/SIGHUP/SIGINT): the session's end. The workers' `python3` claims Python
  `worker_python` ('' = the real interpreter's version; '3.10.12' = the default TPU VM image's),
  `python3.10` claims 3.10.12; `worker_pip=False`: no pip for python3.
  The metadata server (stub `curl`) answers `agent-worker-number` with the worker's index.
  With `drop_stream_after_s`, the first log stream (`... _logs`) is cut after that many seconds
  (ssh exit 255), as a dropped connection would.
* `events`: [{'at_step': s, 'kind': 'sigterm' | 'preempt' | 'hold'}]. The stub trainer pauses
  at step s (after its checkpoint) until the next describe fires the event: 'sigterm' sends
  SIGTERM to each worker's detached run (its process group, ~/ssl_jax_run/pid), as a maintenance
  notice would; 'preempt' SIGKILLs them, deletes the workers' homes and the node, and marks the
  queued resource SUSPENDED (a spot preemption). 'hold' waits for the test to `release(step)`.
  With 'on': 'qr-describe' | 'vm-describe', only that describe fires it (unset: either); e.g. a
  preemption between the launcher's two reads of a spot slice: the queued resource ACTIVE, then
  its node not found.
  'fail' / 'kill9' are done by the stub trainer itself (see fake_python.py).
* `storage cp SRC DST` (either side gs://), `storage cat URL...`, `storage ls [-r] [URL...]`
  work on a local directory standing in for Cloud Storage: `gs://B/P` is `state_dir/gcs/B/P`.
  `gcs_fail`: substrings; a `cp` whose SRC or DST holds one fails (as a network error would).
  A `cp` stages its copy outside the bucket: one killed midway leaves no object (as an upload).

Each call is recorded with the worker (`FAKE_WORKER_ID`) it came from (None: the launcher).
Never calls the real gcloud.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def setup(state_dir: str, *, jax_version: str, total_steps: int = 6, step_s: float = 0.05,
          summary: str = '', events=(), wait_polls: int = 1, qr_fail: bool = False,
          drop_stream_after_s: float | None = None, worker_python: str = '',
          worker_pip: bool = True, trainer_outcome: bool = True, stop_s: float = 0,
          gcs_fail=()) -> dict:
  """Creates the fake's state and shims; returns the environment for the launcher."""
  os.makedirs(os.path.join(state_dir, 'bin'), exist_ok=True)
  os.makedirs(os.path.join(state_dir, 'worker_bin'), exist_ok=True)
  def shim(path, script, version=None):
    with open(path, 'w') as f:
      f.write('#!/bin/sh\n' + ('' if version is None else
                               f'FAKE_PY_VERSION={version} FAKE_ARGV0="$0" ') +
              f'exec {sys.executable} -S {os.path.join(HERE, script)} "$@"\n')
    os.chmod(path, 0o755)
  shim(os.path.join(state_dir, 'bin', 'gcloud'), 'fake_gcloud.py')
  for name, version in (('python3', worker_python), ('python3.10', '3.10.12'), ('curl', ''),
                        ('hostname', '')):
    shim(os.path.join(state_dir, 'worker_bin', name), 'fake_python.py', version)
  os.makedirs(os.path.join(state_dir, 'gcs'), exist_ok=True)
  _save(state_dir, {
      'qr': None, 'node': None, 'generation': 0, 'wait_polls': wait_polls,
      'qr_fail': qr_fail, 'events': [dict(e, fired=False) for e in events],
      'drop_stream_after_s': drop_stream_after_s, 'total_steps': total_steps,
      'step_s': step_s, 'summary': summary, 'jax_version': jax_version,
      'worker_pip': worker_pip, 'trainer_outcome': trainer_outcome, 'stop_s': stop_s,
      'gcs_fail': list(gcs_fail)})
  env = {k: v for k, v in os.environ.items() if not k.startswith(('FAKE_', 'TPU_'))}
  env.update(FAKE_GCLOUD_DIR=state_dir,
             PATH=os.path.join(state_dir, 'bin') + os.pathsep + os.environ['PATH'])
  return env


def calls(state_dir: str) -> list[dict]:
  with open(os.path.join(state_dir, 'calls.jsonl')) as f:
    return [json.loads(line) for line in f]


def gcs(state_dir: str, url: str) -> str:
  """The local path standing in for gs://B/P."""
  assert url.startswith('gs://'), url
  return os.path.join(state_dir, 'gcs', url[len('gs://'):])


def records(state_dir: str, name: str) -> list[dict]:
  """What the stubs recorded: 'pip' and 'uv' calls, 'trainer' starts, 'trainer_exit's."""
  path = os.path.join(state_dir, f'{name}.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def release(state_dir: str, step: int) -> None:
  """Lets the stub trainer go on past a 'hold' event at `step`."""
  open(os.path.join(state_dir, f'release_{step}'), 'w').close()


def worker_homes(state_dir: str) -> list[str]:
  node = load(state_dir)['node']
  return list(node['homes']) if node else []


def kill_runs(state_dir: str, sig=signal.SIGKILL) -> None:
  """Signals every detached run of every worker home that still exists (test clean-up too)."""
  root = os.path.join(state_dir, 'homes')
  for home in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    _signal_run(os.path.join(root, home), sig)


# ---------------------------------------------------------------------------------------------

def load(state_dir: str) -> dict:
  with open(os.path.join(state_dir, 'state.json')) as f:
    return json.load(f)


def _save(state_dir: str, state: dict) -> None:
  tmp = os.path.join(state_dir, 'state.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, os.path.join(state_dir, 'state.json'))


class _Locked:
  """The state, read and written under an exclusive lock."""

  def __init__(self, state_dir):
    self.dir = state_dir

  def __enter__(self):
    self.f = open(os.path.join(self.dir, 'state.lock'), 'w')
    fcntl.flock(self.f, fcntl.LOCK_EX)
    self.state = load(self.dir)
    return self.state

  def __exit__(self, *exc):
    # Saved also when the call answers with an error (_die: SystemExit): what happened before
    # the answer stays done. E.g. a describe that fires a preemption, then finds no node: the
    # preemption has happened (workers killed, their homes gone), so the node is gone and the
    # queued resource SUSPENDED for the next call too, not back as it was before it.
    if exc[0] is None or issubclass(exc[0], SystemExit):
      _save(self.dir, self.state)
    self.f.close()


def _signal_run(home: str, sig) -> bool:
  try:
    with open(os.path.join(home, 'ssl_jax_run', 'pid')) as f:
      pgid = int(f.read())
  except (OSError, ValueError):
    return False
  try:
    os.killpg(pgid, sig)  # the detached run is its own process group (setsid)
  except ProcessLookupError:
    return False
  return True


def _hosts(accel_type: str) -> int:
  return max(1, int(accel_type.rsplit('-', 1)[1]) // 8)


def _die(msg: str, code: int = 1):
  print(f'ERROR: {msg}', file=sys.stderr)
  sys.exit(code)


def _parse(args):
  """Positional arguments and --flags (`--k v`, `--k=v`, boolean `--k`)."""
  with_value = {'--zone', '--node-id', '--accelerator-type', '--runtime-version', '--version',
                '--format', '--worker', '--command'}
  pos, flags, i = [], {}, 0
  while i < len(args):
    a = args[i]
    if a.startswith('--'):
      k, eq, v = a.partition('=')
      if not eq and k in with_value:
        i += 1
        v = args[i]
      flags[k] = v if (eq or k in with_value) else True
    else:
      pos.append(a)
    i += 1
  return pos, flags


def _new_node(st, state_dir, name, zone, accel, version):
  st['generation'] += 1
  homes = []
  for w in range(_hosts(accel)):
    home = os.path.join(state_dir, 'homes', f'g{st["generation"]}-w{w}')
    os.makedirs(home)
    homes.append(home)
  st['node'] = {'name': name, 'zone': zone, 'type': accel, 'version': version,
                'state': 'READY', 'homes': homes, 'generation': st['generation']}


def _drop_node(st):
  if st['node']:
    for home in st['node']['homes']:
      _signal_run(home, signal.SIGKILL)
      shutil.rmtree(home, ignore_errors=True)
  st['node'] = None


def _fire_events(st, state_dir, call):
  """Fires the first pending event whose step the trainer has reached, if `call` (the describe
  being answered: 'qr-describe' or 'vm-describe') is one it may fire on (its 'on'; any if unset)."""
  for ev in st['events']:
    if ev['fired'] or ev['kind'] == 'hold':  # 'hold': released by the test, not by gcloud
      continue
    if not os.path.exists(os.path.join(state_dir, f'reached_{ev["at_step"]}')):
      return
    if ev.get('on', call) != call:  # later events wait for this one
      return
    ev['fired'] = True
    if ev['kind'] == 'sigterm':
      for home in st['node']['homes']:
        _signal_run(home, signal.SIGTERM)
    elif ev['kind'] == 'preempt':
      _drop_node(st)
      if st['qr']:
        st['qr']['state'] = 'SUSPENDED'
    return


def _check_zone(obj, name, zone, what):
  if obj is None or obj['name'] != name or obj['zone'] != zone:
    _die(f'(gcloud.compute.tpus.{what}) NOT_FOUND: Resource '
         f"'projects/fake/locations/{zone}/{what}/{name}' was not found")


def _format(obj, fmt):
  if fmt == 'value(state.state)':
    print(obj['state'])
  elif fmt == 'value(state)':
    print(obj['state'])
  elif fmt is None:
    print(json.dumps(obj, indent=1))
  else:
    _die(f'fake gcloud: unsupported --format={fmt}', 2)


def _queued_resources(verb, pos, flags, state_dir):
  name, zone = pos[0], flags.get('--zone')
  with _Locked(state_dir) as st:
    if verb == 'create':
      if st['qr'] is not None or st['node'] is not None:
        _die(f'ALREADY_EXISTS: {name}')
      if flags.get('--node-id') != name or not flags.get('--spot'):
        _die('fake gcloud: expected --node-id NAME --spot', 2)
      st['qr'] = {'name': name, 'zone': zone, 'type': flags['--accelerator-type'],
                  'version': flags['--runtime-version'], 'state': 'WAITING_FOR_RESOURCES',
                  'polls': 0}
      print(f'Create request issued for: [{name}]')
    elif verb == 'describe':
      _fire_events(st, state_dir, 'qr-describe')
      qr = st['qr']
      _check_zone(qr, name, zone, 'queuedResources')
      if qr['state'] == 'WAITING_FOR_RESOURCES':
        qr['polls'] += 1
        if qr['polls'] > st['wait_polls']:
          if st['qr_fail']:
            qr['state'] = 'FAILED'
          else:
            qr['state'] = 'ACTIVE'
            _new_node(st, state_dir, name, zone, qr['type'], qr['version'])
      _format({'name': name, 'state': qr['state']} if flags.get('--format') is None else
              {'state': qr['state']}, flags.get('--format'))
    elif verb == 'delete':
      _check_zone(st['qr'], name, zone, 'queuedResources')
      if not (flags.get('--force') and flags.get('--quiet')):
        _die('fake gcloud: expected --force --quiet', 2)
      _drop_node(st)
      st['qr'] = None
    else:
      _die(f'fake gcloud: unsupported queued-resources {verb}', 2)


def _run_on_workers(st_node, workers, cmd, state_dir, drop_after):
  """`bash -c cmd` in each worker's home, all at once (as gcloud does for --worker=all)."""
  procs = []

  def hang_up(signum, _):
    # This client killed (the launcher ending its log stream, Ctrl-C): the connection is gone, so
    # the remote commands end too (as over a real connection, where a command that outlived it
    # could no longer write here). Without this they would go on writing to the launcher's
    # stdout, inherited from this process: a second, stale stream of the same log.
    for _, p in procs:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    os._exit(128 + signum)

  for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(signum, hang_up)
  for w in workers:
    home = st_node['homes'][w]
    host = f'{st_node["name"]}-g{st_node["generation"]}-w{w}'
    env = {'HOME': home, 'LANG': 'C.UTF-8', 'FAKE_GCLOUD_DIR': state_dir,
           'FAKE_WORKER_ID': str(w), 'FAKE_HOSTNAME': host,
           'FAKE_GCS_ROOT': os.path.join(state_dir, 'gcs'),
           'FAKE_SSH_ID': str(os.getpid()), 'FAKE_NUM_WORKERS': str(len(st_node['homes'])),
           'PATH': os.pathsep.join([os.path.join(state_dir, 'worker_bin'),
                                    os.path.join(state_dir, 'bin'), '/usr/bin', '/bin'])}
    procs.append((host, subprocess.Popen(['bash', '-c', cmd], cwd=home, env=env,
                                         start_new_session=True)))
  rc = 0
  for host, p in procs:
    try:
      code = p.wait(timeout=drop_after)
    except subprocess.TimeoutExpired:  # a dropped connection: the remote command is cut off
      p.kill()
      p.wait()
      print(f'Connection to {host} closed by remote host.', file=sys.stderr)
      code = 255
    # The session ends: whatever is left in the command's process group dies with it, so only a
    # run that left it (setsid) survives.
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    rc = rc or code
  return rc


def _tpu_vm(verb, pos, flags, state_dir):
  if verb in ('create', 'describe', 'delete'):
    name, zone = pos[0], flags.get('--zone')
    with _Locked(state_dir) as st:
      if verb == 'create':
        if st['node'] is not None:
          _die(f'ALREADY_EXISTS: {name}')
        _new_node(st, state_dir, name, zone, flags['--accelerator-type'], flags['--version'])
      elif verb == 'describe':
        _fire_events(st, state_dir, 'vm-describe')
        _check_zone(st['node'], name, zone, 'nodes')
        _format(st['node'], flags.get('--format'))
      else:
        _check_zone(st['node'], name, zone, 'nodes')
        _drop_node(st)
    return 0
  st = load(state_dir)
  node = st['node']
  if verb == 'scp':
    src, dest = pos
    name, _, rel = dest.partition(':')
    _check_zone(node, name, flags.get('--zone'), 'nodes')
    if flags.get('--worker') != 'all' or rel.startswith('/'):
      _die('fake gcloud: expected --worker=all and a path relative to the home', 2)
    for home in node['homes']:
      shutil.copy(src, os.path.join(home, rel))
    return 0
  if verb == 'ssh':
    _check_zone(node, pos[0], flags.get('--zone'), 'nodes')
    w = flags.get('--worker')
    workers = range(len(node['homes'])) if w == 'all' else [int(w)]
    cmd = flags['--command']
    drop = None
    if cmd.rstrip().endswith('_logs') and st['drop_stream_after_s']:
      with _Locked(state_dir) as st2:
        drop, st2['drop_stream_after_s'] = st2['drop_stream_after_s'], None
    return _run_on_workers(node, workers, cmd, state_dir, drop)
  _die(f'fake gcloud: unsupported tpu-vm {verb}', 2)


def _storage(verb, args, state_dir):
  """`gcloud storage cp|cat|ls` on state_dir/gcs (gs://B/P -> state_dir/gcs/B/P)."""
  root = os.path.join(state_dir, 'gcs')
  pos = [a for a in args if not a.startswith('-')]
  what = f'(gcloud.storage.{verb})'

  def local(url):
    if not url.startswith('gs://'):
      return None
    path = os.path.normpath(os.path.join(root, url[len('gs://'):]))
    if not (path + os.sep).startswith(root + os.sep):
      _die(f'{what} fake gcloud: bad URL {url}', 2)
    return path

  if verb == 'cp':
    if len(pos) != 2:
      _die(f'{what} fake gcloud: expected cp SRC DST', 2)
    src, dst = pos
    for bad in load(state_dir).get('gcs_fail', []):
      if bad in src or bad in dst:
        _die(f'{what} HTTPError 503: fake failure copying {src} to {dst}')
    s, d = local(src) or src, local(dst) or dst
    if not os.path.isfile(s):
      _die(f'{what} The following URLs matched no objects or files:\n-{src}')
    if dst.endswith('/'):
      d = os.path.join(d, os.path.basename(s))
    os.makedirs(os.path.dirname(d), exist_ok=True)
    # Staged outside the bucket: like a real upload, a cp killed midway (the workers' log copier
    # is in the run's process group, which a stop or a preemption signals) leaves no object, not
    # even a partial or temporary one.
    staging = os.path.join(state_dir, 'gcs_staging')
    os.makedirs(staging, exist_ok=True)
    tmp = os.path.join(staging, f'{os.path.basename(d)}.{os.getpid()}')
    shutil.copyfile(s, tmp)
    os.replace(tmp, d)
    print(f'Copying {src} to {dst}', file=sys.stderr)
  elif verb == 'cat':
    if not pos:
      _die(f'{what} fake gcloud: expected cat URL...', 2)
    for url in pos:
      p = local(url)
      if p is None or not os.path.isfile(p):
        _die(f'{what} The following URLs matched no objects or files:\n-{url}')
      with open(p, 'rb') as f:
        sys.stdout.buffer.write(f.read())
  elif verb == 'ls':
    recursive = '-r' in args or '--recursive' in args
    out = []
    for url in pos or ['gs://']:
      p = root if url == 'gs://' else local(url)
      if p is None or not os.path.exists(p):
        _die(f'{what} One or more URLs matched no objects.')
      prefix = url if url.endswith('/') else url + '/'
      if os.path.isfile(p):
        out.append(url)
      elif recursive:
        out += sorted(prefix + os.path.relpath(os.path.join(d, name), p)
                      for d, _, files in os.walk(p) for name in files)
      else:
        out += [prefix + name + ('/' if os.path.isdir(os.path.join(p, name)) else '')
                for name in sorted(os.listdir(p))]
    print('\n'.join(out))
  else:
    _die(f'fake gcloud: unsupported storage {verb}', 2)


def main(argv):
  state_dir = os.environ['FAKE_GCLOUD_DIR']
  with open(os.path.join(state_dir, 'calls.jsonl'), 'a') as f:
    f.write(json.dumps({'t': time.time(), 'argv': argv,
                        'worker': os.environ.get('FAKE_WORKER_ID')}) + '\n')
  if argv[:1] == ['storage'] and len(argv) >= 2:
    _storage(argv[1], argv[2:], state_dir)
    return 0
  if argv[:2] != ['compute', 'tpus'] or len(argv) < 5:
    _die(f'fake gcloud: unsupported call {argv}', 2)
  group, verb = argv[2], argv[3]
  pos, flags = _parse(argv[4:])
  if group == 'queued-resources':
    _queued_resources(verb, pos, flags, state_dir)
    return 0
  if group == 'tpu-vm':
    return _tpu_vm(verb, pos, flags, state_dir) or 0
  _die(f'fake gcloud: unsupported group {group}', 2)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
