"""Orbax checkpoints in ``WORKDIR/checkpoints``: save, auto-resume, and never lose the last good one.

* Saves are asynchronous (``CheckpointManager`` with ``enable_async_checkpointing``); Orbax
  writes each step to a temporary directory and renames it only when complete, so a write cut
  by a crash or a preemption never looks like a checkpoint.
* On restore we try the newest step first; a checkpoint whose files are damaged (truncated,
  missing, undecodable) is skipped with a warning naming its directory, and the previous one is
  tried, down to a fresh start. Damaged steps are never deleted by us.
* What is saved: the whole ``TrainState`` (params, EMA target, optimizer, method state — queues,
  banks, centroids — probe, RNG) and a JSON ``meta`` with the step, the epoch and the config
  fingerprint. The input-pipeline position is the step: the pipeline is deterministic in
  (seed, step).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ssl_jax import config_lib, paths

# Fields that may change between a run and its resume without changing its results: these keys,
# and every key under these prefixes (an evaluator only reads the state, so any evals.* field --
# an evaluator's cadence, sizes, settings, or the whole entry -- may change).
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint.every_steps', 'checkpoint.keep',
                     'checkpoint.async_save', 'score_hist_every_steps', 'data.data_dir',
                     'data.folder_root', 'profile_steps', 'profile_start_step',
                     'replica_program')   # how the replicas' step is compiled, not what it does
RESUMABLE_PREFIXES = ('evals.',)


def resumable(key: str) -> bool:
  """True when the flattened config ``key`` may change across a resume."""
  return key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_PREFIXES)


class ConfigMismatchError(RuntimeError):
  pass


class CheckpointError(RuntimeError):
  """A promised checkpoint was not written; the message names the step and the directory."""


class WorkdirError(OSError):
  """The workdir cannot be created or written; the message names it and the reason."""


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
  else:
    out[prefix[:-1]] = d
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What every checkpoint's meta carries about its config: the method, the whole config and a
  fingerprint (sha256 of the config without the :func:`resumable` keys), so a workdir whose
  config.json is lost still knows what wrote it."""
  cfg = config_to_dict(config)
  kept = {k: v for k, v in _flatten(cfg).items() if not resumable(k)}
  digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
  return {'config_method': config.method.name, 'config_fingerprint': digest, 'config': cfg}


def _newest_meta(workdir: str) -> tuple[dict[str, Any] | None, str]:
  """The meta JSON of the newest checkpoint that has a readable one, and its path."""
  for step in reversed(checkpoint_steps(workdir)):
    path = paths.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')
    try:
      return paths.read_json(path), path
    except Exception:  # noqa: BLE001 — a damaged step: try the previous one
      continue
  return None, paths.join(workdir, 'checkpoints')


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, *,
                         allow_config_change: bool = False) -> None:
  """Refuse a workdir written by a different config (unless ``allow_config_change``).

  The first run writes ``WORKDIR/config.json``; later runs compare against it when the workdir
  holds a checkpoint (without one there is nothing to resume and the new config replaces the
  old). When config.json is missing the newest checkpoint's meta (:func:`config_meta`) is the
  reference; a corrupt config.json is an error naming it. :func:`resumable` keys (logging,
  checkpoint cadence, evaluators, data location) may differ. Checkpoints of another method cannot be
  resumed at all: ``allow_config_change`` does not change that.
  """
  path = paths.join(workdir, 'config.json')
  new = _flatten(config_to_dict(config))
  if not has_checkpoints(workdir):
    if paths.exists(path):
      # A run that stopped before its first save (a NaN, a crash): nothing to resume, so
      # nothing to protect; this run starts fresh and its config replaces the old one.
      logging.warning('%s has a config.json but no checkpoint: starting fresh with this config.',
                      workdir)
  else:
    method_only = False
    if paths.exists(path):
      old_cfg, source = _read_config_json(path), path
    else:
      meta, source = _newest_meta(workdir)
      old_cfg = (meta or {}).get('config')
      if old_cfg is None:   # checkpoints from before metas carried the config
        old_cfg = {'method': {'name': (meta or {}).get('config_method', '<unknown>')}}
        method_only = True
        if not allow_config_change:
          raise ConfigMismatchError(
              f'{path} is missing and the checkpoints in {workdir} do not record their config, '
              'so this config cannot be checked against them. Accepted: restore config.json, '
              'a new --workdir, or --allow_config_change to resume anyway.')
      _print(f'{path} is missing: checking this config against the checkpoint\'s own record '
             f'({source}).')
    old = _flatten(old_cfg)
    old_method, new_method = old.get('method.name'), new.get('method.name')
    if old_method != new_method:
      raise ConfigMismatchError(
          f'the checkpoints in {workdir} are of method {old_method!r}, which {new_method!r} '
          'cannot load (another network and state). Accepted: a new --workdir, or the same '
          'method.')
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k, '<missing>') != new.get(k, '<missing>')
                  and not resumable(k))
    if method_only:
      diff = []   # only the method is known (an old checkpoint): nothing more to compare
    if diff and not allow_config_change:
      details = '; '.join(f'{k}: {old.get(k, "<missing>")!r} -> {new.get(k, "<missing>")!r}'
                          for k in diff[:10])
      raise ConfigMismatchError(
          f'workdir {workdir} belongs to a different config ({len(diff)} keys differ: {details}). '
          'Accepted: a new --workdir, the same config, or --allow_config_change to resume anyway.')
    if diff:
      logging.warning('Resuming %s with a changed config (--allow_config_change): %s', workdir, diff)
  if jax.process_index() == 0:
    try:
      paths.write_json(path, config_to_dict(config))   # whole or not at all (paths docstring)
    except OSError as e:
      raise WorkdirError(f'--workdir={workdir} cannot be written ({e.strerror or e}); choose a '
                         'directory you can write to.') from e


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def has_checkpoints(workdir: str) -> bool:
  """True when ``WORKDIR/checkpoints`` holds at least one step directory."""
  return any(n.isdigit() for n in paths.listdir(paths.join(workdir, 'checkpoints')))


