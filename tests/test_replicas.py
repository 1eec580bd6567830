"""Replicas (``--config.replicas=S``): S seeds trained in one compiled step.

Replica r must be the single run with seed ``seed + r``: its init, data order, augmentation and
the method's randomness. The step-level tests take a few steps of every method with 3 replicas
and of the 3 single runs (seeds 0, 1, 2) on the same per-replica batches and compare losses,
every metric and the whole state (params, EMA target, BatchNorm statistics, optimizer state,
queues / banks / centroids, the online probe, step, key).

Two programs (``config.replica_program``). ``'unroll'`` (the CPU default) writes the one-seed
step once per replica: at these sizes replica r is the single run bit for bit, every leaf and
metric (tested for MoCo on 2 devices and CsMl on 1; measured on MoCo on 1 device too). At the
quick preset's sizes it is not (README): there it agrees to rounding, like vmap. ``'vmap'`` (the GPU/TPU default) batches the replicas;
the per-method tests below run it, with these tolerances:

Tolerance. The vmapped step is another XLA program than the single step (a vmapped
convolution or matmul sums in another order): the two agree to float32 rounding, not bit for
bit. The loss is continuous in the parameters and agrees to ~1e-7; its gradient is not
(ReLU kinks, nearest-neighbour and top-k choices in MSF / CLIM / CsMl): now and then a
last-bit difference flips a near-tie, which changes one row's share of the gradient (up to
~1/batch of it) while the loss stays equal. So each float leaf's difference (beyond 4 ulps of
its value) is measured against the largest update over the run (``|final - init|``) in its
TrainState field, and two numbers are checked per replica: the median leaf (rounding; tight)
and the worst leaf (a flip; up to a few % of the update). Measured on this CPU over the 7
methods x 3 replicas (and MoCo on 2 devices), 3 steps, batch 32, printed by ``pytest -s``:

  loss            <= 2.1e-7 relative                                   -> LOSS_TOL   2e-6
  other metrics   <= 5.4e-5; 2.5e-4 with a flip (CsMl grad_norm)       -> METRIC_TOL 3e-3
  median leaf     <= 2.3e-7 of the update; 4.8e-6 with a flip          -> MEDIAN_TOL 5e-5
  worst leaf      <= 8.6e-6; 1.1e-3 (MoCo) and 1.2e-2 (CsMl) with flips -> STATE_TOL  0.1

For scale, a replica scored against the wrong seed's run: worst 8e3, median 0.35-0.58 of the
update; against its own run one step short: worst ~1, median 0.12. (At batch 16, with 8 rows
per BatchNorm on 2 devices, flips are larger: 1.5e-2; the same BYOL single run on 1 and on 2
devices differs by 1e-3 in params after 3 steps.) Metrics are relative to their size (floor
1e-2). Integers (step, keys, optimizer counts), the finite flags, lr and tau must be equal, and
each replica's init is the single run's init bit for bit. One kind of leaf is only bounded: a
parameter with no gradient at all (Adam's first moment < 1e-5 of the largest: APS's final
LayerNorm bias, which the projector's BatchNorm makes irrelevant), whose rounding noise Adam
scales to lr-sized steps of random sign.

``replicas=1`` is the plain step bit for bit (the same lowered program). The trainer end to end
(real CIFAR-10): stop and resume equals an uninterrupted replicas run exactly; per-replica
TensorBoard runs; the ``±`` final line. A frozen replica keeps its whole state while the others
go on unchanged; the CLI names it and exits 1. Bad ``replicas`` values are one-line errors
(exit 2).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_steps
from conftest import TFDS_DATA_DIR
from harness import cli_env, load_config, real_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, data, methods, optim, sharding, train

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
METHODS = ('byol', 'moco', 'msf', 'ft', 'clim', 'csml', 'aps')
S = 3          # replicas in the step-level tests
STEPS = 3      # steps per run in the step-level tests
# Tolerances: measured values and reasons in the module docstring.
LOSS_TOL = 2e-6
METRIC_TOL = 3e-3
MEDIAN_TOL = 5e-5
STATE_TOL = 0.1
_ULPS = 4      # float32 ulps of a value that are rounding whatever the update (EMA targets)


# =============================================================================================
# Step level: replica r of a 3-replica step is the single run with seed + r
# =============================================================================================
def _config(method: str, replicas: int = 1, program: str = 'vmap'):
  c = load_config(method, 'cifar10,runlocal')
  c.data.name = 'synthetic'
  c.batch_size = 32   # 16 rows per BatchNorm on 2 devices (8: larger flips, see the top)
  c.replicas = replicas
  c.replica_program = program
  return c


def _batch(c, rs: np.random.RandomState) -> dict:
  """``method_steps.random_batch`` plus the crop geometry the recipe records (APS's boxes
  ``(y0, x0, h, w)`` and flips)."""
  batch = method_steps.random_batch(c, rs)
  b = c.batch_size
  for v in data.resolve_views(c.data):
    if v.box_key:
      hw = rs.uniform(0.4, 1.0, (b, 2))
      batch[v.box_key] = np.concatenate([rs.uniform(0, 1, (b, 2)) * (1 - hw), hw],
                                        -1).astype(np.float32)
    if v.flip_key:
      batch[v.flip_key] = rs.rand(b) < 0.5
  return batch


def _host(state) -> dict[str, np.ndarray]:
  """Every leaf of a TrainState on the host by its path (keys as their key data)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(x))
  return out


