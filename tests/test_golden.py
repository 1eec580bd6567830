"""Golden trajectories: our jitted train step against a PyTorch reference, 5 steps, float64.

BYOL (configs/byol.py:cifar10 — LARS eta 0.02 with clip, symmetric loss, EMA with BYOL's cosine
tau) and MoCo v2 (configs/moco.py:imagenet — SGD, queue, temperature 0.2, constant m), shrunk to
batch 8 at 16 px with small heads, on a full-width ResNet-18 with the CIFAR stem. Both sides start
from the same weights (ours, loaded into torchvision's resnet18 through ``ssl_jax.export``'s name
mapping) and see the same uint8 batches. ``golden_worker.py`` runs both in a float64 subprocess
(why: its docstring); ``torch_reference.py`` is the reference.

After 5 steps, compared tensor by tensor:

* every online parameter and every EMA target parameter (backbone and projector): the value to
  ``TOL`` relative, and the update (value minus the common initial value) to ``TOL_UPDATE``
  relative. The update check is what makes a tensor that moved little still a strict check;
* the online network's BN running means and variances (torch's unbiased running variance mapped
  onto Flax's biased convention, exactly; see ``golden_worker.compare``);
* the MoCo queue (24 rows, so 5 x 8 keys wrap around it) and its pointer;
* at each step: lr (independently computed on the torch side from the warm-up + cosine formula),
  tau and the loss.

This catches what the per-loss tests cannot: BN train mode and the order of BN updates,
weight-decay and LARS masks, the order of loss / optimizer step / EMA / enqueue, lr schedules.

Measured (2-core CPU): every error <= 3e-8 (the largest from the lr, which optax computes in
float32 even under x64); a test takes ~1.5 min of CPU (jit compile ~30 s, 5 float64 steps on
each side). Needs a CPU torch and torchvision (``pip install torch==2.13.0`` and ``pip install
--no-deps torchvision==0.28.0``, as .ci/run does); a missing one is an error, not a skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # a float64 ResNet-18 + PyTorch subprocess per method

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TOL = 1e-4            # values: parameters, EMA target, BN statistics, queue, losses
TOL_UPDATE = 1e-5     # updates (x_5 - x_0); measured <= 3e-8
TOL_LR = 1e-6         # our lr is float32 (optax), the reference's float64
STATIC_ABS = 1e-12    # "did not move": float64 rounding of an exactly-zero gradient

# Tensors whose gradient is exactly zero, so both sides must leave them at their initial value:
# a Linear bias followed by BatchNorm (BN removes any constant shift), and in BYOL the
# projector's last bias, whose output the online network reads only through the predictor's
# Linear -> BN. MoCo v2's projector has no BN: every tensor moves.
STATIC = {
    'byol': {
        'online': {"['projector']['dense_0']['bias']", "['projector']['dense_1']['bias']",
                   "['predictor']['dense_0']['bias']"},
        'target': {"['projector']['dense_0']['bias']", "['projector']['dense_1']['bias']"},
    },
    'moco': {'online': set(), 'target': set()},
}


def run_worker(method: str, tmp_path) -> dict:
  out = tmp_path / f'{method}.json'
  env = dict(os.environ)
  env.update({
      'JAX_ENABLE_X64': '1',
      # One device is all the step needs. This also drops conftest's cheap-compile flags
      # (--xla_backend_optimization_level=0 ...): with them the float64 steps, whose
      # convolutions XLA:CPU compiles as generated loops, took 711 s instead of 138 s.
      'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
      'JAX_COMPILATION_CACHE_DIR': os.environ.get('SSL_JAX_TEST_CACHE',
                                                  '/tmp/ssl_jax_test_jax_cache'),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5',
      'PYTHONPATH': os.pathsep.join([REPO, HERE, env.get('PYTHONPATH', '')]),
  })
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'golden_worker.py'), method,
                         str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=1800)
  if proc.returncode != 0:
    pytest.fail(f'golden_worker.py {method} failed (rc {proc.returncode}):\n'
                f'{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}')
  with open(out) as f:
    return json.load(f)


def _rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-300)


def check(res: dict, method: str) -> None:
  failures = []
  summary = []

  # --- float64 for real: every floating array of the state and the loss, and a step-0 loss
  # that agrees to float64 precision (float32 would give ~1e-7).
  if set(res['dtypes']) != {'float64', 'loss:float64'}:
    failures.append(f'not all float64: {res["dtypes"]}')
  ours, theirs = res['metrics']['ours'], res['metrics']['torch']
  if _rel(ours[0]['loss'], theirs[0]['loss']) > 1e-12:
    failures.append(f'step-0 loss {ours[0]["loss"]!r} vs reference {theirs[0]["loss"]!r}: '
                    'apart by more than float64 rounding')

  # --- per step: lr, tau, loss
  lrs = [m['lr'] for m in ours]
  if len(set(lrs)) != len(lrs):
    failures.append(f'the lr must change at every step (warm-up, then cosine): {lrs}')
  for t, (o, r) in enumerate(zip(ours, theirs)):
    if (r['lr'] == 0 and o['lr'] != 0) or (r['lr'] != 0 and _rel(o['lr'], r['lr']) > TOL_LR):
      failures.append(f'step {t}: lr {o["lr"]!r} vs reference {r["lr"]!r}')
    if _rel(o['tau'], r['tau']) > 1e-9:
      failures.append(f'step {t}: tau {o["tau"]!r} vs reference {r["tau"]!r}')
    if _rel(o['loss'], r['loss']) > TOL:
      failures.append(f'step {t}: loss {o["loss"]!r} vs reference {r["loss"]!r}')

  # --- tensors
  for group, entries in res['groups'].items():
    if group == 'queue_ptr':
      p = entries['ptr']
      if p['ours'] != p['torch']:
        failures.append(f'queue_ptr {p["ours"]} vs reference {p["torch"]}')
      summary.append(f'  queue_ptr     ours {p["ours"]}, reference {p["torch"]}')
      continue
    expected_static = STATIC[method].get(group, set())
    static = {k for k, e in entries.items() if e['abs_change_torch'] <= STATIC_ABS}
    if static != expected_static:
      failures.append(f'{group}: tensors that did not move in the reference {sorted(static)}; '
                      f'expected {sorted(expected_static)}')
    for k, e in entries.items():
      if k in static:
        if e['abs_change_ours'] > STATIC_ABS:
          failures.append(f'{group} {k}: moved by {e["abs_change_ours"]:.3e} in ours, '
                          f'{e["abs_change_torch"]:.3e} in the reference (zero gradient)')
        continue
      if e['err'] > TOL:
        failures.append(f'{group} {k}: relative error {e["err"]:.3e} > {TOL}')
      if e['delta_err'] > TOL_UPDATE:
        failures.append(f'{group} {k}: update relative error {e["delta_err"]:.3e} > '
                        f'{TOL_UPDATE} (moved {e["moved"]:.3e})')
    moving = [e for k, e in entries.items() if k not in static]
    moved = np.array([e['moved'] for e in moving])
    summary.append(f'  {group:12s}  {len(entries):3d} tensors | max rel err '
                   f'{max(e["err"] for e in moving):.2e} | max update rel err '
                   f'{max(e["delta_err"] for e in moving):.2e} | moved median '
                   f'{np.median(moved):.2e} min {moved.min():.2e}'
                   + (f' | {len(static)} static' if static else ''))
    # Not vacuous: the network, its BN statistics and the queue moved far beyond the tolerance.
    # (The EMA target moves (1 - tau) as much, less than TOL for MoCo's m = 0.999; the update
    # check above is what tests it.)
    if group in ('online', 'bn_mean', 'bn_var', 'queue') and np.median(moved) < 100 * TOL:
      failures.append(f'{group}: median relative movement {np.median(moved):.2e} < {100 * TOL}: '
                      'the comparison would be vacuous')

  secs = res['seconds']
  print(f'\n{method}: ours {secs["ours"]:.0f}s (first step incl. compile '
        f'{secs["ours_first_step"]:.0f}s), reference {secs["torch"]:.0f}s')
  print('\n'.join(summary))
  print('  losses ours     ', [f'{m["loss"]:.10f}' for m in ours])
  print('  losses reference', [f'{m["loss"]:.10f}' for m in theirs])
  assert not failures, f'{method}: {len(failures)} mismatches:\n' + '\n'.join(failures[:40])


def test_byol_golden_trajectory(tmp_path):
  check(run_worker('byol', tmp_path), 'byol')


def test_moco_v2_golden_trajectory(tmp_path):
  check(run_worker('moco', tmp_path), 'moco')
