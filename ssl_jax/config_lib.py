"""Config-arg parsing (``"cifar10,resnet18,bs=512"``), shared defaults, and validation.

Every ``configs/<method>.py`` has ``get_config(arg)``; ``arg`` is a comma-separated list of
tokens:

* a dataset preset: ``cifar10``, ``cifar100``, ``imagenet100``, ``imagenet``;
* a backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet_tiny`` (or a ViT for APS);
* ``runlocal``: a tiny model and a handful of steps, for a laptop or a smoke test (a backbone
  named in the same argument, e.g. ``cifar10,resnet18,runlocal``, is kept);
* ``quick``: the README quick start's size (ResNet-18 at 1/8 width, batch 128, 2 epochs;
  ~15 minutes on a 2-core CPU) — a demonstration, not a recipe;
* ``bs=N`` (global batch), ``epochs=N`` or ``steps=N`` (training length), ``seed=N``.

``validate(config)`` runs before anything is built or compiled and raises ``ConfigError``
naming the bad key, the bad value and what would be accepted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import ml_collections

DATASETS = ('cifar10', 'cifar100', 'imagenet100', 'imagenet')
RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet_tiny')
VITS = ('vit_tiny', 'vit_small', 'vit_base', 'vit_test')
OPTIMIZERS = ('sgd', 'lars', 'adamw')
DTYPES = ('float32', 'bfloat16')
EMA_SCHEDULES = ('cosine', 'constant')
REPLICA_PROGRAMS = ('auto', 'vmap', 'unroll')
UNROLL_MAX_REPLICAS = 16   # 'unroll' compiles one copy of the step per replica
INT_KEYS = ('bs', 'epochs', 'steps', 'seed')
FLAGS = ('runlocal', 'quick')


class ConfigError(ValueError):
  """A config value that cannot be used; the message names the key and the accepted values."""


@dataclasses.dataclass
class Args:
  dataset: str = 'cifar10'
  backbone: str | None = None
  runlocal: bool = False
  quick: bool = False
  bs: int | None = None
  epochs: int | None = None
  steps: int | None = None
  seed: int | None = None


def parse_arg(arg: str | None, *, backbones: Iterable[str] = RESNETS,
              default_dataset: str = 'cifar10') -> Args:
  """Parse ``get_config``'s comma-separated argument into ``Args``."""
  out = Args(dataset=default_dataset)
  backbones = tuple(backbones)
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if '=' in token:
      key, value = token.split('=', 1)
      if key not in INT_KEYS:
        raise ConfigError(f'config arg {token!r}: unknown key {key!r}; accepted keys: '
                          f'{", ".join(k + "=N" for k in INT_KEYS)}')
      try:
        setattr(out, key, int(value))
      except ValueError:
        raise ConfigError(f'config arg {token!r}: {key} must be an integer, got {value!r}') from None
    elif token in DATASETS:
      out.dataset = token
    elif token in backbones:
      out.backbone = token
    elif token in FLAGS:
      setattr(out, token, True)
    else:
      raise ConfigError(
          f'config arg token {token!r} is not recognised; accepted: a dataset '
          f'({", ".join(DATASETS)}), a backbone ({", ".join(backbones)}), '
          f'{", ".join(FLAGS)}, or {", ".join(k + "=N" for k in INT_KEYS)}')
  return out


