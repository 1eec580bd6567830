r"""Semi-supervised fine-tuning (``--mode=finetune``): backbone + linear head on a labelled subset.

    python -m ssl_jax.main --mode=finetune --config=configs/eval_finetune.py:cifar10,1% \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR

The pretrained backbone (newest checkpoint of WORKDIR) gets a new linear head and the whole
network is trained with softmax cross-entropy on a labelled fraction of the train split:

* ``label_fraction``: ``'1%'``, ``'10%'``, any percentage or fraction (``'0.05'``), or ``'100%'``.
* ``subset_file``: a file of image ids, one per line (the standard ImageNet subsets of SimCLR,
  ``1percent.txt`` / ``10percent.txt`` from github.com/google-research/simclr
  ``imagenet_subsets/``, are such files of ``n01440764_10026.JPEG``-style names; they are
  matched against TFDS ``file_name`` — or ``id`` on CIFAR, or the file names of an image
  folder). When set, it overrides ``label_fraction``.
* Otherwise :func:`class_balanced_subset` picks ``round(fraction * n_c)`` (at least 1) examples
  of each class ``c`` with a seeded permutation per class; subsets of one seed are nested
  (the 1% subset is inside the 10% subset).

Training is sharded like pretraining: one ``jax.jit`` step over the ``'data'`` mesh with the
global batch as a ``NamedSharding``, BatchNorm statistics over the global batch, parameters
replicated. Optimizer: SGD with Nesterov momentum (or AdamW), ``lr = base_lr * B / 256``
(the head's ``head_lr_mult`` times that), linear warm-up + cosine.

Regularisers of ViT fine-tuning recipes (the APS recipe: ``configs/eval_finetune.py:...,aps``):

* ``drop_path``: stochastic depth in the ViT blocks, rate linear in depth from 0 to
  ``drop_path`` (timm ``linspace(0, drop_path, depth)``); each sample's residual branch is
  dropped with that probability and the kept ones scaled by ``1 / (1 - rate)``. Only in the
  train step, driven by the ``'dropout'`` rng ``fold_in(fold_in(key(seed), DROPOUT_STREAM),
  step)`` (a resume redraws the same masks); evaluation is deterministic. ViT backbones only.
* ``ema_decay`` (> 0): a model EMA as timm's ``ModelEma`` / ``ModelEmaV2``: initialised to the
  starting weights (pretrained backbone + new head), and after every optimizer step
  ``ema <- decay * ema + (1 - decay) * weights`` for every parameter and BatchNorm statistic
  (:func:`ssl_jax.evals.supervised.ema_update`). It is evaluated alongside the online weights.

Evaluation: top-1 / top-5 on the eval split (centre crop) every ``eval_every_epochs`` and after
the last epoch, for the online weights and (with ``ema_decay > 0``) the EMA weights.
``results.json`` reports the **last** evaluation (``top1_last``, ``top5_last``; ``top1`` /
``top5`` are the same numbers) and the **best** one (``top1_best``, ``top5_best`` — top-5 of
that evaluation — and ``best_epoch``), and ``ema_*`` versions of each, plus the whole
``history``; the log prints them labelled. The best epoch is picked on the eval split itself, as
the official APS ``main_finetune.py`` (and its paper table) does, so it is an optimistic number;
the last epoch is the unbiased one. TensorBoard tags ``finetune/*``, Orbax checkpoints (the
evaluation history travels in their metadata) and ``results.json`` in EVAL_DIR (a rerun resumes).

:func:`finetune_net` describes the network; :func:`ssl_jax.evals.supervised.train` (the trainer
the linear probe runs too) trains it.
"""
from __future__ import annotations

import io
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib, optim, paths, sharding, utils, writers
from ssl_jax.data import labelled
from ssl_jax.evals import devices, eval_config, report, supervised
from ssl_jax.models import normalize as normalize_lib
from ssl_jax.ops import losses

OPTIMIZERS = ('sgd', 'adamw')
TAG = 'finetune'
DROPOUT_STREAM = 0x64726f70  # fold_in constant of the drop-path rng stream ('drop')