class _Runs:
  """The single runs (seeds 0..S-1) and one S-replica run of a method on the same batches."""

  def __init__(self, method: str, n_dev: int, program: str = 'vmap'):
    self.batches, self.single = _single_runs(method, n_dev)
    # The replicated run.
    self.config = _config(method, S, program)
    self.parts, self.mesh = method_steps.build(self.config, n_dev)
    assert self.parts.replicas == S
    with jax.set_mesh(self.mesh):
      state = self.parts.init(train.initial_keys(self.config))
      self.init = _host(state)
      self.metrics, self.states = [], []
      for i in range(STEPS):
        state, m, _ = self.parts.train_step(state, self.batch(i))
        self.metrics.append(jax.device_get(m))
        self.states.append(_host(state))

  def batch(self, i: int):
    """Step ``i``'s replicated batch (placed on the mesh)."""
    return sharding.replica_batch(self.mesh, [self.batches[r][i] for r in range(S)])


@functools.cache
def _single_runs(method: str, n_dev: int):
  """Per seed r < S: its batches and its single run, ``(init leaves, [metrics per step],
  final leaves)`` (one build, a fresh init per seed; shared by both replica programs)."""
  c = _config(method)
  rs = np.random.RandomState(0)
  batches = [[_batch(c, rs) for _ in range(STEPS)] for _ in range(S)]
  parts, mesh = method_steps.build(c, n_dev)
  single = []
  with jax.set_mesh(mesh):
    for r in range(S):
      state = parts.init(jax.random.key(c.seed + r))
      init, ms = _host(state), []
      for b in batches[r]:
        state, m, _ = parts.train_step(state, sharding.global_batch(mesh, b))
        ms.append(jax.device_get(m))
      single.append((init, ms, _host(state)))
  return batches, single


@functools.cache
def _runs(method: str, n_dev: int, program: str = 'vmap') -> _Runs:
  return _Runs(method, n_dev, program)


def _is_exact(x: np.ndarray) -> bool:
  return not np.issubdtype(x.dtype, np.floating)


def _field(path: str) -> str:
  """The TrainState field of a leaf path (``.opt_state[1][0].trace[...]`` -> ``opt_state``)."""
  return path[1:].split('[')[0].split('.')[0]


def _noise_gradient_leaves(state: dict) -> set[str]:
  """Params leaves whose gradient is rounding noise: Adam's first moment of the leaf is below
  1e-5 of the largest (measured: 1e-8 for the one such leaf, 1e-2 for the next smallest). A
  bias right before a normalisation has no gradient (APS: the ViT's final LayerNorm bias feeds
  the projector's BatchNorm, which removes any shift); Adam scales that noise to lr-sized steps
  of random sign, so in any two programs such a leaf moves by as much as the others but
  differently."""
  mus = {k.split('.mu', 1)[1]: np.max(np.abs(v)) for k, v in state.items()
         if '.mu[' in k and v.size}
  top = max(mus.values(), default=0.0)
  return {'.params' + k for k, v in mus.items() if v < 1e-5 * top}