def base_config(args: Args, *, method: str) -> ml_collections.ConfigDict:
  """Fields every method shares; a method config then sets its own recipe on top."""
  from ssl_jax import data  # local import: configs stay importable without TF at parse time
  from ssl_jax.evals import evaluators  # local import: it imports this module

  c = ml_collections.ConfigDict()
  c.method = ml_collections.ConfigDict({'name': method})
  c.seed = 0
  # Independent runs in one program (seeds seed .. seed + replicas - 1, one vmapped step):
  # replica r is exactly the run with seed + r; results are mean ± std over the replicas.
  c.replicas = 1
  # How the replicas' step is compiled (one program either way, the same results to float
  # rounding): 'vmap' batches them (every op gains the replica axis: one wide program, for an
  # accelerator that one small model does not fill), 'unroll' writes the one-seed step once per
  # replica (dense convolutions: 1.6x faster than vmap on XLA:CPU, README; at most 16), 'auto'
  # is unroll on the CPU backend up to 16 replicas and vmap otherwise (GPU/TPU).
  c.replica_program = 'auto'
  c.data = data.default_data_config(args.dataset)
  for key in ('data_dir', 'folder_root'):  # typed, so --config.data.data_dir=... works
    if key in c.data and c.data[key] is None:
      c.data[key] = ml_collections.config_dict.placeholder(str)
  imagenet_like = args.dataset.startswith('imagenet')
  c.model = ml_collections.ConfigDict({
      'backbone': args.backbone or ('resnet50' if imagenet_like else 'resnet18'),
      'stem': 'imagenet' if imagenet_like else 'cifar',
      'width': 1.0,          # channel multiplier of the backbone
      'dtype': 'float32',    # compute dtype; params, BN statistics and losses stay float32
      'bn_group_size': -1,   # BN statistics over groups of N devices on a pod; -1: all devices
      'projector': ml_collections.ConfigDict(
          {'hidden_dim': 4096, 'out_dim': 256, 'num_layers': 2, 'use_bn': True}),
      'predictor': ml_collections.ConfigDict(
          {'hidden_dim': 4096, 'out_dim': 256, 'num_layers': 2, 'use_bn': True}),
  })
  c.batch_size = 256                      # global batch, split over all devices of all hosts
  c.total_epochs = 200
  c.total_steps = -1                      # > 0 overrides total_epochs
  c.optimizer = ml_collections.ConfigDict({
      'name': 'lars', 'base_lr': 0.2,     # lr = base_lr * batch_size / 256
      'weight_decay': 1.5e-6, 'momentum': 0.9, 'nesterov': False,
      'b1': 0.9, 'b2': 0.999,              # AdamW
      'warmup_epochs': 10.0, 'warmup_steps': -1,
      'end_lr_factor': 0.0,                # cosine ends at base_lr * end_lr_factor
      'trust_coefficient': 0.001,          # LARS eta
      'trust_clip': False,                 # LARS: min(trust ratio / lr, 1) (solo-learn clip_lr)
      'grad_clip_norm': 0.0,               # 0 = off
  })
  # cosine: tau = final - (final - base)(cos(pi t / T) + 1) / 2 (BYOL: final 1; solo-learn's
  # MoCo v2+: base 0.99, final 0.999); constant: tau = base.
  c.ema = ml_collections.ConfigDict({'schedule': 'cosine', 'base': 0.996, 'final': 1.0})
  c.probe = ml_collections.ConfigDict({'lr': 0.1, 'momentum': 0.9})
  # Evaluators (ssl_jax/evals/evaluators.py): each entry names its type and when it runs.
  c.evals = evaluators.default_config()
  # Top-k searches of the methods' banks: < 1 searches approximately (TPU, approx_max_k).
  c.knn = ml_collections.ConfigDict({'recall_target': 1.0})
  c.log_every_steps = 50
  c.checkpoint = ml_collections.ConfigDict({'every_steps': 1000, 'keep': 3, 'async_save': True})
  c.num_devices = -1                      # -1: every device of every host
  c.score_hist_every_steps = 500          # pos/neg score histograms (contrastive methods)
  # jax.profiler trace of N steps into WORKDIR/plugins/profile/ (0 = off); first traced step
  # (-1: the 5th step of the run, after compilation).
  c.profile_steps = 0
  c.profile_start_step = -1
  if args.seed is not None:
    c.seed = args.seed
  return c


