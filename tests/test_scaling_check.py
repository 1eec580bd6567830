"""``benchmarks/scaling.py --check`` as a regression check, at a size this machine compiles:
every method's full train step (ResNet-18 for the ResNet methods, 224 px, global batch 4096) on
8 simulated chips moves no more than its gradients + BatchNorm statistics + O(batch x dim); and
the check fails on a step that moves a queue across chips (FT with the whole-queue
permutation)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import conftest

SCRIPT = str(conftest.REPO / 'benchmarks' / 'scaling.py')


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # the script sets its own
  return subprocess.run([sys.executable, SCRIPT, '--check', '--chips', '8', '--backbone',
                         'resnet18', *args], env=env, capture_output=True, text=True,
                        timeout=3600, check=False)


@pytest.mark.slow
def test_every_method_within_its_budget_at_8_chips():
  out = _run('--methods', 'byol,moco,ft,msf,clim,csml,aps')
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  assert 'OK: every method within its budget.' in out.stdout
  for name in ('byol', 'moco', 'ft', 'msf', 'clim', 'csml', 'aps'):
    assert f'| {name} | 8 | all |' in out.stdout, name


@pytest.mark.slow
def test_check_fails_when_a_queue_crosses_chips():
  out = _run('--methods', 'ft', '--set', 'method.interp_pool=-1')
  assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
  assert 'FAILED' in out.stdout and 'ft at 8 chips (BN group all): one collective moves' \
      in out.stdout, out.stdout[-3000:]
  assert 'the permuted queue' in out.stdout      # the method's own warning, printed
