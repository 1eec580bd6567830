"""``TrainState``: everything a step reads and writes, as one pytree.

The whole state goes into one Orbax checkpoint, so a resumed run has the same parameters,
target, optimizer moments, method state (queues, banks, centroids) and RNG; the input
pipeline position is the step itself (the pipeline is deterministic given (seed, step)).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimizer steps taken
  params: Any                     # online network (backbone + heads)
  batch_stats: Any                # BatchNorm running statistics of the online network
  target_params: Any              # EMA target (same tree as params)
  opt_state: Any
  method_state: dict[str, Any]    # queues / banks / centroids, placed by the method's specs
  probe_params: Any               # online linear probe on stop-gradient features
  probe_opt_state: Any
  rng: jax.Array                  # base key; step keys are fold_in(rng, step)


def _name(path) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def method_state_shardings(abstract_method_state: Any, mesh: Mesh, specs: Any) -> Any:
  """``NamedSharding`` per method-state entry from the method's declared ``specs``.

  ``specs`` is ``Method.state_specs()``: a tree with the structure of the state (a spec may
  stand for a whole subtree, e.g. one ``P('data')`` for every level's queue) whose leaves are
  ``P('data')`` (sharded on the leading axis) or ``P()`` (replicated). An entry declared
  ``P('data')`` whose leading size does not divide the mesh's 'data' axis is an error naming
  the entry, its size and the device count (``config_lib.ConfigError``): it is never
  replicated in silence.
  """
  from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
  n = mesh.shape[sharding.DATA]
  is_spec = lambda x: isinstance(x, P)   # noqa: E731
  try:
    spec_tree = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), specs,
                             abstract_method_state, is_leaf=is_spec)
  except (ValueError, TypeError) as e:
    raise ValueError(f'the method\'s state_specs() do not match its init_state() entries '
                     f'{sorted(abstract_method_state)}: {e}') from None

  def place(path, spec, x):
    if spec not in (P(), P(sharding.DATA)):
      raise ValueError(f'method state {_name(path)!r}: spec {spec} is invalid; accepted: '
                       f"P('data'), P()")
    if spec == P(sharding.DATA):
      rows = x.shape[0] if x.shape else None
      if rows is None or rows % n:
        up = -(-(rows or 1) // n) * n
        raise config_lib.ConfigError(
            f'method state {_name(path)!r} has {rows} rows, which do not divide over the {n} '
            f"devices of the mesh's 'data' axis; accepted: a multiple of {n} (e.g. {up}): set "
            'the config.method size it comes from, or run on a device count that divides it')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(place, spec_tree, abstract_method_state,
                                          is_leaf=is_spec)


def state_shardings(abstract_state: TrainState, mesh: Mesh, method_specs: Any) -> TrainState:
  """Replicate parameters and optimizer state; place method state by ``method_specs``
  (``Method.state_specs()``, see ``method_state_shardings``)."""
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  method = method_state_shardings(abstract_state.method_state, mesh, method_specs)
  return shardings.replace(method_state=method)