def _state_scores(got: dict, want: dict, init: dict) -> dict[str, float]:
  """Per float leaf: its largest difference beyond ``_ULPS`` float32 ulps of the value,
  relative to the largest update over the run (``|want - init|``) in the leaf's TrainState
  field (a leaf may barely move, e.g. a bias before BatchNorm, whose gradient is ~0). Leaves
  whose gradient is only rounding noise are left out (``_noise_gradient_leaves``)."""
  noise = _noise_gradient_leaves(want)
  floats = [k for k in want if not _is_exact(want[k]) and want[k].size and k not in noise]
  update: dict[str, float] = {}
  for k in floats:
    u = float(np.max(np.abs(want[k].astype(np.float64) - init[k])))
    update[_field(k)] = max(update.get(_field(k), 0.0), u)
  out = {}
  for k in floats:
    g, w = got[k].astype(np.float64), want[k].astype(np.float64)
    beyond = np.abs(g - w) - _ULPS * np.finfo(np.float32).eps * np.abs(w)
    out[k] = float(np.max(beyond, initial=0.0)) / max(update[_field(k)], 1e-30)
  return out


def _metric_score(got, want) -> float:
  got, want = float(got), float(want)
  return abs(got - want) / max(abs(want), 1e-2)


def _compare_replica(runs: _Runs, r: int) -> dict:
  """Replica r against the single run with seed + r: asserts the parts that must be equal and
  returns the measured differences (scores as in ``_state_scores`` / ``_metric_score``)."""
  init, metrics, final = runs.single[r]
  got_init = {k: v[r] for k, v in runs.init.items()}
  got_final = {k: v[r] for k, v in runs.states[-1].items()}
  assert got_final.keys() == final.keys()
  # The init is the single run's init exactly (same key, and init has no vmapped sums).
  for k in init:
    np.testing.assert_array_equal(got_init[k], init[k], err_msg=f'replica {r} init {k}')
  out = {'abs': 0.0}
  for k in final:
    if _is_exact(final[k]):
      np.testing.assert_array_equal(got_final[k], final[k], err_msg=f'replica {r} {k}')
    else:
      out['abs'] = max(out['abs'], float(np.max(np.abs(got_final[k] - final[k]), initial=0)))
  scores = _state_scores(got_final, final, init)
  out['state'] = max((v, k) for k, v in scores.items())
  out['median'] = float(np.median(list(scores.values())))
  for k in _noise_gradient_leaves(final):   # only bounded: within two updates of the field
    bound = 2 * max(np.max(np.abs(final[j] - init[j])) for j in final if _field(j) == 'params')
    assert np.max(np.abs(got_final[k] - final[k])) <= bound, (r, k)
  out['loss'], out['metric'] = 0.0, (0.0, '')
  for i, (got_m, want_m) in enumerate(zip(runs.metrics, metrics)):
    assert got_m.keys() == want_m.keys(), (sorted(got_m), sorted(want_m))
    for k in want_m:
      got = np.asarray(got_m[k])[r]
      if k.startswith('finite/') or k in ('lr', 'tau'):
        assert got == want_m[k], (r, i, k, got, want_m[k])
      elif k == 'loss':
        out['loss'] = max(out['loss'], abs(float(got) / float(want_m[k]) - 1))
      else:
        out['metric'] = max(out['metric'], (_metric_score(got, want_m[k]), f'{k} (step {i + 1})'))
  return out