# =============================================================================================
# Label subsets (pure)
# =============================================================================================
def parse_fraction(value: Any) -> float:
  """``'1%'`` -> 0.01, ``'10%'`` -> 0.1, ``'0.05'`` -> 0.05, ``'100%'`` / ``'all'`` -> 1.0."""
  accepted = "a percentage ('1%', '10%', '12.5%'), a fraction in (0, 1] ('0.05'), or 'all'"
  s = str(value).strip().lower()
  try:
    if s == 'all':
      f = 1.0
    elif s.endswith('%'):
      f = float(s[:-1]) / 100.0
    else:
      f = float(s)
  except ValueError:
    raise config_lib.ConfigError(f'config.label_fraction={value!r} is invalid; accepted: '
                                 f'{accepted}') from None
  if not (0.0 < f <= 1.0 and math.isfinite(f)):
    raise config_lib.ConfigError(f'config.label_fraction={value!r} is invalid; accepted: '
                                 f'{accepted}')
  return f


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of a seeded, class-balanced subset of ``labels``.

  For each class ``c`` (labels >= 0; negative labels are never picked) with ``n_c`` examples,
  take the first ``m_c = max(1, round(fraction * n_c))`` entries of a permutation of its
  indices drawn from ``np.random.default_rng([seed, c])``. Consequences: the result depends only
  on (labels, fraction, seed); every class keeps its share; a smaller fraction's subset is
  contained in a larger one's (same seed); classes do not influence each other's draws.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction={fraction!r} is invalid; accepted: a number in (0, 1]')
  picked = []
  for c in np.unique(labels[labels >= 0]):
    idx = np.flatnonzero(labels == c)
    m = max(1, int(round(fraction * len(idx))))
    perm = np.random.default_rng([int(seed), int(c)]).permutation(len(idx))
    picked.append(idx[perm[:m]])
  if not picked:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(picked)).astype(np.int64)


def read_subset_file(path: str) -> list[str]:
  """Image ids from a subset file: one per line; blank lines and ``#`` comments skipped."""
  if not paths.exists(path):
    raise FileNotFoundError(
        f'config.subset_file={path!r} does not exist. Accepted: a text file of image ids, one '
        'per line (e.g. SimCLR imagenet_subsets/1percent.txt), or subset_file=\'\' for a '
        'seeded class-balanced subset of label_fraction.')
  ids = [line.strip() for line in paths.read_text(path).splitlines()]
  return [i for i in ids if i and not i.startswith('#')]


