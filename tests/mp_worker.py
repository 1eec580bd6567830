"""One process of the multi-process test (run by tests/test_multiprocess.py, not by pytest).

    python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process has 2 CPU devices (XLA_FLAGS set by the caller); together they form one 'data'
mesh of 4 global devices. Every process feeds the rows the input pipeline gives it for its
process index (real CIFAR-10); process 0 writes the per-step losses and the final parameters.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssl_jax  # noqa: E402,F401  (first, as in conftest: its XLA:CPU defaults precede the backend)
import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.config.update('jax_threefry_partitionable', True)
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=nproc,
                           process_id=pid)

import mp_common  # noqa: E402

losses, params = mp_common.run_steps(process_index=pid, process_count=nproc)
if pid == 0:
  np.savez(out, losses=np.asarray(losses), **{f'p{i}': p for i, p in enumerate(params)})
jax.distributed.shutdown()
