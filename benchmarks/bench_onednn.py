"""Our input pipeline with TensorFlow's oneDNN off (the package default since
``ssl_jax/__init__.py`` sets TF_ENABLE_ONEDNN_OPTS=0) vs on: BYOL CIFAR-10 two-view batches of 256,
images/s after 5 warm-up batches over 30, each setting in its own process, interleaved.

  python benchmarks/bench_onednn.py
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = r'''
import time, json, ml_collections
from ssl_jax import config_lib, data
c = config_lib.load_config_file('configs/byol.py', 'cifar10')
it = data.make_train_iterator(c.data, global_batch_size=256, seed=0)
for _ in range(5): next(it)
t = time.time()
for _ in range(30): next(it)
print(json.dumps({'img_s': 30 * 256 / (time.time() - t)}))
'''
res = {'0': [], '1': []}
for rep in range(2):
  for v in ('0', '1'):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=v, TFDS_DATA_DIR=os.environ.get('TFDS_DATA_DIR', os.path.join(REPO, '..', 'shared', 'data', 'tfds')))
    out = subprocess.run([sys.executable, '-c', CODE], cwd=REPO, env=env, capture_output=True, text=True).stdout
    res[v].append(json.loads(out.strip().splitlines()[-1])['img_s'])
print(res, 'ratio off/on per repeat:', [a / b for a, b in zip(res['0'], res['1'])])