@pytest.mark.slow
@pytest.mark.parametrize('method,n_dev', [(m, 1) for m in METHODS] + [('moco', 2)])
def test_replica_r_equals_single_run_with_seed_plus_r(method, n_dev):
  runs = _runs(method, n_dev)
  measured = [_compare_replica(runs, r) for r in range(S)]
  for r, d in enumerate(measured):   # printed with pytest -s: the numbers the tolerances rest on
    print(f'\n{method} on {n_dev} device(s), replica {r}: loss {d["loss"]:.1e} relative, '
          f'metric {d["metric"][0]:.1e} ({d["metric"][1]}), state median {d["median"]:.1e} / '
          f'max {d["state"][0]:.1e} of the update ({d["state"][1]}; largest absolute '
          f'difference {d["abs"]:.1e})')
  for r, d in enumerate(measured):
    assert d['loss'] <= LOSS_TOL, (method, n_dev, r, d)
    assert d['metric'][0] <= METRIC_TOL, (method, n_dev, r, d)
    assert d['median'] <= MEDIAN_TOL, (method, n_dev, r, d)
    assert d['state'][0] <= STATE_TOL, (method, n_dev, r, d)


@pytest.mark.slow
@pytest.mark.parametrize('method,n_dev', [('moco', 2), ('csml', 1)])
def test_unrolled_replica_r_is_the_single_run_with_seed_plus_r(method, n_dev):
  """``replica_program='unroll'`` (the CPU default) writes the one-seed step once per replica:
  at these sizes replica r is the single run with seed + r bit for bit -- every state leaf and
  every metric after every step (not at every size: README)."""
  runs = _runs(method, n_dev, 'unroll')
  for r in range(S):
    init, metrics, final = runs.single[r]
    for k in final:
      np.testing.assert_array_equal(runs.init[k][r], init[k], err_msg=f'replica {r} init {k}')
      np.testing.assert_array_equal(runs.states[-1][k][r], final[k], err_msg=f'replica {r} {k}')
    for i, (got_m, want_m) in enumerate(zip(runs.metrics, metrics)):
      assert got_m.keys() == want_m.keys()
      for k in want_m:
        np.testing.assert_array_equal(np.asarray(got_m[k])[r], want_m[k],
                                      err_msg=f'replica {r} step {i + 1} {k}')


def test_replica_program_auto_is_unroll_on_cpu_and_bad_values_are_config_errors():
  c = _config('moco', S, 'auto')
  assert jax.default_backend() == 'cpu' and train.replica_program(c) == 'unroll'
  assert train.replica_program(_config('moco', S, 'vmap')) == 'vmap'
  legacy = _config('moco', S)   # a config from before the field: auto
  with legacy.unlocked():
    del legacy['replica_program']
  assert train.replica_program(legacy) == 'unroll'
  many = _config('moco', config_lib.UNROLL_MAX_REPLICAS + 1, 'auto')   # too many copies: vmap
  assert train.replica_program(many) == 'vmap'
  bad = _config('moco', S, 'pmap')
  with pytest.raises(config_lib.ConfigError, match=r"replica_program.*'pmap'.*auto, vmap, unroll"):
    train.validate_config(bad, num_devices=1)
  bad = _config('moco', config_lib.UNROLL_MAX_REPLICAS + 1, 'unroll')
  with pytest.raises(config_lib.ConfigError, match="compiles one copy of the step per replica"):
    train.validate_config(bad, num_devices=1)


def test_one_replica_is_the_plain_step_bit_for_bit():
  """``replicas=1`` (or a config from before the field) lowers to exactly the program of the
  bare ``make_train_step``, jitted as ``build`` does: no vmap, no replica axis, no freezing."""
  base = _config('moco', 1)
  legacy = _config('moco', 1)
  with legacy.unlocked():
    del legacy['replicas']
  assert train.num_replicas(legacy) == 1
  texts = []
  for c in (base, legacy):
    parts, mesh = method_steps.build(c, 2)
    assert parts.replicas == 1
    assert jax.random.key_data(train.initial_keys(c)).tolist() == jax.random.key_data(
        jax.random.key(c.seed)).tolist()
    batch = sharding.global_batch(mesh, _batch(c, np.random.RandomState(0)))
    with jax.set_mesh(mesh):
      texts.append(parts.train_step.lower(parts.abstract, batch).as_text())
  # The bare step, built and jitted by hand from the same parts.
  method = methods.get(base.method.name)(base, 100)
  lr_fn = optim.lr_schedule(base, 100, 100)
  step_fn = train.make_train_step(method, optim.make_optimizer(base, lr_fn), parts.probe,
                                  optim.probe_optimizer(base), lr_fn,
                                  optim.ema_schedule(base, 100), mesh)
  bare = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(parts.shardings, None, None))
  with jax.set_mesh(mesh):
    texts.append(bare.lower(parts.abstract, batch).as_text())
  assert texts[0] == texts[1] == texts[2]


