"""benchmarks/device_suite.py --smoke: the GPU suite's code paths at tiny sizes on the CPU, in
the device image's conditions — tensorflow / tensorflow_datasets / clu unimportable and
ml_collections (with absl, yaml) importable only from a third_party/ made by
benchmarks/vendor_deps.sh — printing every row of the table with finite numbers."""
import inspect
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

# Row keys -> whether the row has a peer number (PyTorch; replicas_S: ours at S = 1).
ROWS = {'byol': True, 'supervised': True, 'ssl_sup_ratio': True, 'nvidia_context': True,
        'knn': True, 'knn_bf16': True, 'kmeans': True, 'aps': False, 'vit_full': False,
        'moco': True, 'msf': True, 'clim': False,
        'replicas': False, 'replicas_4': True, 'replicas_8': True}
HEADER = ('| row | metric | ours | PyTorch peer | peer variant | ours vs peer | goal | result | '
          'row time (s) | notes |')


def _number(cell: str) -> float:
  return float(cell.strip().replace(',', ''))


@pytest.mark.slow
def test_smoke_runs_every_row_without_tf_and_with_vendored_ml_collections(tmp_path):
  third = tmp_path / 'third_party'
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop('XLA_FLAGS', None)    # the suite's own CPU settings, not conftest's 4 devices
  vend = subprocess.run(['bash', str(REPO / 'benchmarks' / 'vendor_deps.sh'), str(third)],
                        env=env, capture_output=True, text=True, timeout=120)
  assert vend.returncode == 0, vend.stderr
  assert {'ml_collections', 'absl', 'yaml'} <= set(os.listdir(third))
  assert not list(third.rglob('*.so'))          # pure Python only: any device Python can load it

  out_json = tmp_path / 'suite.json'
  cmd = [sys.executable, str(REPO / 'benchmarks' / 'device_suite.py'), '--smoke', '--block_tf',
         '--vendored_only', '--third_party', str(third), '--peak_tflops', '1',
         '--hbm_tbps', '0.05', '--json', str(out_json)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  out = proc.stdout
  assert 'ml_collections 1' in out and f'from {third}' in out
  assert 'SMOKE MODE' in out and 'NOT a performance result' in out
  assert 'command (from the repository root): python benchmarks/device_suite.py --smoke' in out
  assert HEADER in out

  res = json.loads(out_json.read_text())
  assert res['blocked_loaded'] == [] and res['block_tf'] and res['vendored_only']
  for name in ('ml_collections', 'absl', 'yaml'):   # imported, and only from third_party
    assert res['imports'][name] and res['imports'][name].startswith(str(third)), res['imports']

  from ssl_jax.ops import knn
  expected = dict(ROWS)
  if 'recall_target' in inspect.signature(knn.topk_cosine).parameters:
    expected['knn_approx'] = True
  rows = {r['key']: r for r in res['rows']}
  assert set(rows) == set(expected), sorted(rows)
  for key, has_peer in expected.items():
    r = rows[key]
    assert r['status'] == 'ok', r
    assert r['ours'] is not None and math.isfinite(r['ours']) and r['ours'] > 0, r
    if has_peer:
      assert r['peer'] is not None and math.isfinite(r['peer']) and r['peer'] > 0, r
    else:
      assert r['peer'] is None and r['peer_label'], r

  # The printed table: one line per row, its 'ours' cell a finite number, no NaN anywhere.
  lines = out[out.index(HEADER):].splitlines()[2:2 + len(expected)]
  assert len(lines) == len(expected)
  for line, r in zip(lines, res['rows']):
    cells = line.split('|')
    assert cells[1].strip() == r['label']
    assert math.isfinite(_number(cells[3])), line
    assert not re.search(r'\bnan\b', line, re.IGNORECASE), line
  assert 'not run' not in out
