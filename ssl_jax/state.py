"""``TrainState``: everything a step reads and writes, as one pytree.

The whole state goes into one Orbax checkpoint, so a resumed run has the same parameters,
target, optimizer moments, method state (queues, banks, centroids) and RNG; the input
pipeline position is the step itself (the pipeline is deterministic given (seed, step)).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ssl_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimizer steps taken
  params: Any                     # online network (backbone + heads)
  batch_stats: Any                # BatchNorm running statistics of the online network
  target_params: Any              # EMA target (same tree as params)
  opt_state: Any
  method_state: dict[str, Any]    # queues / banks / centroids (global, sharded along 'data')
  probe_params: Any               # online linear probe on stop-gradient features
  probe_opt_state: Any
  rng: jax.Array                  # base key; step keys are fold_in(rng, step)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Replicate parameters and optimizer state; shard method-state arrays on their leading axis."""
  n = mesh.shape[sharding.DATA]
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  method = jax.tree.map(lambda x: NamedSharding(mesh, sharding.leading_axis_spec(x, n)),
                        abstract_state.method_state)
  return shardings.replace(method_state=method)


def zeros_like_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
  return {k: jnp.zeros_like(v) for k, v in metrics.items()}
