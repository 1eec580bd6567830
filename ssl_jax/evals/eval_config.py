"""The eval config grammar every offline mode shares, and the data it names.

* :func:`base_eval_config` — the fields every eval config has (``pretrained``,
  ``checkpoint_step``, ``weights``, ``replica``, the data overrides, subset sizes,
  ``eval_batch_size``, ``seed``, ``num_devices``, ``export``) and its argument tokens (a dataset
  preset, ``runlocal``); :func:`reject_tokens` names the accepted ones; :func:`validate_common` checks
  the shared fields.
* :func:`eval_data_config` — the evaluation's data config: the training run's (or the preset
  ``dataset``), with the eval config's overrides; one that the source would not read is an error.
  :func:`checked_eval_data_config` adds the data checks training runs (every offline mode builds
  its data config there).
"""
from __future__ import annotations

import ml_collections

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config_lib
from ssl_jax import data as data_lib
from ssl_jax.evals import report

def base_eval_config(arg: str | None) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Fields every eval mode reads; returns (config, the unparsed tokens of ``arg``).

  ``arg`` is comma-separated: a dataset preset (cifar10, cifar100, imagenet100, imagenet),
  ``runlocal`` (tiny: a few hundred examples; also returned with the other tokens so that the
  mode's config can shrink its own fields) and mode-specific tokens.
  """
  c = ml_collections.ConfigDict()
  c.pretrained = ''            # the training run's --workdir
  c.checkpoint_step = -1       # -1: newest
  c.weights = 'online'         # 'online' or 'target' (EMA)
  c.dataset = ''               # '' -> the pretraining dataset; else a preset name
  c.source = ''                # '' -> the pretraining run's (or preset's); 'tfds' or 'folder'
  c.data_dir = ''              # TFDS data dir ('' -> $TFDS_DATA_DIR)
  c.folder_root = ''           # image-folder datasets (with source 'folder')
  c.train_split = ''           # '' -> the dataset's train split
  c.eval_split = ''            # '' -> the dataset's eval split
  c.train_examples = -1        # > 0: a seeded class-balanced subset of N train examples
  c.eval_examples = -1         # > 0: a seeded class-balanced subset of N eval examples
  c.eval_batch_size = 512      # feature extraction / evaluation batch (global)
  c.seed = 0
  c.replica = -1               # replicas run: -1 each (EVAL_DIR/replica_<r>), r: that one alone
  c.num_devices = -1           # -1: all devices
  c.export = ml_collections.ConfigDict({'formats': ('pth', 'npz'), 'include_probe': False})
  rest = []
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token in config_lib.DATASETS:
      c.dataset = token
    else:
      rest.append(token)
  if 'runlocal' in rest:
    c.train_examples = 512
    c.eval_examples = 256
    c.eval_batch_size = 128
  return c, rest


def reject_tokens(tokens: list[str], accepted: list[str]) -> None:
  if tokens:
    raise config_lib.ConfigError(
        f'config arg token(s) {tokens} not recognised; accepted: a dataset '
        f'({", ".join(config_lib.DATASETS)}), runlocal, {", ".join(accepted)}')


def validate_common(c: ml_collections.ConfigDict) -> None:
  """The fields of :func:`base_eval_config` that every offline mode reads."""
  req = config_lib.require
  req(bool(c.pretrained), 'pretrained', c.pretrained,
      'the --workdir of a training run (--config.pretrained=WORKDIR)')
  req(c.weights in ckpt_lib.WEIGHTS, 'weights', c.weights, ', '.join(ckpt_lib.WEIGHTS))
  req(c.dataset == '' or c.dataset in data_lib.PRESETS, 'dataset', c.dataset,
      "'' (the pretraining dataset) or " + ', '.join(sorted(data_lib.PRESETS)))
  req(isinstance(c.eval_batch_size, int) and c.eval_batch_size > 0, 'eval_batch_size',
      c.eval_batch_size, 'a positive integer')


def replica_text(c: ml_collections.ConfigDict, pre: ml_collections.ConfigDict) -> str:
  """`` (replica r of S, seed s)`` when ``c`` read one replica of a replicas run (``pre``: the
  config ``checkpoint.load_pretrained`` returned), else ''."""
  if 'replica_of' not in pre:
    return ''
  return f' (replica {c.replica} of {pre.replica_of}, seed {pre.seed})'


def eval_data_config(c: ml_collections.ConfigDict, pre: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """The data config of an evaluation: the pretraining run's, or the preset ``c.dataset``, with
  the eval config's overrides. An override that the resulting source would not read is an error
  naming the key that would (never silently ignored)."""
  if c.dataset:
    d = data_lib.default_data_config(c.dataset)
    origin = f'the preset {c.dataset!r} (from the config argument)'
  else:
    d = ml_collections.ConfigDict(pre.data.to_dict())
    origin = f'the training run {c.pretrained!r}'
  if c.get('source'):
    config_lib.require(c.source in ('tfds', 'folder'), 'source', c.source, "'tfds' or 'folder'")
    d.source = c.source
  source = d.get('source', 'tfds')
  if c.get('folder_root') and source != 'folder':
    raise config_lib.ConfigError(
        f'--config.folder_root={c.folder_root!r} is not read: the evaluation data is the TFDS '
        f'dataset {d.name!r} of {origin}. To evaluate the image folder add --config.source=folder.')
  if c.get('data_dir') and source == 'folder':
    raise config_lib.ConfigError(
        f'--config.data_dir={c.data_dir!r} is not read: the evaluation data is an image folder '
        f'({origin}); set --config.folder_root instead.')
  for key in ('data_dir', 'folder_root', 'train_split', 'eval_split'):
    if c.get(key):
      d[key] = c[key]
  if source == 'folder' and not d.get('folder_root'):
    raise config_lib.ConfigError('the evaluation data is an image folder but no folder is set: '
                                 'add --config.folder_root=ROOT.')
  return d


def checked_eval_data_config(c: ml_collections.ConfigDict, pre: ml_collections.ConfigDict
                             ) -> ml_collections.ConfigDict:
  """:func:`eval_data_config`, then the data checks training runs too
  (``data.check_folder_source``: for an image folder, the same class folders in the train and
  eval splits, at least 2 classes, ``num_classes`` from the folders). Every offline mode
  (knn, linear, finetune, embed) builds its data config here.

  An offline head (kNN vote, linear probe, fine-tuning head) is new, and an eval config has no
  ``num_classes`` key, so for an image folder ``num_classes`` always comes from the folders
  evaluated (not from the training run's config, which may name another folder)."""
  d = eval_data_config(c, pre)
  before = d.get('num_classes')
  if d.get('source', 'tfds') == 'folder':
    d.num_classes = -1
  summary = data_lib.check_folder_source(d, d.train_split, d.eval_split)
  if summary is not None and not summary.class_names:   # unlabelled folder: nothing to derive
    d.num_classes = before
  report.log(f'Evaluation data: {data_lib.describe(d)}, splits {d.train_split!r} / '
             f'{d.eval_split!r}.')
  return d