def match_ids(split_ids: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
  """Sorted indices of ``split_ids`` whose id (or basename) is in ``wanted``; all must be found."""
  want = {paths.basename(w) for w in wanted}
  base = [paths.basename(str(s)) for s in split_ids]
  idx = np.array([i for i, s in enumerate(base) if s in want], np.int64)
  found = {base[i] for i in idx}
  missing = sorted(want - found)
  if missing:
    raise ValueError(f'{len(missing)} of the {len(want)} ids of the subset file are not in the '
                     f'split (e.g. {missing[:3]}); the split ids look like {base[:3]}.')
  return idx


def select_subset(config: ml_collections.ConfigDict, data_cfg) -> tuple[np.ndarray, str]:
  """Indices (into the train split) of the labelled subset, and a description."""
  split = data_cfg.train_split
  if config.subset_file:
    ids = read_subset_file(config.subset_file)
    idx = match_ids(labelled.example_ids(data_cfg, split), ids)
    return idx, f'{len(idx)} examples listed in {config.subset_file}'
  fraction = parse_fraction(config.label_fraction)
  labels = labelled.split_labels(data_cfg, split)
  pool = np.arange(len(labels), dtype=np.int64)
  if config.train_examples > 0:  # a seeded class-balanced pool (quick runs), never the first N
    from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
    pool = sources.balanced_subset(labels, int(config.train_examples), int(config.subset_seed))
  if fraction >= 1.0:
    return pool, f'all {len(pool)} labelled examples'
  idx = pool[class_balanced_subset(labels[pool], fraction, config.subset_seed)]
  if data_cfg.name.startswith('imagenet') and config.label_fraction in ('1%', '10%'):
    report.log('Note: using a seeded class-balanced subset; the standard ImageNet 1%/10% '
               'subsets are SimCLR\'s id files (set config.subset_file).')
  return idx, (f'{len(idx)} examples ({config.label_fraction} per class, class-balanced, '
               f'seed {config.subset_seed})')


# =============================================================================================
# The network: pretrained backbone + new head, all trained
# =============================================================================================
class FinetuneNet(nn.Module):
  """uint8 images -> normalise -> pretrained backbone -> pooled / CLS features -> Dense head."""
  backbone: nn.Module
  num_classes: int
  head_init_std: float = 0.01

  @nn.compact
  def __call__(self, images, train: bool = True):
    out = self.backbone(normalize_lib.normalize(images), train=train)
    f = (out['cls'] if 'cls' in out else out['pooled']).astype(jnp.float32)
    return nn.Dense(self.num_classes, name='head',
                    kernel_init=nn.initializers.normal(self.head_init_std),
                    bias_init=nn.initializers.zeros)(f)


def finetune_net(config: ml_collections.ConfigDict, pre: ml_collections.ConfigDict, data_cfg,
                 data: supervised.Streamed, params, batch_stats, *, mesh) -> supervised.Net:
  """Fine-tuning as a :class:`~ssl_jax.evals.supervised.Net`: :class:`FinetuneNet` on the
  pretrained backbone (``params`` / ``batch_stats`` of the training run) with a new head,
  everything trained with (label-smoothed) cross-entropy; drop-path and the model EMA as the
  module docstring says."""
  from ssl_jax.models import ssl_model  # pylint: disable=import-outside-toplevel
  num_classes, size = int(data_cfg.num_classes), int(data_cfg.image_size)
  drop_path = float(config.get('drop_path', 0.0))
  ema_decay = float(config.get('ema_decay', 0.0))
  if drop_path > 0 and not str(pre.model.backbone).startswith('vit'):
    raise config_lib.ConfigError(
        f'config.drop_path={drop_path} needs a ViT backbone (stochastic depth in the '
        f'transformer blocks); the pretrained backbone is {pre.model.backbone!r}. Accepted: '
        'drop_path=0.')
  recipe_backbone = config.get('recipe_backbone', '')
  if recipe_backbone and recipe_backbone != pre.model.backbone:
    report.log(f'WARNING: this fine-tune recipe was set up for {recipe_backbone} (its lr), '
               f'but the pretrained backbone is {pre.model.backbone}; pass the matching ViT '
               'token.')
  overrides = {'drop_path_rate': drop_path} if drop_path > 0 else {}
  model = FinetuneNet(ssl_model.build_backbone(pre.model, size, **overrides), num_classes,
                      head_init_std=float(config.head_init_std))
  dropout_key = jax.random.fold_in(jax.random.key(config.seed), DROPOUT_STREAM)
  o = config.optimizer
  lr_fn = optim.epoch_schedule(o.base_lr, data.batch_size, data.steps_per_epoch, config.epochs,
                               schedule='cosine', warmup_epochs=o.warmup_epochs)
  tx = optim.finetune_optimizer(o, lr_fn)

  def apply(st: supervised.State, frozen, images, *, train: bool):
    del frozen   # nothing is frozen
    variables = {'params': st.params, 'batch_stats': st.batch_stats}
    if not train:
      return model.apply(variables, images, train=False), st.batch_stats
    rngs = {'dropout': jax.random.fold_in(dropout_key, st.step)}  # drop-path masks
    logits, mutated = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs=rngs)
    return logits, mutated.get('batch_stats', {})

  def loss(logits, labels):
    if config.label_smoothing > 0:
      onehot = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
      return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot))
    return losses.cross_entropy(logits, labels)

  def fresh(rng) -> supervised.State:   # the new head on the pretrained backbone
    v = model.init(rng, jnp.zeros((2, size, size, 3), jnp.uint8), train=False)
    p = dict(v['params'])
    p['backbone'] = jax.tree.map(jnp.asarray, params['backbone'])
    bstats = {}
    if 'batch_stats' in v:
      bstats = dict(v['batch_stats'])
      bstats['backbone'] = jax.tree.map(jnp.asarray, batch_stats['backbone'])
    return supervised.new_state(p, tx, batch_stats=bstats, ema=ema_decay > 0)

  rng = jax.random.key(config.seed)
  return supervised.Net(
      name='finetune', tag=TAG, apply=apply, loss=loss, tx=tx, lr_fn=lr_fn,
      abstract=jax.eval_shape(fresh, rng),
      init=lambda: jax.jit(fresh, out_shardings=sharding.replicated(mesh))(rng),
      ema_decay=ema_decay,
      about=f'drop-path {drop_path:g}, model EMA {ema_decay if ema_decay > 0 else "off"}')


