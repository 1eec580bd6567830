r"""Replicas vs separate runs: S seeds trained in one program (``--config.replicas=S``, the step
mapped over a leading replica axis by ``--program``) against the same S seeds as S separate runs, one after
another, on this machine.

    TFDS_DATA_DIR=../shared/data/tfds python benchmarks/bench_replicas.py \
        [--method byol] [--replicas 1,2,4] [--steps 10] [--program auto|vmap|unroll] \
        [--evals] [--json out.json]

Every run is a whole ``python -m ssl_jax.main`` process with a fresh workdir, so start-up,
input set-up, compilation, the steps and the final checkpoint are all counted:
``configs/<method>.py:cifar10,quick`` cut to ``--steps`` steps (the ``steps=N`` config token),
evaluators off (``at_start`` / ``at_end`` False for every listed evaluator) unless ``--evals``.
Replica r of the one-program run is seed ``r``, exactly as the separate run with
``--config.seed=r``.

Measured per process: wall time (the parent's clock around the subprocess), CPU time (user +
system of the process and every child it waited for, ``getrusage(RUSAGE_CHILDREN)``) and the
step time from the trainer's last log line (batch / its ``img/s/device``, one device here: the
steps after the first, compiled one, without start-up or compilation). The separate runs of
seeds 0 .. max(S) - 1 run once each; "S separate runs" sums the first S of them (sequential
processes are independent, so the sum is what S runs one after another cost). Runs are
interleaved (one program S, then the separate seeds it adds) so a load change hits both sides.
The one-program S = 1 run and the separate seed-0 run are the same command: their ratio shows
the run-to-run noise. One measurement per process (no repeats): on a shared machine, read the
ratios with that noise in mind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from _common import REPO, load_config  # noqa: E402  (benchmarks/ is the script's directory)

IMG_PER_S = re.compile(r'steps/s, ([0-9]+) img/s/device')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--method', default='byol', help='configs/<method>.py (default byol)')
  p.add_argument('--replicas', default='1,2,4', help='comma list of S (default 1,2,4)')
  p.add_argument('--steps', type=int, default=10,
                 help='train steps per run (the quick preset is 2 epochs = 780 steps)')
  p.add_argument('--program', default='auto', choices=('auto', 'vmap', 'unroll'),
                 help="the one-program runs' config.replica_program (default auto: unroll on CPU)")
  p.add_argument('--evals', action='store_true',
                 help="keep the quick preset's evaluators (kNN, online probe at start and end)")
  p.add_argument('--workroot', default=None, help='parent of the fresh workdirs (default: a new '
                 'temporary directory, removed at the end)')
  p.add_argument('--json', default=None, help='write the measurements here')
  a = p.parse_args(argv)
  a.replicas = sorted({int(s) for s in a.replicas.split(',') if s})
  return a


def command(a, replicas: int, seed: int, workdir: str, eval_names) -> list[str]:
  cmd = [sys.executable, '-m', 'ssl_jax.main',
         f'--config=configs/{a.method}.py:cifar10,quick,steps={a.steps}',
         f'--config.replicas={replicas}', f'--config.seed={seed}', f'--workdir={workdir}']
  if replicas > 1:
    cmd.append(f'--config.replica_program={a.program}')
  if not a.evals:
    cmd += [f'--config.evals.{n}.{w}=False' for n in eval_names for w in ('at_start', 'at_end')]
  return cmd


def _num(v, digits=0) -> str:
  return '?' if v is None else f'{v:.{digits}f}'


def run_one(cmd: list[str], label: str, batch: int) -> dict:
  """One whole training process: wall, CPU (user + sys, children included), step time."""
  load0 = os.getloadavg()[0]
  r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - t
  r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  if proc.returncode != 0:
    sys.exit(f'{label} failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n'
             f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  rates = IMG_PER_S.findall(proc.stdout)
  step_s = batch / float(rates[-1]) if rates and float(rates[-1]) > 0 else None
  res = {'label': label, 'wall_s': wall, 'cpu_s': cpu, 'step_s': step_s, 'load_before': load0,
         'load_after': os.getloadavg()[0], 'command': shlex.join(cmd[1:])}
  print(f'# {label}: wall {wall:.0f} s, CPU {cpu:.0f} s, step {_num(step_s, 2)} s '
        f'(load {load0:.1f} -> {res["load_after"]:.1f})', flush=True)
  return res


def measure(a, root: str, eval_names, batch: int) -> tuple[dict, list[dict]]:
  """The one-program runs (S -> result) and the separate runs (seed order), interleaved."""
  one, sep = {}, []
  for s in a.replicas:
    wd = os.path.join(root, f'one_S{s}')
    one[s] = run_one(command(a, s, 0, wd, eval_names), f'one program, S={s}', batch)
    while len(sep) < s:
      seed = len(sep)
      wd = os.path.join(root, f'separate_seed{seed}')
      sep.append(run_one(command(a, 1, seed, wd, eval_names), f'separate run, seed {seed}',
                         batch))
  return one, sep


def table(a, one: dict, sep: list[dict]) -> tuple[str, list[dict]]:
  rows, lines = [], [
      ('| S | one program: wall (s) | CPU (s) | s/step | S separate runs: wall (s) | '
       'CPU (s) | s/step (sum) | wall: separate / one | CPU: separate / one |'),
      '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for s in a.replicas:
    o, first = one[s], sep[:s]
    sw, sc = sum(r['wall_s'] for r in first), sum(r['cpu_s'] for r in first)
    steps = [r['step_s'] for r in first]
    sep_step = sum(steps) if None not in steps else None
    row = {'replicas': s, 'one_wall_s': o['wall_s'], 'one_cpu_s': o['cpu_s'],
           'one_step_s': o['step_s'], 'separate_wall_s': sw, 'separate_cpu_s': sc,
           'separate_step_s': sep_step, 'wall_ratio': sw / o['wall_s'],
           'cpu_ratio': sc / o['cpu_s']}
    rows.append(row)
    lines.append(f'| {s} | {o["wall_s"]:.0f} | {o["cpu_s"]:.0f} | {_num(o["step_s"], 2)} | '
                 f'{sw:.0f} | {sc:.0f} | {_num(sep_step, 2)} | {row["wall_ratio"]:.2f}x | '
                 f'{row["cpu_ratio"]:.2f}x |')
  return '\n'.join(lines), rows


def machine() -> str:
  model = platform.processor() or '?'
  try:
    with open('/proc/cpuinfo') as f:
      model = next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{model}, {os.cpu_count()} cores (os.cpu_count), python {platform.python_version()}'


def main(argv=None) -> int:
  a = parse_args(argv)
  c = load_config(a.method, f'cifar10,quick,steps={a.steps}')
  eval_names = list(c.evals.keys())
  own_root = a.workroot is None
  root = tempfile.mkdtemp(prefix='bench_replicas_') if own_root else a.workroot
  print(f'# {a.method} {c.model.backbone} x{c.model.width}, batch {c.batch_size} per replica, '
        f'{a.steps} steps per run, evaluators {"on" if a.evals else "off"}; S = {a.replicas} '
        f'(replica_program {a.program}); '
        f'machine: {machine()}; workdirs under {root}', flush=True)
  t = time.perf_counter()
  one, sep = measure(a, root, eval_names, int(c.batch_size))
  text, rows = table(a, one, sep)
  print(f'\n{a.method} quick preset, {a.steps} steps, evaluators '
        f'{"on" if a.evals else "off"}; whole processes, compile included; '
        f'{time.perf_counter() - t:.0f} s for the benchmark')
  print(text)
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'rows': rows, 'one_program': list(one.values()), 'separate': sep,
                 'method': a.method, 'steps': a.steps, 'evals': a.evals, 'machine': machine(),
                 'argv': sys.argv}, f, indent=1)
  if own_root:
    import shutil
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
