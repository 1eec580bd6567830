"""Runs on Cloud Storage: a real local Cloud Storage server (tests/gcs_emulator.py), the CLI as a
user types it, ``--workdir=gs://...``.

What reaches the emulator, and how: every file ssl_jax writes itself (config.json, outcome.json,
score plots, results.json, exports, the damaged-checkpoint move) goes through ``ssl_jax.paths``
(etils.epath -> gcsfs, endpoint ``STORAGE_EMULATOR_HOST``); Orbax's checkpoints through epath
and tensorstore (``TENSORSTORE_GCS_HTTP_URL``). Two third-party writers use their own C++ file
systems, which have no endpoint setting (TensorFlow's TensorBoard event writer, the JAX
profiler): they write into a local staging folder under the system temp dir
(``paths.Mirror``) that ssl_jax uploads through the same path layer. So the events files and
the profile traces in the bucket are the ones a real run uploads, by the same code; what is not
exercised here is TensorFlow's own gs:// client (a real run never uses it for a run path).
"""
import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import gcs_emulator
from conftest import TFDS_DATA_DIR
from harness import cli_env

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
BUCKET = 'ssl-jax-test'
STEPS = 12
OVERRIDES = {'total_steps': STEPS, 'batch_size': 16, 'log_every_steps': 1,
             'checkpoint.every_steps': 4, 'evals.knn.at_start': False,
             'evals.online_probe.at_start': False,
             'data.train_split': 'train[:256]', 'data.shuffle_buffer': 256}