class Checkpointer:
  """Thin wrapper around ``ocp.CheckpointManager`` with skip-damaged restore."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = paths.join(paths.absolute(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Start the save of ``step``; a save Orbax declines is an error, never a silent skip."""
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if not saved:
      existing = step in self.steps()
      raise CheckpointError(
          f'the checkpoint of step {step} was not written to {self.directory}'
          + (f': a checkpoint {step} already exists there (from an earlier run); '
             'move it away or use a new --workdir.' if existing else
             ' (Orbax declined the save).'))
    return True

  def require_saved(self, step: int) -> None:
    """After ``wait()``: the checkpoint of ``step`` exists, or the run fails loudly."""
    if step not in self.steps():
      raise CheckpointError(f'the final checkpoint (step {step}) is missing from '
                            f'{self.directory} after the run; it was not written.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Newest checkpoint that restores cleanly, or None. Damaged ones are skipped with a warning."""
    _quiet_closed_event_loop()
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = restored['state'], restored['meta']
        _check_finite_step(state, step)
        return state, meta
      except Exception as e:  # noqa: BLE001 — any failure means this checkpoint is unusable
        aside = self._move_aside(step)
        logging.info('Checkpoint %s is damaged, incomplete or of another config and is '
                        'skipped (%s: %s); moved to %s; trying the previous one.',
                        paths.join(self.directory, str(step)), type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else '', aside)
        print(f'WARNING: skipping damaged checkpoint {paths.join(self.directory, str(step))} '
              f'({type(e).__name__}); moved aside to {aside} (kept, never deleted)', flush=True)
    return None

  def _move_aside(self, step: int) -> str:
    """Rename an unrestorable step directory to ``damaged-<step>[-n]`` so that step can be
    saved again; every process agrees before and after process 0 renames it."""
    src = paths.join(self.directory, str(step))
    dst = paths.join(self.directory, f'damaged-{step}')
    n = 1
    while paths.exists(dst):
      dst = paths.join(self.directory, f'damaged-{step}-{n}')
      n += 1
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'ssl_jax_move_aside_{step}')
    if jax.process_index() == 0 and paths.exists(src):
      paths.move_dir(src, dst)   # atomic locally; copy + delete on gs:// (paths docstring)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'ssl_jax_moved_aside_{step}')
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


_QUIET_LOOP = []


def _quiet_closed_event_loop() -> None:
  """After a restore fails part-way, tensorstore completes the reads still in flight on its own
  threads and calls back into the asyncio loop that Orbax has already closed: every callback's
  ``RuntimeError('Event loop is closed')`` reaches ``sys.unraisablehook`` (hundreds of tracebacks
  around a correct recovery). From the first damaged checkpoint on, those — and only those —
  are dropped; every other unraisable exception is printed as before."""
  if _QUIET_LOOP:
    return
  default = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    default(unraisable)

  sys.unraisablehook = hook
  _QUIET_LOOP.append(hook)


def _check_finite_step(state: Any, step: int) -> None:
  # A replicas run's step has a replica axis; a frozen replica's lags behind the directory's.
  got = int(np.max(jax.device_get(state.step)))
  if got != step:
    raise ValueError(f'state.step={got} does not match the checkpoint directory step {step}')