# ---------------------------------------------------------------------------------------------
# A frozen replica, step level
# ---------------------------------------------------------------------------------------------
def _set_params(state, r: int, params):
  """``state`` with replica ``r``'s params taken from ``params`` (replica axis first)."""
  return state.replace(params=jax.tree.map(lambda x, y: x.at[r].set(y[r]), state.params, params))


@pytest.mark.slow
def test_replica_frozen_keeps_its_state_and_the_others_go_on():
  runs = _runs('moco', 1)
  parts, mesh = runs.parts, runs.mesh
  set_params = jax.jit(_set_params, static_argnums=1, out_shardings=parts.shardings)
  with jax.set_mesh(mesh):
    state = parts.init(train.initial_keys(runs.config))
    state, _, _ = parts.train_step(state, runs.batch(0))
    clean = jax.tree.map(jnp.copy, state.params)
    # Replica 1's params times 1e30: finite, but its forward pass overflows.
    state = set_params(state, 1, jax.tree.map(lambda x: x * 1e30, clean))
    before = _host(state)
    assert all(np.all(np.isfinite(v)) for v in before.values())
    state, m, _ = parts.train_step(state, runs.batch(1))   # replica 1: non-finite, frozen
    flags = jax.device_get({k: v for k, v in m.items() if k.startswith('finite/')})
    assert not all(bool(v[1]) for v in flags.values()), flags
    assert all(bool(v[r]) for v in flags.values() for r in (0, 2)), flags
    after2 = _host(state)
    # Replica 1's params made finite again: its step lags behind the others', so it still
    # takes no update.
    state = set_params(state, 1, clean)
    restored = _host(state)
    state, m, _ = parts.train_step(state, runs.batch(2))
    after3 = _host(state)
  for k in before:
    np.testing.assert_array_equal(after2[k][1], before[k][1], err_msg=f'frozen replica 1: {k}')
    np.testing.assert_array_equal(after3[k][1], restored[k][1], err_msg=f'lagging replica: {k}')
  assert after3['.step'].tolist() == [3, 1, 3]
  # Replicas 0 and 2 are exactly the unpoisoned replicated run (itself the single runs, above).
  for k in runs.states[-1]:
    for r in (0, 2):
      np.testing.assert_array_equal(after3[k][r], runs.states[-1][k][r],
                                    err_msg=f'replica {r}: {k}')


# =============================================================================================
# Per-replica data: replica r reads the single run's (seed + r) batches, from any step
# =============================================================================================
def _real_data(c):
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  c.data.name = 'cifar10'
  c.data.data_dir = TFDS_DATA_DIR
  c.data.train_split = 'train[:128]'
  c.data.shuffle_buffer = 128
  return c


@pytest.mark.slow
def test_replica_batches_are_the_single_runs_batches_and_resume_there():
  c = _real_data(_config('moco', S))
  mesh = sharding.make_mesh(2)
  for start in (0, 9):   # from the start, and resumed at step 9 (past the 8-step epoch)
    stacked = train._global_batches(c, mesh, start)   # pylint: disable=protected-access
    got = [jax.device_get(next(stacked)) for _ in range(2)]
    for r in range(S):
      single = _real_data(_config('moco'))
      single.seed = c.seed + r
      it = train._global_batches(single, mesh, start)   # pylint: disable=protected-access
      for i in range(2):
        want = jax.device_get(next(it))
        assert got[i].keys() == want.keys()
        for k in want:
          np.testing.assert_array_equal(got[i][k][r], want[k], err_msg=f'{start} {r} {i} {k}')
  assert not np.array_equal(got[0]['view1'][0], got[0]['view1'][1])   # the seeds differ


