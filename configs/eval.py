r"""The training run's evaluators on its checkpoint (``--mode=eval``).

    python -m ssl_jax.main --mode=eval --config=configs/eval.py \
        --config.pretrained=/tmp/byol_c10 --workdir=/tmp/byol_c10_eval

Runs every evaluator listed in ``config.evals`` once, with the code training runs them with
(``ssl_jax/evals/evaluators.py``): by default the weighted kNN (``monitor/knn_top1``, k=200,
T=0.1) and the online probe's top-1 (``online_probe/test_top1``). Prints one line per
evaluator and ``Evaluated WORKDIR at step N | kNN top-1 (...): X% | online-probe top-1: Y%``;
writes ``EVAL_DIR/results.json`` and TensorBoard scalars. With the same evaluator fields the
values equal those the training run logged at that step. Change or drop entries like any
field (``--config.evals.knn.k=20``, ``--config.evals.online_probe.eval_examples=1000``); the
schedule fields of training (``every_*``, ``at_start``, ``at_end``) do not exist here.

Arguments (``get_config('<dataset>[,quick|runlocal]')``):

* dataset (``cifar10``, ``cifar100``, ``imagenet100``, ``imagenet``): that preset's data and
  splits; omitted (as above) = the pretraining run's own data and splits. The online probe
  scores only the pretraining dataset.
* ``quick`` / ``runlocal``: the evaluators' sizes of the training presets of the same name
  (``evaluators.PRESETS``), so the final numbers of such a run are reproduced.

Expected: the training run's own final ``kNN top-1`` / ``online-probe top-1`` (README quick
start: 34.05% / 22.30% with ``quick``).
"""
from __future__ import annotations

from ssl_jax.evals import eval_config, evaluators


def get_config(arg: str | None = None):
  c, rest = eval_config.base_eval_config(arg)
  for key in ('train_examples', 'eval_examples', 'eval_batch_size', 'seed', 'export'):
    del c[key]                     # read by the other modes, not by --mode=eval
  c.evals = evaluators.default_config()
  for token in rest:
    if token in evaluators.PRESETS:
      evaluators.apply_preset(c.evals, token)
    else:
      eval_config.reject_tokens([token], list(evaluators.PRESETS))
  for cfg in c.evals.values():     # no schedule offline: each evaluator runs once
    for key in evaluators.SCHEDULE_KEYS[1:]:
      if key in cfg:
        del cfg[key]
  return c