# =============================================================================================
# Reading a finished training run (offline evals, export): no TrainState, no method code
# =============================================================================================
WEIGHTS = ('online', 'target')


class PretrainedNotFound(FileNotFoundError):
  """WORKDIR holds no usable training run; the message says what is missing."""


def _log(msg: str) -> None:
  logging.warning(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def checkpoint_steps(workdir: str) -> list[int]:
  """Completed checkpoint steps in ``WORKDIR/checkpoints``, ascending (temporary dirs skipped)."""
  root = paths.join(workdir, 'checkpoints')
  steps = []
  for name in paths.listdir(root):
    if re.fullmatch(r'\d+', name) and paths.isdir(paths.join(root, name, 'state')):
      steps.append(int(name))
  return sorted(steps)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    raise PretrainedNotFound(
        f'{path} does not exist: --config.pretrained={workdir!r} is not a training workdir. '
        'Accepted: the --workdir of a `python -m ssl_jax.main --mode=train` run (it holds '
        'config.json and checkpoints/<step>/).')
  return ml_collections.ConfigDict(_read_config_json(path))


def _read_config_json(path: str) -> dict[str, Any]:
  try:
    return paths.read_json(path)
  except json.JSONDecodeError as e:
    raise WorkdirError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}); restore it from '
                       'a copy, or move it away to start this workdir afresh.') from e


def replica_index(config: ml_collections.ConfigDict, replica: Any, workdir: str, *,
                  every: bool = False) -> int | None:
  """The eval config's ``replica`` checked against the training run's ``config``: the replica
  whose slice to read, or None for a run without replicas (its state is read as stored).

  A replicas run (``config.replicas = S > 1``) stores every state leaf with a leading replica
  axis of size S; replica r (seed ``config.seed + r``) is read with ``replica=r``, 0 <= r < S.
  ``-1`` (every replica) is accepted only when ``every`` (the evaluation modes spread it over
  the replicas, ``ssl_jax.evals.replicas``) and is then returned as is; one network cannot be
  read with it. On a run without replicas -1 and 0 both read the run itself.
  """
  n = int(config.get('replicas', 1))
  integer = isinstance(replica, int) and not isinstance(replica, bool)
  if n == 1:
    config_lib.require(integer and replica in (-1, 0), 'replica', replica,
                       f'-1 or 0 ({workdir} was trained without replicas)')
    return None
  if replica == -1 and not every:
    raise config_lib.ConfigError(
        f'config.replica=-1 (every replica) reads no single network: {workdir} holds {n} '
        f'replicas (trained with --config.replicas={n}); add --config.replica=r with r one of '
        f'{", ".join(map(str, range(n)))} (replica r: seed {config.get("seed", 0)} + r).')
  config_lib.require(integer and (-1 if every else 0) <= replica < n, 'replica', replica,
                     f'{"-1 (every replica) or " if every else ""}0..{n - 1} ({workdir} was '
                     f'trained with --config.replicas={n})')
  return replica


