"""Random choice among selected candidates (CLIM's and CsMl's mixing partners)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_selected(rng: jax.Array, indices: jax.Array, keep: jax.Array,
                    fallback: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One index per row, uniform over the kept candidates, else the fallback::

      u_bm ~ U(0, 1) iid,   m*_b = argmax_m { u_bm : keep_bm }
      chosen_b = indices[b, m*_b]  if any_m keep_bm  else  fallback_b

  ``indices`` [B, M] int, ``keep`` [B, M] bool, ``fallback`` [B] int (e.g. the row itself).
  Returns (chosen [B] int32, has_selection [B] bool). The uniform draws are one ``[B, M]``
  array from ``rng``, so the choice does not depend on how the rows are sharded.
  """
  u = jax.random.uniform(rng, keep.shape)
  pick = jnp.argmax(jnp.where(keep, u, -1.0), axis=1)
  chosen = jnp.take_along_axis(indices, pick[:, None], axis=1)[:, 0]
  has = jnp.any(keep, axis=1)
  return jnp.where(has, chosen, jnp.asarray(fallback, jnp.int32)).astype(jnp.int32), has


__all__ = ['sample_selected']
