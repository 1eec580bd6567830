r"""The seven-method table with error bars: every method at one small CIFAR-10 budget (the quick
preset: ResNet-18 at 1/8 width, batch 128, 2 epochs = 780 steps) with ``--config.replicas=3``
(seeds 0, 1, 2 in one program), then kNN and online-probe top-1 as mean ± std (ddof=1) beside
the untrained network, read from each run's ``WORKDIR/results.json``.

    TFDS_DATA_DIR=../shared/data/tfds python benchmarks/replicas_table.py --run \
        --workroot /tmp/table [--methods moco,byol,...]
    python benchmarks/replicas_table.py --workroot /tmp/table      # the table only

``--run`` trains each listed method whose workdir has no ``results.json`` yet, one after
another, with the command printed in the table (``WORKROOT/<method>``), and records its wall
time in ``WORKROOT/<method>.wall.json``. On a 2-core CPU each run takes 15-60 min.

APS is a ViT method: at this budget it uses ``vit_test`` (2 blocks, width 32, patch 2: 256
tokens, float32), whose FLOPs per image are close to the 1/8-width ResNet-18's; the preset's
``vit_small`` (bfloat16) would take hours per epoch on this CPU.

The program column is ``config.replica_program`` as the run resolved it (``results.json``;
runs from before the field were ``vmap``): ``unroll`` replicas are the single runs bit for bit at small sizes (to rounding at these),
``vmap`` ones equal them to float rounding (which grows over a run, README).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

COMMON = ('--config.replicas=3',)
ARGS = {
    'moco': ('--config=configs/moco.py:cifar10,quick',),
    'byol': ('--config=configs/byol.py:cifar10,quick',),
    'msf': ('--config=configs/msf.py:cifar10,quick',),
    'ft': ('--config=configs/ft.py:cifar10,quick',),
    'csml': ('--config=configs/csml.py:cifar10,quick',),
    'clim': ('--config=configs/clim.py:cifar10,quick',),
    'aps': ('--config=configs/aps.py:cifar10,vit_test,quick', '--config.model.dtype=float32'),
}
NAMES = {'moco': 'MoCo v2', 'byol': 'BYOL', 'msf': 'MSF', 'ft': 'FT', 'csml': 'CsMl',
         'clim': 'CLIM', 'aps': 'APS (vit_test)'}
KNN, PROBE = 'monitor/knn_top1', 'online_probe/test_top1'


def command(method: str, workdir: str) -> list[str]:
  return ['python', '-m', 'ssl_jax.main', *ARGS[method], *COMMON, f'--workdir={workdir}']


def run(method: str, root: str) -> None:
  workdir = os.path.join(root, method)
  cmd = command(method, workdir)
  print(f'# {method}: {shlex.join(cmd)}', flush=True)
  t = time.time()
  with open(os.path.join(root, f'{method}.log'), 'w') as log:
    rc = subprocess.call([sys.executable, *cmd[1:]], cwd=REPO, stdout=log,
                         stderr=subprocess.STDOUT)
  wall = time.time() - t
  if rc != 0:
    sys.exit(f'{method} failed (exit {rc}); its log: {os.path.join(root, method + ".log")}')
  with open(os.path.join(root, f'{method}.wall.json'), 'w') as f:
    json.dump({'wall_s': wall, 'command': shlex.join(cmd)}, f)
  print(f'# {method}: {wall / 60:.1f} min', flush=True)


def _cell(mean: float, std: float, values) -> str:
  return (f'**{100 * mean:.2f} ± {100 * std:.2f}** ('
          + ' / '.join(f'{100 * v:.2f}' for v in values) + ')')


def _untrained(values) -> str:
  if not values:   # the run evaluated nothing at step 0
    return 'not measured'
  n = len(values)
  mean = sum(values) / n
  std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
  return f'{100 * mean:.2f} ± {100 * std:.2f}'


def table(root: str, methods) -> str:
  lines = ['| method | kNN top-1 (%), seeds 0 / 1 / 2 | untrained | online-probe top-1 (%), '
           'seeds 0 / 1 / 2 | untrained | program | wall |',
           '|---|---|---|---|---|---|---:|']
  missing = []
  for m in methods:
    path = os.path.join(root, m, 'results.json')
    if not os.path.exists(path):
      missing.append(m)
      continue
    with open(path) as f:
      r = json.load(f)
    if r.get('frozen_replicas'):
      print(f'WARNING: {m}: frozen replicas {r["frozen_replicas"]} (left out of the means)')
    untrained = r.get('untrained_replicas', {})
    wall = '?'
    wall_path = os.path.join(root, f'{m}.wall.json')
    if os.path.exists(wall_path):
      with open(wall_path) as f:
        wall = f'{json.load(f)["wall_s"] / 60:.0f} min'
    lines.append(
        f'| {NAMES[m]} | {_cell(r["final"][KNN], r["final_std"][KNN], r["final_replicas"][KNN])}'
        f' | {_untrained(untrained.get(KNN))} | '
        f'{_cell(r["final"][PROBE], r["final_std"][PROBE], r["final_replicas"][PROBE])} | '
        f'{_untrained(untrained.get(PROBE))} | {r.get("replica_program", "vmap")} | {wall} |')
  if missing:
    lines.append(f'\nNot run yet (no results.json): {", ".join(missing)}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workroot', required=True, help='one workdir per method under it')
  p.add_argument('--methods', default=','.join(ARGS), help='comma list (default: all seven)')
  p.add_argument('--run', action='store_true', help='train the methods without results.json')
  a = p.parse_args(argv)
  methods = [m for m in a.methods.split(',') if m]
  unknown = sorted(set(methods) - set(ARGS))
  if unknown:
    p.error(f'unknown method(s) {unknown}; accepted: {", ".join(ARGS)}')
  if a.run:
    os.makedirs(a.workroot, exist_ok=True)
    for m in methods:
      if not os.path.exists(os.path.join(a.workroot, m, 'results.json')):
        run(m, a.workroot)
  print(table(a.workroot, methods))
  return 0


if __name__ == '__main__':
  sys.exit(main())
