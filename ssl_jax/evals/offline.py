r"""``--mode=eval``: the evaluators of ``config.evals`` on a training run's checkpoint.

    python -m ssl_jax.main --mode=eval --config=configs/eval.py \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR [--config.evals.knn.k=20 ...]

The same evaluator classes (``ssl_jax.evals.evaluators``), the same feature function
(``features.frozen_feature_fn``: the eval-mode network, L2-normalised features, the online
probe's logits) and the same data as training's evaluations, so a value equals the one the
training run logged at that step with the same evaluator fields. The network is restored
without method code (``pretrained.load_for_eval``); the online probe from the checkpoint's
``probe_params`` (``weights='online'`` only). Writes ``EVAL_DIR/results.json`` (``values``,
the checkpoint, the evaluators' config) and TensorBoard scalars at the checkpoint's step, and
prints one line per evaluator and a summary line.
"""
from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, sharding, writers
from ssl_jax.evals import devices, evaluators, report
from ssl_jax.evals import pretrained as pre_lib


def validate(c) -> None:
  """The fields ``--mode=eval`` reads; ``ConfigError`` names the key, value and choices."""
  req = config_lib.require
  req(bool(c.pretrained), 'pretrained', c.pretrained,
      'the --workdir of a training run (--config.pretrained=WORKDIR)')
  req(c.weights in ckpt_lib.WEIGHTS, 'weights', c.weights, ', '.join(ckpt_lib.WEIGHTS))
  req(len(c.get('evals') or {}) > 0, 'evals', dict(c.get('evals') or {}),
      f'at least one evaluator (types: {", ".join(evaluators.TYPES)})')
  evaluators.validate(c)


def _variables(c, net, step: int, mesh) -> dict[str, Any]:
  """The network's variables and, for the online weights, the online probe's."""
  v = {'params': net.params, 'batch_stats': net.batch_stats}
  if c.weights == 'online':
    v['probe'] = ckpt_lib.restore_state(c.pretrained, step=step, items=('probe_params',),
                                        replica=c.get('replica', -1))[0]['probe_params']
  return jax.device_put(v, sharding.replicated(mesh))


def run(config, workdir: str, **unused) -> dict[str, Any]:
  """Run every evaluator of ``config.evals`` once on the checkpoint; return the values."""
  del unused
  validate(config)
  mesh = devices.mesh_of(config)
  for name, cfg in config.evals.items():
    if 'batch_size' in cfg:
      devices.check_batch(f'evals.{name}.batch_size', int(cfg.batch_size), mesh)
  pre, data_cfg, net, step = pre_lib.load_for_eval(config)
  t0 = time.time()
  values: dict[str, float] = {}
  with jax.set_mesh(mesh):
    variables = _variables(config, net, step, mesh)
    probe = nn.Dense(int(jax.tree.leaves(variables['probe'])[0].shape[-1])) \
        if 'probe' in variables else None
    fn = jax.jit(evaluators.make_feature_fn(net.apply, probe))
    built = evaluators.build(config.evals, feature_fn=fn, run_config=pre, data_cfg=data_cfg,
                             mesh=mesh, num_classes=int(data_cfg.num_classes))
    for name, ev in built:
      t = time.time()
      res = dict(ev.run(variables))
      report.log(f'[eval {name} @ step {step}] '
                 + ' | '.join(f'{k} {100 * v:.2f}%' for k, v in res.items())
                 + f' ({time.time() - t:.0f}s)')
      values.update(res)
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, values)
  writer.close()
  out = {'values': values, 'pretrained': config.pretrained, 'pretrained_step': step,
         'weights': config.weights, 'method': pre.method.name, 'backbone': pre.model.backbone,
         'dataset': data_cfg.name, 'evals': ckpt_lib.config_to_dict(config.evals),
         'time_s': time.time() - t0}
  path = report.write_json(workdir, 'results.json', out)
  report.log(evaluators.summary_line(
      [ev for _, ev in built], f'Evaluated {config.pretrained} at step {step}', values)
      + f'. Written to {path}.')
  return out
