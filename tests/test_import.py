"""Importing the library has no side effects but the one ``ssl_jax/__init__.py`` documents."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import conftest

PROBE = r'''
import json, logging, os, sys
argv, absl_filters = list(sys.argv), list(logging.getLogger('absl').filters)
changed = set()

def imported(*modules):
  import importlib
  before = dict(os.environ)
  for m in modules:
    importlib.import_module(m)
  changed.update(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))

# The package and the CLI module first: they import neither JAX nor TensorFlow, so nothing else
# can have set a variable before them.
imported('ssl_jax', 'ssl_jax.main')
# Third-party libraries set variables at their own import (jax: TF_CPP_MIN_LOG_LEVEL,
# TPU_SKIP_MDS_QUERY; tensorflow: TF2_BEHAVIOR, KMP_*, ...): not ours, so not counted.
import absl.app, ml_collections, numpy, jax, flax.linen, optax, orbax.checkpoint
import tensorflow, tensorflow_datasets, clu.metric_writers, etils.epath
imported('ssl_jax.train', 'ssl_jax.checkpoint', 'ssl_jax.data.sources', 'ssl_jax.evals.evaluators',
         'ssl_jax.evals.knn_eval', 'ssl_jax.evals.online_probe', 'ssl_jax.evals.offline')
import ssl_jax
print('RESULT ' + json.dumps({
    'changed': sorted(changed), 'allowed': list(ssl_jax.IMPORT_TIME_ENV),
    'argv_same': sys.argv == argv,
    'absl_filters_added': len(logging.getLogger('absl').filters) - len(absl_filters)}))
'''


def test_importing_the_library_changes_only_the_documented_environment():
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'TF_ENABLE_ONEDNN_OPTS', 'TF_CPP_MIN_LOG_LEVEL')}
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=conftest.REPO,
                       env=env, capture_output=True, text=True, timeout=300, check=True)
  line = next(l for l in out.stdout.splitlines() if l.startswith('RESULT '))
  res = json.loads(line[len('RESULT '):])
  assert res['allowed'] == ['XLA_FLAGS', 'TF_ENABLE_ONEDNN_OPTS']
  assert set(res['changed']) <= set(res['allowed']), res
  assert 'TF_ENABLE_ONEDNN_OPTS' in res['changed'], res   # the documented exception happens
  assert res['argv_same'] and res['absl_filters_added'] == 0, res
