"""Two local processes (gloo CPU collectives, 2 devices each) == one process with 4 devices."""
import os
import socket
import subprocess
import sys

import numpy as np

import mp_common

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_four_devices(tmp_path):
  out = str(tmp_path / 'mp.npz')
  port = _free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '').replace(
      '--xla_force_host_platform_device_count=4', '') +
      ' --xla_force_host_platform_device_count=2')
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ.get('SSL_JAX_TEST_CACHE',
                                                    '/tmp/ssl_jax_test_jax_cache')
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'mp_worker.py'), str(i), '2',
                             str(port), out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  multi = np.load(out)
  losses, params = mp_common.run_steps(process_index=0, process_count=1)
  np.testing.assert_allclose(multi['losses'], losses, rtol=1e-5, atol=1e-5)
  assert len(params) == len([k for k in multi.files if k.startswith('p')])
  for i, p in enumerate(params):
    np.testing.assert_allclose(multi[f'p{i}'], p, rtol=1e-5, atol=1e-5)
  # The losses moved: the test compares a real trajectory, not three copies of the init.
  assert len(set(np.round(losses, 6))) == len(losses)