LINE = re.compile(r'^step (\d+)/\d+ ')


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  with gcs_emulator.running(str(tmp_path_factory.mktemp('gcs_root'))) as emu:
    emu.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)   # this test process reads the bucket through ssl_jax.paths too
    try:
      yield emu
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def _env(extra=None, drop=()):
  env = cli_env(**(extra or {}))
  env['PYTHONPATH'] = os.path.abspath(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  for k in drop:
    env.pop(k, None)
  return env


def _cli(cwd, *args, env=None, term_at=None):
  """``python -m ssl_jax.main ARGS`` in ``cwd``; SIGTERM once step ``term_at``'s line is out."""
  p = subprocess.Popen([sys.executable, '-m', 'ssl_jax.main', *args], cwd=cwd,
                       env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  out = []
  for line in p.stdout:
    out.append(line)
    m = LINE.match(line)
    if term_at is not None and m and int(m.group(1)) >= term_at and p.poll() is None:
      p.send_signal(signal.SIGTERM)
      term_at = None
  err = p.stderr.read()
  p.wait(timeout=900)
  return p.returncode, ''.join(out), err


def _train_args(workdir, *extra):
  return [f'--config={REPO}/configs/moco.py:cifar10,runlocal', f'--workdir={workdir}',
          f'--config.data.data_dir={TFDS_DATA_DIR}',
          *[f'--config.{k}={v}' for k, v in OVERRIDES.items()], *extra]


def _train_stop_resume(cwd, workdir, *extra):
  """The run, stopped by SIGTERM at step >= 3, then resumed to the end."""
  rc, out, err = _cli(cwd, *_train_args(workdir, *extra), term_at=3)
  assert rc == 0, out[-3000:] + err[-3000:]
  assert 'preemption notice (SIGTERM)' in out, out[-3000:]
  stopped = int(re.search(r'Stopping at step (\d+)', out).group(1))
  assert stopped < STEPS
  if workdir.startswith('gs://'):
    from ssl_jax import paths
    outcome = paths.read_json(f'{workdir}/outcome.json')
    assert (outcome['status'], outcome['exit_code'], outcome['step']) == ('stopped', 0, stopped)
  rc, out2, err = _cli(cwd, *_train_args(workdir, *extra))
  assert rc == 0, out2[-3000:] + err[-3000:]
  assert re.search(rf'Resumed from \S+/checkpoints/{stopped} ', out2), out2[:3000]
  return out + out2


@pytest.mark.slow
def test_a_run_on_gcs_keeps_every_file_there_and_equals_a_local_run(gcs, tmp_path):
  from ssl_jax import checkpoint as ckpt_lib
  from ssl_jax import paths
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10'
  cwd = tmp_path / 'cwd'        # an empty current directory: nothing may appear in it
  cwd.mkdir()
  run = f'gs://{BUCKET}/run'
  profile = ['--config.profile_steps=2', '--config.profile_start_step=2']
  out = _train_stop_resume(cwd, run, *profile)
  assert f'Profile of steps 2..3 in {run}/plugins/profile/' in out, out[-3000:]

  # The evaluations and the export read that run and write to gs://.
  evals = [('knn', 'eval_knn', 'cifar10,runlocal'), ('linear', 'eval_linear', 'cifar10,runlocal'),
           ('export', 'eval_linear', 'cifar10')]
  for mode, cfg, arg in evals:
    rc, o, e = _cli(cwd, f'--mode={mode}', f'--config={REPO}/configs/{cfg}.py:{arg}',
                    f'--config.pretrained={run}', f'--workdir={run}_{mode}',
                    f'--config.data_dir={TFDS_DATA_DIR}')
    assert rc == 0, (mode, o[-3000:], e[-3000:])

  # Nothing was created in the current directory (no folder named `gs:`, nothing else).
  assert sorted(os.listdir(cwd)) == []

  # Every output is an object in the emulator's bucket.
  objs = gcs.objects(BUCKET)
  names = set(objs)
  must = ['run/config.json', 'run/outcome.json', f'run/checkpoints/{STEPS}/_CHECKPOINT_METADATA',
          f'run/score_plots/step_{STEPS:07d}.png', 'run_knn/results.json',
          'run_linear/results.json', 'run_export/backbone.pth', 'run_export/backbone.npz',
          'run_export/export.json']
  assert [m for m in must if m not in names] == [], sorted(names)
  assert any(n.startswith(f'run/checkpoints/{STEPS}/state/') for n in names)
  events = [n for n in names if re.fullmatch(r'run/events\.out\.tfevents\.[^/]+', n)]
  assert len(events) == 2 and all(objs[n] > 0 for n in events), sorted(names)  # two processes
  assert any(re.fullmatch(r'run_linear/events\.out\.tfevents\.[^/]+', n) for n in names)
  assert any(re.fullmatch(r'run/plugins/profile/[^/]+/[^/]+\.xplane\.pb', n) and objs[n] > 0
             for n in names), sorted(names)
  assert gcs.read(BUCKET, f'run/score_plots/step_{STEPS:07d}.png')[:8] == b'\x89PNG\r\n\x1a\n'
  outcome = paths.read_json(f'{run}/outcome.json')
  assert outcome['status'] == 'done' and outcome['exit_code'] == 0 and outcome['step'] == STEPS
  assert outcome['final_line'].startswith(f'Final after {STEPS} steps | kNN top-1')
  assert paths.read_json(f'{run}_knn/results.json')['pretrained'] == run
  # The event files hold the run's scalars (read back from the bucket).
  from tensorboard.backend.event_processing import event_accumulator
  local_events = tmp_path / 'events'
  local_events.mkdir()
  for n in events:
    (local_events / os.path.basename(n)).write_bytes(gcs.read(BUCKET, n))
  tags = set()
  for f in local_events.iterdir():
    acc = event_accumulator.EventAccumulator(str(f))
    acc.Reload()
    tags |= set(acc.Tags()['tensors']) | set(acc.Tags()['scalars'])
  assert {'loss', 'monitor/knn_top1'} <= tags, tags

  # The same sequence on a local workdir (no profile): the final train state, bit for bit.
  local = tmp_path / 'local_run'
  _train_stop_resume(cwd, str(local))
  on_gcs, step_g = ckpt_lib.restore_state(run, items=())
  on_disk, step_l = ckpt_lib.restore_state(str(local), items=())
  assert step_g == step_l == STEPS
  import jax
  flat_g, tree_g = jax.tree.flatten(on_gcs)
  flat_l, tree_l = jax.tree.flatten(on_disk)
  assert tree_g == tree_l
  for a, b in zip(flat_g, flat_l):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(os.listdir(cwd)) == []   # still nothing in the current directory


@pytest.mark.slow
def test_damaged_checkpoint_on_gcs_is_moved_aside_and_the_run_resumes(gcs, tmp_path):
  """The damaged-step move on gs:// (copy + delete, paths.move_dir) and the resume after it."""
  from ssl_jax import paths
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  run = f'gs://{BUCKET}/damaged'
  rc, out, err = _cli(cwd, *_train_args(run, '--config.total_steps=8',
                                        '--config.evals.knn.at_end=False',
                                        '--config.evals.online_probe.at_end=False'))
  assert rc == 0, out[-3000:] + err[-3000:]
  state = list(gcs.objects(BUCKET, 'damaged/checkpoints/8/state/'))
  assert state
  for n in state:   # every file of the newest checkpoint's state emptied
    paths.write_bytes(f'gs://{BUCKET}/{n}', b'')
  rc, out, err = _cli(cwd, *_train_args(run, '--config.total_steps=12',
                                        '--config.evals.knn.at_end=False',
                                        '--config.evals.online_probe.at_end=False'),
                      '--allow_config_change')
  assert rc == 0, out[-3000:] + err[-3000:]
  assert 'skipping damaged checkpoint gs://' in out, out[-3000:]
  assert 'Resumed from gs://' in out and '/checkpoints/4 ' in out, out[-3000:]
  names = set(gcs.objects(BUCKET, 'damaged/checkpoints/'))
  assert any(n.startswith('damaged/checkpoints/damaged-8/') for n in names), sorted(names)
  assert 'damaged/checkpoints/12/_CHECKPOINT_METADATA' in names
  assert sorted(os.listdir(cwd)) == []


def _one_line_exit_2(rc, out, err):
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 2 and len(lines) == 1 and lines[0].startswith('Config error: '), (rc, out, err)
  assert 'compiling' not in out
  return lines[0]


@pytest.mark.slow
def test_bad_cloud_storage_paths_are_one_line_before_anything_runs(gcs, tmp_path):
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  train = [f'--config={REPO}/configs/moco.py:cifar10,runlocal']
  # A bucket that does not exist (the emulator answers 404).
  line = _one_line_exit_2(*_cli(cwd, *train, '--workdir=gs://no-such-bucket/run1'))
  assert line == ('Config error: --workdir=gs://no-such-bucket/run1: bucket gs://no-such-bucket '
                  'does not exist; create it (gcloud storage buckets create '
                  'gs://no-such-bucket --location=REGION) or fix the name.')
  # No network: nothing listens at the Cloud Storage endpoint.
  dead = f'http://127.0.0.1:{gcs_emulator.free_port()}'
  rc, out, err = _cli(cwd, *train, f'--workdir=gs://{BUCKET}/run2', env=_env(
      {'STORAGE_EMULATOR_HOST': dead, 'TENSORSTORE_GCS_HTTP_URL': dead}))
  line = _one_line_exit_2(rc, out, err)
  assert line.startswith(f'Config error: --workdir=gs://{BUCKET}/run2: Cloud Storage is not '
                         f'reachable (127.0.0.1:{dead.rsplit(":", 1)[1]}: '), line
  assert line.endswith('); check the network, or use a local path.'), line
  # No credentials (the real endpoint; the credentials are looked for first).
  rc, out, err = _cli(cwd, *train, '--workdir=gs://some-bucket/run1', env=_env(
      {'GOOGLE_APPLICATION_CREDENTIALS': str(tmp_path / 'missing-key.json')},
      drop=('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING')))
  assert _one_line_exit_2(rc, out, err) == (
      'Config error: --workdir=gs://some-bucket/run1: no Google Cloud credentials on this '
      'machine; run `gcloud auth application-default login`, or run on a VM whose service '
      'account can use the bucket.')
  # --config.pretrained on a bucket path that holds no run.
  rc, out, err = _cli(cwd, '--mode=knn', f'--config={REPO}/configs/eval_knn.py:cifar10,runlocal',
                      f'--config.pretrained=gs://{BUCKET}/nothing-here',
                      f'--workdir=gs://{BUCKET}/knn_of_nothing')
  line = _one_line_exit_2(rc, out, err)
  assert line.startswith(f'Config error: gs://{BUCKET}/nothing-here/config.json does not '
                         'exist'), line
  # A mistyped URL would be a local folder named `gs:`.
  line = _one_line_exit_2(*_cli(cwd, *train, f'--workdir=gs:/{BUCKET}/run4'))
  assert line == (f'Config error: --workdir=gs:/{BUCKET}/run4 is not a Cloud Storage URL (it would be a '
                  f'local folder named "gs:"); did you mean gs://{BUCKET}/run4?'), line
  # A config file on gs:// (config files are Python code read on this machine).
  line = _one_line_exit_2(*_cli(cwd, f'--config=gs://{BUCKET}/moco.py:cifar10',
                                f'--workdir=gs://{BUCKET}/run3'))
  assert line == (f'Config error: --config=gs://{BUCKET}/moco.py: config files are Python '
                  'code read on this machine; copy it here first (gcloud storage cp '
                  f'gs://{BUCKET}/moco.py .).'), line
  assert sorted(os.listdir(cwd)) == []
  assert not any(n.startswith(('run2/', 'run3/', 'knn_of_nothing/'))
                 for n in gcs.objects(BUCKET))


# ---------------------------------------------------------------------------------------------
# ssl_jax.paths itself, on the emulator and on a local folder (fast)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=['local', 'gcs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'root')
  request.getfixturevalue("gcs")
  return f'gs://{BUCKET}/paths_{request.node.name.split("[")[0][-20:]}_{os.getpid()}'


def test_paths_write_read_list_move(root, tmp_path, monkeypatch):
  from ssl_jax import paths
  monkeypatch.chdir(tmp_path)
  before = set(os.listdir(tmp_path))
  p = paths.write_json(paths.join(root, 'a', 'config.json'), {'lr': 0.5, 'name': 'x'})
  assert paths.read_json(p) == {'lr': 0.5, 'name': 'x'}
  paths.write_json(p, {'lr': 0.25})            # replaced whole
  assert paths.read_json(p) == {'lr': 0.25}
  assert paths.listdir(paths.join(root, 'a')) == ['config.json']   # no temporary left behind
  paths.append_text(paths.join(root, 'log.txt'), 'one\n')
  paths.append_text(paths.join(root, 'log.txt'), 'two\n')
  assert paths.read_text(paths.join(root, 'log.txt')) == 'one\ntwo\n'
  paths.write_bytes(paths.join(root, 'ck', '3', 'state', 'x.bin'), b'\x00\x01')
  paths.write_bytes(paths.join(root, 'ck', '3', 'meta'), b'{}')
  paths.move_dir(paths.join(root, 'ck', '3'), paths.join(root, 'ck', 'damaged-3'))
  assert paths.listdir(paths.join(root, 'ck')) == ['damaged-3']
  assert paths.read_bytes(paths.join(root, 'ck', 'damaged-3', 'state', 'x.bin')) == b'\x00\x01'
  walked = {(paths.basename(d), tuple(f)) for d, _, f in paths.walk(paths.join(root, 'ck'))
            if f}
  assert walked == {('damaged-3', ('meta',)), ('state', ('x.bin',))}
  assert paths.isdir(paths.join(root, 'ck')) and not paths.isfile(paths.join(root, 'ck'))
  assert paths.isfile(p) and not paths.exists(paths.join(root, 'nope'))
  assert paths.listdir(paths.join(root, 'nope')) == []
  if root.startswith('gs://'):
    assert set(os.listdir(tmp_path)) == before   # nothing local for a gs:// root


def test_paths_mirror_uploads_new_and_changed_files(root, tmp_path):
  from ssl_jax import paths
  m = paths.Mirror(paths.join(root, 'run'), min_interval_s=3600)
  if not root.startswith('gs://'):
    assert m.local == paths.join(root, 'run') and m.sync(force=True) == 0
    return
  assert m.local.startswith(tempfile.gettempdir()) and not m.local.startswith(os.getcwd())
  os.makedirs(os.path.join(m.local, 'plugins', 'profile', 'r1'))
  with open(os.path.join(m.local, 'events.out'), 'wb') as f:
    f.write(b'abc')
  with open(os.path.join(m.local, 'plugins', 'profile', 'r1', 'h.xplane.pb'), 'wb') as f:
    f.write(b'trace')
  assert m.sync() == 0                        # not due yet
  assert m.sync(force=True) == 2
  assert m.sync(force=True) == 0              # nothing changed
  with open(os.path.join(m.local, 'events.out'), 'ab') as f:
    f.write(b'def')
  os.utime(os.path.join(m.local, 'events.out'), (1, 1))
  assert m.sync(force=True) == 1
  assert paths.read_bytes(paths.join(root, 'run', 'events.out')) == b'abcdef'
  assert paths.read_bytes(paths.join(root, 'run', 'plugins', 'profile', 'r1',
                                     'h.xplane.pb')) == b'trace'
  m.close()
  assert not os.path.exists(m.local)


def test_jsonl_metrics_writer_on_any_root(root):
  """The TF-free metric writer (no clu): local appends, gs:// re-uploads the whole file."""
  import json
  from ssl_jax import paths, writers
  w = writers.JsonlWriter(paths.join(root, 'run'), just_logging=False)
  w.write_scalars(1, {'loss': 2.5})
  w.write_histograms(2, {'h': [1.0, 3.0]})
  w.close()
  w = writers.JsonlWriter(paths.join(root, 'run'), just_logging=False)   # a resumed run appends
  w.write_scalars(3, {'loss': 1.5})
  w.close()
  lines = [json.loads(x) for x in paths.read_text(paths.join(root, 'run', 'metrics.jsonl'))
           .splitlines()]
  assert lines == [{'step': 1, 'loss': 2.5},
                   {'step': 2, 'h/count': 2, 'h/mean': 2.0, 'h/min': 1.0, 'h/max': 3.0},
                   {'step': 3, 'loss': 1.5}]