def take_replica(tree: Any, index: int) -> Any:
  """Replica ``index``'s slice of every leaf (host copies: the other replicas' are freed)."""
  def take(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise CheckpointError(f'state leaf {jax.tree_util.keystr(path)} has no replica axis '
                            f'(shape {x.shape}); the checkpoint is not a replicas run\'s.')
    return np.array(x[index])
  return jax.tree_util.tree_map_with_path(take, tree)


def replica_config(config: ml_collections.ConfigDict, index: int) -> ml_collections.ConfigDict:
  """The training config replica ``index`` would have had as a single run (seed + index,
  replicas 1), with ``replica_of``: the run's replica count (where it came from)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = int(config.get('seed', 0)) + index
  c.replica_of = int(config.replicas)
  c.replicas = 1
  return c


def restore_state(workdir: str, *, step: int | None = None,
                  items: tuple[str, ...] = ('step', 'params', 'batch_stats'),
                  replica: int | None = None) -> tuple[dict[str, Any], int]:
  """The raw ``state`` pytree (nested dicts of numpy arrays) of checkpoint ``step``.

  ``step=None``: the newest checkpoint that restores (a damaged one is skipped with a warning).

  Restores only the top-level entries in ``items`` (e.g. 'params', 'batch_stats',
  'target_params', 'probe_params'); an empty tuple restores everything.

  ``replica``: None reads the state as stored (a replicas run's leaves keep their leading
  replica axis); an int is an eval config's ``replica`` (:func:`replica_index`): replica r's
  slice of every leaf of a replicas run, the state as stored for a run without replicas.
  """
  index = None if replica is None else replica_index(read_config(workdir), replica, workdir)
  state, step = _restore_newest(workdir, step, items)
  return (state if index is None else take_replica(state, index)), step


def _restore_newest(workdir: str, step: int | None, items: tuple[str, ...]
                    ) -> tuple[dict[str, Any], int]:
  steps = checkpoint_steps(workdir)
  if not steps:
    raise PretrainedNotFound(
        f'No checkpoint in {paths.join(workdir, "checkpoints")} (expected '
        'checkpoints/<step>/state from a training run). Train first, or point '
        '--config.pretrained at a workdir that has one.')
  if step is not None:
    if step not in steps:
      raise PretrainedNotFound(f'checkpoint step {step} is not in {workdir}/checkpoints; '
                               f'accepted: {steps}')
    return _restore_step(workdir, step, items), int(step)
  # Newest first; a damaged checkpoint is skipped with a warning (as the trainer's resume does).
  _quiet_closed_event_loop()
  for i, s in enumerate(reversed(steps)):
    try:
      return _restore_step(workdir, s, items), int(s)
    except PretrainedNotFound:
      raise
    except Exception as e:  # noqa: BLE001 — any failure means this checkpoint is unusable
      if i == len(steps) - 1:
        raise
      _log(f'WARNING: checkpoint {workdir}/checkpoints/{s} could not be restored '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}); '
          'trying the previous one.')
  raise AssertionError('unreachable')


class _ItemMetadataFilter(logging.Filter):
  """Orbax warns ``Metadata file does not exist: .../<step>/state/_CHECKPOINT_METADATA`` on every
  item-level restore: that file lives one level up, in the step directory, by design. Only that
  expected line is dropped; every other Orbax warning is kept."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith('Metadata file does not exist')
                and msg.endswith('state/_CHECKPOINT_METADATA'))



def _restore_step(workdir: str, step: int, items: tuple[str, ...]) -> dict[str, Any]:
  """The filter on absl's logger is installed for this restore only (none at import)."""
  absl_logger = logging.getLogger('absl')
  quiet = _ItemMetadataFilter()
  absl_logger.addFilter(quiet)
  try:
    return _restore_step_items(workdir, step, items)
  finally:
    absl_logger.removeFilter(quiet)


def _restore_step_items(workdir: str, step: int, items: tuple[str, ...]) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = paths.join(paths.absolute(workdir), 'checkpoints', str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, 'item_metadata', tree)
  tree = getattr(tree, 'tree', tree)
  missing = [k for k in items if k not in tree]
  if missing:
    raise PretrainedNotFound(f'checkpoint {path} has no {missing}; it holds {sorted(tree)}.')
  wanted = {k: tree[k] for k in items} if items else dict(tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  try:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=bool(items)))
  except Exception:  # noqa: BLE001 — older Orbax layouts: restore everything, then select
    full_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree))
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=full_args))
    return {k: state[k] for k in (items or state)}


def load_pretrained(workdir: str, *, weights: str = 'online', step: int | None = None,
                    replica: int = -1) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
  """``(config, params, batch_stats, step)`` of the newest checkpoint of a training run.

  ``params``/``batch_stats`` are the whole network's (``'backbone'``, ``'projector'``, ...), as
  numpy. ``weights='online'`` (default: the online network, which BYOL/MoCo evaluate) or
  ``'target'`` (the EMA target; BatchNorm statistics are the online network's).
  ``replica`` (:func:`replica_index`): on a replicas run, replica r's network, with the config
  that replica would have had as a single run (:func:`replica_config`); a replica frozen
  after a NaN (its step behind the checkpoint's) is read too, with a warning naming it.
  ``step`` is the checkpoint's (its directory).
  Raises ``PretrainedNotFound`` when WORKDIR has no config.json or no checkpoint.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r} is invalid; accepted: {", ".join(WEIGHTS)}')
  config = read_config(workdir)
  index = replica_index(config, replica, workdir)
  key = 'params' if weights == 'online' else 'target_params'
  state, step = _restore_newest(workdir, step, ('step', key, 'batch_stats'))
  if index is not None:
    steps = np.atleast_1d(state['step'])
    state, config = take_replica(state, index), replica_config(config, index)
    if int(steps[index]) < int(steps.max()):
      _log(f'WARNING: replica {index} (seed {config.seed}) of {workdir} was frozen after step '
           f'{int(steps[index])} (NaN or Inf at step {int(steps[index]) + 1}); checkpoint '
           f'{step} holds its state after step {int(steps[index])}, which is what is read.')
  return config, state[key], state.get('batch_stats', {}), step