# =============================================================================================
# The trainer end to end (real CIFAR-10): resume, TensorBoard runs, the final line, freezing
# =============================================================================================
E2E = {'replicas': S, 'total_steps': 6, 'batch_size': 16, 'log_every_steps': 1,
       'checkpoint.every_steps': 2, 'checkpoint.async_save': False,
       'evals.knn.at_start': False, 'evals.knn.at_end': True, 'evals.knn.k': 5,
       'evals.knn.train_examples': 128, 'evals.knn.eval_examples': 64,
       'evals.knn.batch_size': 64, 'evals.online_probe.at_start': False,
       'evals.online_probe.at_end': True, 'evals.online_probe.eval_examples': 64,
       'evals.online_probe.batch_size': 64, 'data.train_split': 'train[:256]',
       'data.shuffle_buffer': 256}


def _e2e_config():
  return real_config('moco', E2E)


def _e2e_cli(workdir) -> list[str]:
  return ['--config=configs/moco.py:cifar10,runlocal', f'--workdir={workdir}',
          f'--config.data.data_dir={TFDS_DATA_DIR}'] + [f'--config.{k}={v}' for k, v in E2E.items()]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted 6-step replicas run: (results, workdir)."""
  workdir = str(tmp_path_factory.mktemp('replicas') / 'straight')
  return train.train_and_evaluate(_e2e_config(), workdir), workdir


def _scalars(eventdir: str, tag: str) -> dict[int, float]:
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for f in sorted(os.listdir(eventdir)):
    if f.startswith('events.out'):
      acc = event_accumulator.EventAccumulator(os.path.join(eventdir, f),
                                               size_guidance={'tensors': 0, 'scalars': 0})
      acc.Reload()
      if tag in acc.Tags().get('tensors', []):
        out.update({e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)})
      elif tag in acc.Tags().get('scalars', []):
        out.update({e.step: e.value for e in acc.Scalars(tag)})
  return out


@pytest.mark.slow
def test_replicas_trainer_resume_equals_uninterrupted_and_reports_per_replica(straight,
                                                                                tmp_path):
  ref, ref_dir = straight
  work = str(tmp_path / 'resumed')
  first = train.train_and_evaluate(_e2e_config(), work, stop_at_step=3)
  assert first['preempted_at'] == 3
  second = train.train_and_evaluate(_e2e_config(), work)
  assert second['start_step'] == 3 and second['final_step'] == 6
  # The stopped-and-resumed run is the uninterrupted one exactly: every leaf of every replica,
  # the losses of the steps after the resume and every per-replica evaluator value.
  got, want = _host(second['state']), _host(ref['state'])
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].shape[0] == S, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert second['loss_history'] == ref['loss_history'][3:]
  assert second['final_replicas'] == ref['final_replicas']
  # Per replica: a value each, the mean and the std (ddof=1) over them, and the final line.
  assert ref['replicas'] == S and ref['seeds'] == [0, 1, 2] and ref['frozen_replicas'] == {}
  assert ref['replica_program'] == 'unroll'   # auto on the CPU
  with open(os.path.join(ref_dir, 'results.json')) as f:
    assert json.load(f)['replica_program'] == 'unroll'
  line = ref['final_line']
  assert line.startswith('Final after 6 steps | ') and '±' in line, line
  for k, values in ref['final_replicas'].items():
    assert len(values) == S, (k, values)
    np.testing.assert_allclose(ref['final'][k], np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(ref['final_std'][k], np.std(values, ddof=1), rtol=1e-12)
    per = '(replicas ' + ' / '.join(f'{100 * v:.2f}' for v in values) + ', std ddof=1)'
    mean_std = f'{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}%'
    assert f'{mean_std} {per}' in line, (k, line)
  # TensorBoard: a run per replica (WORKDIR/replica_r), the mean over them in WORKDIR.
  assert sorted(d for d in os.listdir(ref_dir) if d.startswith('replica_')) == [
      f'replica_{r}' for r in range(S)]
  per_replica = [_scalars(os.path.join(ref_dir, f'replica_{r}'), 'loss') for r in range(S)]
  root = _scalars(ref_dir, 'loss')
  assert all(sorted(p) == list(range(1, 7)) for p in per_replica), per_replica
  assert sorted(root) == list(range(1, 7))
  for step in root:
    np.testing.assert_allclose(root[step], np.mean([p[step] for p in per_replica]), rtol=1e-6)
  assert len({p[6] for p in per_replica}) == S   # three different runs
  knn = [_scalars(os.path.join(ref_dir, f'replica_{r}'), 'monitor/knn_top1')[6]
         for r in range(S)]
  np.testing.assert_allclose(knn, ref['final_replicas']['monitor/knn_top1'], rtol=1e-6)


# The CLI with replica 1's params times 1e30 before step 3 (finite; its forward overflows).
_POISON_MAIN = '''
import jax, numpy as np
from ssl_jax import main, train
_fit = train.check_replicas_fit
def check_replicas_fit(*args, **kwargs):   # returns the run's parts, step compiled
  parts = _fit(*args, **kwargs)
  poison = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda x: x.at[1].multiply(1e30),
                                                           s.params)),
                   out_shardings=parts.shardings)
  def step(state, batch):
    if int(np.max(jax.device_get(state.step))) == 2:
      state = poison(state)
    return parts.train_step(state, batch)
  return parts._replace(train_step=step)
train.check_replicas_fit = check_replicas_fit
main.cli()
'''


@pytest.mark.slow
def test_replica_frozen_end_to_end_named_and_cli_exits_1(straight, tmp_path):
  ref_dir = straight[1]
  work = str(tmp_path / 'frozen')
  p = subprocess.run([sys.executable, '-c', _POISON_MAIN] + _e2e_cli(work), check=False,
                     cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
  out, err = p.stdout, p.stderr
  assert p.returncode == 1, out[-3000:] + err[-3000:]
  assert out.count('WARNING: replica 1 (seed 1): ') == 1, out[-3000:]
  assert 'is NaN or Inf at step 3; it is frozen at its state after step 2' in out, out[-3000:]
  assert 'WARNING: 1 of 3 replicas went NaN or Inf and were frozen: replica 1 (seed 1) at step 3' \
      in out, out[-3000:]
  stopped = [l for l in err.splitlines() if l.startswith('Stopped: ')]
  assert len(stopped) == 1 and err.strip().splitlines()[-1] == stopped[0], err[-3000:]
  assert stopped[0].startswith('Stopped: 1 of 3 replicas went NaN or Inf and were frozen '
                               '(replica 1 (seed 1) at step 3); the other 2 finished: '
                               'Final after 6 steps | '), stopped[0]
  with open(os.path.join(work, 'outcome.json')) as f:
    outcome = json.load(f)
  assert (outcome['status'], outcome['exit_code'], outcome['step']) == ('failed', 1, 6), outcome
  # The checkpoint: replicas 0 and 2 are the unpoisoned run exactly; replica 1 holds its whole
  # state after step 2 (its step included), params as poisoned (still finite).
  got, want, frozen = (_flat(ckpt_lib.restore_state(w, step=s, items=())[0])
                       for w, s in ((work, 6), (ref_dir, 6), (ref_dir, 2)))
  assert got.keys() == want.keys() == frozen.keys()
  assert got['.step'].tolist() == [6, 2, 6]
  for k in want:
    for r in (0, 2):
      np.testing.assert_array_equal(got[k][r], want[k][r], err_msg=f'replica {r} {k}')
    expected = frozen[k][1]
    if k.startswith('.params'):
      expected = (expected * np.float32(1e30)).astype(expected.dtype)
      assert np.all(np.isfinite(got[k][1])), k
    np.testing.assert_array_equal(got[k][1], expected, err_msg=f'frozen replica 1 {k}')


def _flat(raw: dict) -> dict[str, np.ndarray]:
  """A restored raw state (nested dicts) by leaf path: ``.step``, ``.params['backbone']...``."""
  return {'.' + path[0].key + jax.tree_util.keystr(path[1:]): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(raw)}


# =============================================================================================
# Bad values: one line, exit 2, nothing written
# =============================================================================================
@pytest.mark.parametrize('value', [0, -2, 1.5, True, '3'])
def test_bad_replicas_value_is_a_config_error(value):
  c = _config('moco')
  with c.ignore_type():
    c.replicas = value
  with pytest.raises(config_lib.ConfigError, match=r'replicas.*an integer >= 1'):
    train.validate_config(c, num_devices=1)


def _cli(workdir, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'ssl_jax.main',
                         '--config=configs/moco.py:cifar10,runlocal', f'--workdir={workdir}',
                         *flags], check=False, cwd=REPO, env=cli_env(), capture_output=True,
                        text=True, timeout=600)


@pytest.mark.parametrize('value', [pytest.param('0', marks=pytest.mark.slow),   # 9 s each:
                                   pytest.param('-2', marks=pytest.mark.slow),  # JAX starts
                                   '1.5'])                                      # 0.3 s
def test_bad_replicas_value_through_the_cli_is_one_line_exit_2(value, tmp_path):
  work = tmp_path / 'work'
  p = _cli(work, f'--config.replicas={value}')
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-3000:])
  assert lines[0].startswith('Config error: ') and value in lines[0], lines
  if value != '1.5':   # the flag parser's own error for a non-integer does not name the key
    assert f'config.replicas={value} is invalid; accepted: an integer >= 1' in lines[0], lines
  assert not work.exists()


@pytest.mark.slow
def test_replicas_too_large_for_memory_name_xla_estimate(tmp_path):
  # In process: the estimate of the compiled step against a given device memory.
  c = _config('moco', S)
  parts, mesh = method_steps.build(c, 1)
  with jax.set_mesh(mesh):
    fits = train.check_replicas_fit(c, mesh, parts, available_bytes=2 ** 50)
    mem = fits.train_step.memory_analysis()   # the compiled step the run then uses
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    assert need > 0
    have = need   # 0.9 of it is usable: the step does not fit
    with pytest.raises(config_lib.ConfigError) as e:
      train.check_replicas_fit(c, mesh, parts, available_bytes=have)
  fit = int(0.9 * have / (need / S))
  assert str(e.value).startswith(f'replicas={S}: the step needs about ')
  assert "XLA's estimate for the compiled step" in str(e.value)
  assert str(e.value).endswith(f'accepted: replicas <= {fit}, or a smaller batch_size')
  # Through the CLI: this host's memory, one line, exit 2, before the workdir is created.
  work = tmp_path / 'work'
  p = _cli(work, '--config.replicas=100000', '--config.data.name=synthetic')
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-3000:])
  assert lines[0].startswith('Config error: replicas=100000: the step needs about '), lines
  assert "GiB per device (XLA's estimate for the compiled step" in lines[0], lines
  assert 'accepted: replicas <= ' in lines[0], lines
  assert not work.exists()


@pytest.mark.slow
def test_replicas_table_reads_the_runs_results_json(straight, tmp_path):
  """``benchmarks/replicas_table.py`` (the README's seven-method table) tabulates exactly what
  the trainer wrote in WORKDIR/results.json: mean ± std (ddof=1) and the per-seed values."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import replicas_table  # pylint: disable=import-outside-toplevel
  ref, ref_dir = straight
  os.symlink(ref_dir, tmp_path / 'moco')
  row = replicas_table.table(str(tmp_path), ['moco']).splitlines()[2]
  for key in (replicas_table.KNN, replicas_table.PROBE):
    values = ref['final_replicas'][key]
    cell = (f'**{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}** ('
            + ' / '.join(f'{100 * v:.2f}' for v in values) + ')')
    assert cell in row, (cell, row)
  assert row.startswith('| MoCo v2 | ') and row.count('not measured') == 2, row
