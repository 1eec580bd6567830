"""The rows of ``benchmarks/device_suite.py`` (the runner: arguments, import gates, the compile
phase, the row loop and the table).

* ``common.py``: the result :class:`~device_rows.common.Row`, interleaved timing, formatting.
* ``jax_steps.py``: our train steps (a method preset on synthetic data, compiled in a thread).
* ``torch_peers.py``: what the PyTorch peers share (torchvision ResNet, heads, probe, EMA).
* one module per row: ``byol.py``, ``supervised.py`` (with ``ssl_sup_ratio`` and
  ``nvidia_context``), ``methods.py`` (``moco``, ``msf``, ``clim``), ``aps.py`` (with
  ``vit_full``), ``knn.py``, ``kmeans.py``, ``replicas.py`` (``replicas``, ``replicas_S``);
  each docstring says what its row measures.

Every module imports only the standard library at load time: jax, torch and ssl_jax come in
through the suite object or inside the functions, after the runner's import gates
(``--block_tf``, ``--vendored_only``) and after JAX has started its GPU backend.
"""