def format_summary(summary: dict[str, Any]) -> str:
  """``top-1 last 97.10% (epoch 100) | best 97.30% (epoch 88, of 100 evaluations) | ...``."""
  def one(pre: str, label: str) -> str:
    return (f'{label}top-1 last {100 * summary[pre + "top1_last"]:.2f}% (epoch '
            f'{summary[pre + "last_epoch"]:g}) | best {100 * summary[pre + "top1_best"]:.2f}% '
            f'(epoch {summary[pre + "best_epoch"]:g}, of {summary["num_evals"]} evaluations) | '
            f'top-5 last {100 * summary[pre + "top5_last"]:.2f}%')
  text = one('', '')
  if 'ema_top1_last' in summary:
    text += '; EMA ' + one('ema_', '')
  return text


def validate(c: ml_collections.ConfigDict) -> None:
  supervised.validate(c, optimizer_keys=('base_lr', 'weight_decay', 'momentum', 'head_lr_mult',
                                         'warmup_epochs'))
  req = config_lib.require
  if not c.subset_file:
    parse_fraction(c.label_fraction)
  req(c.optimizer.name in OPTIMIZERS, 'optimizer.name', c.optimizer.name, ', '.join(OPTIMIZERS))
  dp, ed = c.get('drop_path', 0.0), c.get('ema_decay', 0.0)
  req(isinstance(dp, (int, float)) and not isinstance(dp, bool) and 0 <= dp < 1, 'drop_path',
      dp, 'a number in [0, 1) (0 = off; ViT backbones only)')
  req(isinstance(ed, (int, float)) and not isinstance(ed, bool) and 0 <= ed < 1, 'ema_decay',
      ed, 'a number in [0, 1) (0 = no model EMA; APS recipe 0.99996)')


# =============================================================================================
# --mode=finetune
# =============================================================================================
def run(config: ml_collections.ConfigDict, workdir: str, *,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Fine-tune on the labelled subset; returns ``{'top1', 'top5', 'top1_best', 'num_labelled',
  ...}`` (``top1`` / ``top5``: the last evaluation; see the module docstring)."""
  validate(config)
  mesh = devices.eval_mesh(config, ('batch_size', 'eval_batch_size'))
  ckpt_lib.check_workdir_config(workdir, config, allow_config_change=allow_config_change)
  pre, params, batch_stats, pre_step = ckpt_lib.load_pretrained(
      config.pretrained, weights=config.weights, step=utils.optional(config.checkpoint_step),
      replica=config.get('replica', -1))
  data_cfg = eval_config.checked_eval_data_config(config, pre)
  subset, desc = select_subset(config, data_cfg)
  report.log(f'Fine-tuning {pre.method.name} / {pre.model.backbone} from '
             f'{config.pretrained}/checkpoints/{pre_step}{eval_config.replica_text(config, pre)} '
             f'on {data_cfg.name}: {desc}.')
  if jax.process_index() == 0:
    buf = io.BytesIO()
    np.save(buf, subset)
    paths.write_bytes(paths.join(workdir, 'subset_indices.npy'), buf.getvalue())
  data = supervised.Streamed(data_cfg, config.batch_size, indices=subset,
                             what=f'labelled examples ({desc})')
  net = finetune_net(config, pre, data_cfg, data, params, batch_stats, mesh=mesh)
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  t0 = time.time()
  with jax.set_mesh(mesh):
    state, history = supervised.train(config, workdir, net, data, mesh=mesh, writer=writer)
  total_steps = data.steps_per_epoch * config.epochs
  summary = supervised.summarize_history(history)
  writer.write_scalars(total_steps, {f'{TAG}/test_{k}': v for k, v in summary.items()
                                     if k.endswith('_best')})
  writer.flush()
  out = {'top1': summary['top1_last'], 'top5': summary['top5_last'], **summary}
  out.update({'history': history, 'drop_path': float(config.get('drop_path', 0.0)),
              'ema_decay': net.ema_decay,
              'best_selected_on': f'{data_cfg.name}/{data_cfg.eval_split}',
              'pretrained': config.pretrained, 'pretrained_step': pre_step,
              'method': pre.method.name, 'backbone': pre.model.backbone,
              'dataset': data_cfg.name, 'label_fraction': config.label_fraction,
              'subset_file': config.subset_file, 'num_labelled': int(len(subset)),
              'epochs': config.epochs, 'steps': total_steps, 'time_s': time.time() - t0,
              'final_state': state})
  report.write_json(workdir, 'results.json', {k: v for k, v in out.items()
                                              if k != 'final_state'})
  report.log(f'Fine-tuned on {desc}: {data_cfg.name}/{data_cfg.eval_split} '
             f'{format_summary(summary)} ({out["time_s"]:.0f}s; "best" is picked on this '
             f'split). Written to {workdir}/results.json.')
  return out