def finish_config(c: ml_collections.ConfigDict, args: Args) -> ml_collections.ConfigDict:
  """Apply the shared arg tokens (``bs=``, ``epochs=``, ``steps=``, ``runlocal``, ``quick``);
  the evaluators' sizes for ``quick`` and ``runlocal`` are ``evaluators.PRESETS``."""
  from ssl_jax.evals import evaluators  # local import: it imports this module
  if args.quick:  # the README quick start's size: ~15 min on a 2-core CPU (not a recipe)
    c.model.width = 0.125
    c.model.projector.update({'hidden_dim': 1024, 'out_dim': 128})
    if 'predictor' in c.model and c.model.predictor is not None:
      c.model.predictor.update({'hidden_dim': 1024, 'out_dim': 128})
    c.batch_size = 128
    c.total_epochs = 2
    c.optimizer.warmup_epochs = 0.1
    evaluators.apply_preset(c.evals, 'quick')
    c.log_every_steps = 20
    c.checkpoint.every_steps = 100
    c.data.shuffle_buffer = 10_000
  if args.runlocal:
    if args.backbone is None:  # a backbone the user named wins over runlocal's tiny default
      c.model.backbone = 'resnet_tiny' if c.model.backbone in RESNETS else 'vit_test'
    c.model.projector.update({'hidden_dim': 64, 'out_dim': 32})
    if 'predictor' in c.model and c.model.predictor is not None:
      c.model.predictor.update({'hidden_dim': 64, 'out_dim': 32})
    c.batch_size = 32
    c.total_steps = 20
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.warmup_steps = 2
    evaluators.apply_preset(c.evals, 'runlocal')
    c.log_every_steps = 5
    c.checkpoint.every_steps = 10
    c.data.shuffle_buffer = 1000
  if args.bs is not None:
    c.batch_size = args.bs
  if args.epochs is not None:
    c.total_epochs = args.epochs
    c.total_steps = -1
  if args.steps is not None:
    c.total_steps = args.steps
  return c


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file at ``path`` (e.g. a method built on MoCo's config)."""
  import importlib.util
  import os
  name = 'ssl_jax_config_' + os.path.splitext(os.path.basename(path))[0]  # a local .py file
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def require(cond: bool, key: str, value: Any, accepted: str) -> None:
  """The one config validator: raise ``ConfigError('config.KEY=VALUE is invalid; accepted: ...')``."""
  if not cond:
    raise ConfigError(f'config.{key}={value!r} is invalid; accepted: {accepted}')


def _finite_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int = 1, method_names: Iterable[str] | None = None) -> None:
  """Check every field the trainer reads; raise ``ConfigError`` naming key, value, accepted.

  The method's name is checked against ``method_names`` when given; otherwise the method
  registry checks it (``ssl_jax.methods.get``): this module imports no method code. Each
  method's own fields and the listed evaluators are checked by ``train.validate_config``.
  """
  from ssl_jax import data

  if method_names is not None:
    names = tuple(method_names)
    require(c.method.name in names, 'method.name', c.method.name, ', '.join(names))
  backbones = RESNETS + VITS
  require(c.model.backbone in backbones, 'model.backbone', c.model.backbone, ', '.join(backbones))
  if c.model.backbone in RESNETS:
    require(c.model.stem in ('cifar', 'imagenet'), 'model.stem', c.model.stem, 'cifar, imagenet')
  require(_finite_number(c.model.width) and c.model.width > 0, 'model.width', c.model.width,
           'a positive number')
  require(c.model.dtype in DTYPES, 'model.dtype', c.model.dtype, ', '.join(DTYPES))
  bn_group = c.model.get('bn_group_size', -1)
  require(isinstance(bn_group, int) and (bn_group == -1 or (bn_group >= 1 and (
      num_devices is None or bn_group >= num_devices or num_devices % bn_group == 0))),
      'model.bn_group_size', bn_group, '-1 (all devices) or a device count >= 1 dividing the '
      f'number of devices ({num_devices})')
  stray = sorted(set(c.knn.keys()) - {'recall_target'})
  require(not stray, f'knn.{stray[0] if stray else ""}', stray,
          'only knn.recall_target (the top-k search of the methods\' memory banks)')
  recall = c.knn.get('recall_target', 1.0)
  require(_finite_number(recall) and 0 < recall <= 1, 'knn.recall_target', recall,
          'a number in (0, 1]; 1 = exact top-k')
  require(c.optimizer.name in OPTIMIZERS, 'optimizer.name', c.optimizer.name, ', '.join(OPTIMIZERS))
  for key in ('base_lr', 'weight_decay', 'momentum', 'end_lr_factor', 'warmup_epochs'):
    v = c.optimizer[key]
    require(_finite_number(v) and v >= 0, f'optimizer.{key}', v, 'a finite number >= 0')
  require(c.optimizer.base_lr > 0, 'optimizer.base_lr', c.optimizer.base_lr, 'a finite number > 0')
  require(c.ema.schedule in EMA_SCHEDULES, 'ema.schedule', c.ema.schedule, ', '.join(EMA_SCHEDULES))
  require(_finite_number(c.ema.base) and 0.0 <= c.ema.base <= 1.0, 'ema.base', c.ema.base,
           'a number in [0, 1]')
  if c.ema.schedule == 'cosine':
    final = c.ema.get('final', 1.0)
    require(_finite_number(final) and c.ema.base <= final <= 1.0, 'ema.final', final,
             f'a number in [ema.base={c.ema.base}, 1]')
  replicas = c.get('replicas', 1)
  require(isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1,
          'replicas', replicas, 'an integer >= 1 (independent seeds trained together)')
  program = c.get('replica_program', 'auto')
  require(program in REPLICA_PROGRAMS, 'replica_program', program, ', '.join(REPLICA_PROGRAMS))
  require(program != 'unroll' or replicas <= UNROLL_MAX_REPLICAS, 'replica_program', program,
          f"vmap or auto with replicas={replicas} ('unroll' compiles one copy of the step per "
          f'replica: at most {UNROLL_MAX_REPLICAS})')
  require(isinstance(c.batch_size, int) and c.batch_size > 0, 'batch_size', c.batch_size,
           'a positive integer')
  require(c.total_steps > 0 or c.total_epochs > 0, 'total_steps/total_epochs',
           (c.total_steps, c.total_epochs), 'total_steps > 0, or total_epochs > 0')
  recipes = tuple(data.RECIPES)
  require(c.data.views in recipes, 'data.views', c.data.views, ', '.join(recipes))
  require(c.log_every_steps > 0, 'log_every_steps', c.log_every_steps, 'a positive integer')
  require(c.checkpoint.every_steps > 0, 'checkpoint.every_steps', c.checkpoint.every_steps,
           'a positive integer')
  require(c.checkpoint.keep >= 1, 'checkpoint.keep', c.checkpoint.keep, 'an integer >= 1')
  if 'profile_steps' in c:
    require(isinstance(c.profile_steps, int) and c.profile_steps >= 0, 'profile_steps',
            c.profile_steps, 'an integer >= 0 (0 = no profile)')
    require(isinstance(c.profile_start_step, int) and c.profile_start_step >= -1,
            'profile_start_step', c.profile_start_step,
            'an integer >= 1, or -1 (the 5th step of the run)')
  if num_devices is not None:
    if c.batch_size % num_devices:
      raise ConfigError(
          f'config.batch_size={c.batch_size} does not divide across {num_devices} devices; '
          f'accepted: a multiple of {num_devices} (e.g. {max(1, c.batch_size // num_devices) * num_devices})')
  if c.batch_size % process_count:
    raise ConfigError(f'config.batch_size={c.batch_size} does not divide across {process_count} '
                      f'hosts; accepted: a multiple of {process_count}')
