"""Run by tests/slurm/fake_bin/srun in place of the trainer (tests/test_slurm.py): given the
trainer's command (``python -m ssl_jax.main FLAGS...``), parse its flags and call the trainer's own
``jax.distributed`` start-up with the task's Slurm environment, then gather every process's index
across processes (gloo on CPU) and write what JAX derived from SLURM_* to
``$FAKE_SRUN_LOG/probe_<SLURM_PROCID>.json``."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
command = sys.argv[1:]
assert command[:3] == ['python', '-m', 'ssl_jax.main'], command

from absl import flags  # noqa: E402

from ssl_jax import main  # noqa: E402

flags.FLAGS(['ssl_jax.main', *command[3:]])
main._maybe_initialize_distributed()  # pylint: disable=protected-access

import jax  # noqa: E402
from jax._src import distributed, xla_bridge  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

gathered = multihost_utils.process_allgather(np.array([jax.process_index()], np.int32))
with open(os.path.join(os.environ['FAKE_SRUN_LOG'], f'probe_{os.environ["SLURM_PROCID"]}.json'),
          'w') as f:
  json.dump({
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'coordinator_address': distributed.global_state.coordinator_address,
      'cuda_visible_devices': xla_bridge.CUDA_VISIBLE_DEVICES.value,
      'gathered': np.asarray(gathered).ravel().tolist(),
  }, f)
jax.distributed.shutdown()
