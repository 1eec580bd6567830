"""The core runs without TensorFlow, TFDS and clu (accelerator images have only jax/flax/optax/
orbax/torch): importing ops, models, methods and the trainer, building every method's jitted
train step on synthetic data, and a short synthetic ``train_and_evaluate``, in a subprocess in
which those modules cannot be imported."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# ``sys.modules[name] = None``: ``import name`` raises ImportError, and probes such as
# ``importlib.util.find_spec(name)`` (etils, torch) see the module as absent, as on a machine
# without it.
BLOCKER = r'''
import sys
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')
for _name in BLOCKED:
  sys.modules[_name] = None
'''

SCRIPT = BLOCKER + r'''
import importlib, json, os, pkgutil, tempfile
import jax
import ssl_jax, ssl_jax.ops, ssl_jax.models, ssl_jax.methods
for pkg in (ssl_jax.ops, ssl_jax.models, ssl_jax.methods):
  for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f'{pkg.__name__}.{m.name}')
from ssl_jax import config_lib, data, methods, sharding, train
out = {'losses': {}}
for name in methods.names():
  c = config_lib.load_config_file(f'configs/{name}.py', 'cifar10,runlocal')
  c.data.name = 'synthetic'
  mesh = sharding.make_mesh()
  method = methods.get(name)(c, 100)
  parts = train.build(c, mesh, method, steps_per_epoch=100, total_steps=1000)
  it = data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=0)
  with jax.set_mesh(mesh):
    state = parts.init(jax.random.key(0))
    state, metrics, _ = parts.train_step(state, sharding.global_batch(mesh, next(it)))
  out['losses'][name] = float(metrics['loss'])
# A whole (tiny) run: synthetic data, metrics to metrics.jsonl, a checkpoint, the kNN monitor.
c = config_lib.load_config_file('configs/byol.py', 'cifar10,runlocal')
c.data.name = 'synthetic'
c.data.synthetic_examples = 256
c.total_steps = 4
c.log_every_steps = 2
c.evals.knn.train_examples = 64
c.evals.knn.eval_examples = 32
c.evals.online_probe.eval_examples = 32
with tempfile.TemporaryDirectory() as wd:
  res = train.train_and_evaluate(c, wd)
  out['final_step'] = res['final_step']
  out['jsonl'] = open(f'{wd}/metrics.jsonl').read().count('\n')
  out['checkpoints'] = sorted(os.listdir(f'{wd}/checkpoints'))
out['blocked_loaded'] = sorted(m for m, mod in sys.modules.items() if mod is not None
                               and m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'))
print('RESULT ' + json.dumps(out))
'''


@pytest.mark.slow
def test_core_imports_builds_and_trains_without_tensorflow():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  out = json.loads(line[len('RESULT '):])
  assert out['blocked_loaded'] == []
  assert sorted(out['losses']) == ['aps', 'byol', 'clim', 'csml', 'ft', 'moco', 'msf']
  assert all(v == v and abs(v) < 1e4 for v in out['losses'].values()), out['losses']
  assert out['final_step'] == 4
  assert out['jsonl'] >= 2          # two log windows (+ the start-of-run record)
  assert '4' in out['checkpoints']
  assert 'WARNING: clu is not installed' in proc.stdout


def test_importing_the_data_package_does_not_load_tensorflow():
  script = BLOCKER + r'''
from ssl_jax import data
cfg = data.default_data_config('cifar10')
assert [s.key for s in data.resolve_views(cfg)] == ['view1', 'view2']
cfg.name = 'synthetic'
b = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0,
                                  process_count=1))
assert sorted(b) == ['label', 'view1', 'view2'] and b['view1'].shape == (8, 32, 32, 3)
assert str(b['view1'].dtype) == 'uint8' and b['label'].max() < 10
try:
  data.normalize
except ImportError as e:
  print('LAZY', e)
'''
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'LAZY' in proc.stdout and 'tensorflow' in proc.stdout
