"""ssl_jax's XLA:CPU default (no YNNPACK convolutions): set once, never over a user's choice."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

import conftest

pytestmark = pytest.mark.slow   # each check starts a Python subprocess

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
PROBE = ('import os, ssl_jax, jax.numpy as jnp; '
         'print("SUM", float(jnp.ones(3).sum())); print("FLAGS", os.environ.get("XLA_FLAGS", ""))')


def _run(env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'SSL_JAX_XLA_CPU_DEFAULTS')}
  env.update(env_changes)
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=conftest.REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  lines = dict(line.split(' ', 1) for line in out.stdout.splitlines() if ' ' in line)
  assert lines.get('SUM') == '3.0', out.stdout + out.stderr[-2000:]
  return next(line[6:] for line in out.stdout.splitlines() if line.startswith('FLAGS'))


def test_default_is_added_and_accepted_by_xla():
  flags = _run({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert '--xla_force_host_platform_device_count=2' in flags
  measured_on = metadata.version('jaxlib').split('.')[:2] == ['0', '10']
  # Added (and accepted: the probe ran an op) on the jaxlib it was measured on; never elsewhere.
  assert (f'{FLAG}=individual_dot' in flags) == measured_on


def test_user_choice_and_opt_out_are_respected():
  assert _run({'XLA_FLAGS': f'{FLAG}='}).split() == [f'{FLAG}=']
  assert FLAG not in _run({'SSL_JAX_XLA_CPU_DEFAULTS': '0'})
