"""Config parsing and validation: every preset builds; bad input names the key and the choices."""
import ast
import os
import re
import subprocess
import sys

import pytest

from harness import load_config
from ssl_jax import config_lib, train

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
METHOD_CONFIGS = ('byol', 'moco', 'msf', 'ft', 'clim', 'csml')


def _doc(name: str) -> str:
  """The module docstring of ``configs/<name>.py``."""
  with open(os.path.join(REPO, 'configs', f'{name}.py')) as f:
    return ast.get_docstring(ast.parse(f.read()))


@pytest.mark.parametrize('name', METHOD_CONFIGS)
@pytest.mark.parametrize('preset', ['cifar10', 'cifar100', 'imagenet100', 'imagenet',
                                    'cifar10,runlocal', 'cifar10,resnet50,bs=64,epochs=3'])
def test_every_preset_validates(name, preset):
  c = load_config(name, preset)
  train.validate_config(c, num_devices=1)
  if 'bs=64' in preset:
    assert c.batch_size == 64 and c.total_epochs == 3 and c.model.backbone == 'resnet50'
  if 'runlocal' in preset:
    assert c.model.backbone == 'resnet_tiny' and c.total_steps > 0


def test_docstrings_carry_command_and_expectation():
  for name in METHOD_CONFIGS:
    doc = _doc(name)
    assert 'python -m ssl_jax.main' in doc and f'configs/{name}.py' in doc, name
    assert '%' in doc, f'{name}: expected accuracy missing'


@pytest.mark.parametrize('arg, match', [
    ('cifar11', r"'cifar11' is not recognised; accepted: a dataset \(cifar10, cifar100"),
    ('cifar10,bs=abc', r'bs must be an integer'),
    ('cifar10,lr=3', r"unknown key 'lr'"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    load_config('byol', arg)


@pytest.mark.parametrize('key, value, match', [
    ('optimizer.name', 'adam', r'config\.optimizer\.name=.adam. is invalid; accepted: sgd, lars, adamw'),
    ('model.backbone', 'resnet19', r'model\.backbone=.resnet19. is invalid; accepted: resnet18'),
    ('model.dtype', 'float16', r'accepted: float32, bfloat16'),
    ('ema.base', 1.5, r'ema\.base=1\.5 is invalid'),
    ('optimizer.base_lr', float('nan'), r'optimizer\.base_lr=nan is invalid'),
    ('data.views', 'tripple', r'data\.views=.tripple. is invalid; accepted: byol'),
    ('method.name', 'simclr', r'method\.name=.simclr. is invalid; accepted: '),
])
def test_invalid_values_name_key_and_choices(key, value, match):
  c = load_config('byol', 'cifar10')
  section, field = key.split('.')
  c[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    train.validate_config(c, num_devices=1)


def test_batch_that_does_not_divide_across_devices():
  c = load_config('moco', 'cifar10')
  c.batch_size = 30
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=30 does not divide across 4 devices'):
    train.validate_config(c, num_devices=4)


_ENTRY_ERRORS = [
    # (arguments, what the one line must say)
    (['--config=configs/byol.pyy:cifar10'],
     r"^Config error: config file 'configs/byol.pyy' does not exist; available: .*configs/byol.py"),
    (['--config=configs/byol.py:cifar10,runlocl'],
     r"^Config error: config arg token 'runlocl' is not recognised; accepted: .*runlocal"),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.optimizer.bse_lr=0.1'],
     r'^Config error: --config.optimizer.bse_lr: no such config key; did you mean '
     r'--config.optimizer.base_lr\?$'),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.knn.train_examples=64'],
     r'^Config error: --config.knn.train_examples: no such config key; did you mean '
     r'--config.evals.knn.train_examples\?$'),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.optimizer.name=adam'],
     r"^Config error: config.optimizer.name='adam' is invalid; accepted: sgd, lars, adamw$"),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.data.data_dir=/nonexistent'],
     r"^Config error: TFDS dataset 'cifar10' was not found .* Fix: point --config.data.data_dir"),
    (['--config=configs/eval_knn.py:cifar10', '--mode=knn',
      '--config.pretrained=/nonexistent_run'], r'^Config error: .*nonexistent_run'),
    (['--config=configs/eval.py:cifar10', '--mode=eval', '--config.pretrained=/nonexistent_run'],
     r'^Config error: .*nonexistent_run'),
    (['--config=configs/eval.py:cifar10,runlocal', '--mode=eval', '--config.pretrained=/x',
      '--config.evals.knn.at_start=False'],
     r'^Config error: --config.evals.knn.at_start: no such config key'),
    (['--config=configs/byol.py:cifar10,runlocal', '--batch_size=64'],
     r"^Flag error: Unknown command line flag 'batch_size'; did you mean --config.batch_size\?$"),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.optimizer.learning_rate=0.1'],
     r'^Config error: --config.optimizer.learning_rate: no such config key; did you mean '
     r'--config.optimizer.base_lr\?$'),
    (['--config=configs/byol.py:cifar10,runlocal', '--config.epochs=3'],
     r'^Config error: --config.epochs: no such config key; did you mean '
     r'--config.total_epochs\?$'),
]


@pytest.mark.slow
@pytest.mark.parametrize('args,line', [
    (['--config=configs/byol.py:cifar10,runlocal'],
     'Flag error: --workdir is required, e.g. --config=configs/byol.py:cifar10,runlocal '
     '--workdir=/tmp/byol'),
    ([], 'Flag error: --config and --workdir are required, e.g. '
         '--config=configs/byol.py:cifar10,runlocal --workdir=/tmp/byol'),
    (['--config=configs/byol.py:cifar10,runlocal', '--work_dir=/tmp/x'],
     "Flag error: Unknown command line flag 'work_dir'. Did you mean: workdir ?"),
])
def test_missing_or_mistyped_program_flags_are_one_line_exit_2(args, line):
  r = subprocess.run([sys.executable, '-m', 'ssl_jax.main', *args], cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                     timeout=300)
  assert (r.returncode, r.stderr.strip(), r.stdout) == (2, line, ''), r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('args,line', _ENTRY_ERRORS)
def test_entry_point_errors_are_one_line_exit_2_and_write_nothing(args, line, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  workdir = tmp_path / 'w'
  r = subprocess.run([sys.executable, '-m', 'ssl_jax.main', *args, f'--workdir={workdir}'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert re.search(line, lines[0]), lines[0]
  assert not workdir.exists()


@pytest.mark.slow
def test_unwritable_workdir_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'ssl_jax.main',
                      '--config=configs/byol.py:cifar10,runlocal', '--workdir=/proc/foo'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip() == ('Config error: --workdir=/proc/foo cannot be written (No such file '
                              'or directory); choose a directory you can write to.'), r.stderr


@pytest.mark.parametrize('preset', ['cifar10', 'cifar100', 'imagenet', 'cifar10,runlocal',
                                    'cifar10,vit_tiny', 'cifar100,vit_base,bs=64'])
def test_aps_presets_validate(preset):
  c = load_config('aps', preset)
  train.validate_config(c, num_devices=1)
  assert c.model.backbone.startswith('vit') and c.model.patch_size >= 1
  assert 'python -m ssl_jax.main' in _doc('aps')


def test_runlocal_keeps_a_backbone_the_user_named():
  assert load_config('byol', 'cifar10,resnet18,runlocal').model.backbone == 'resnet18'
  assert load_config('byol', 'cifar10,runlocal').model.backbone == 'resnet_tiny'
  assert load_config('moco', 'resnet34,runlocal').model.backbone == 'resnet34'


@pytest.mark.parametrize('vit, base_lr', [('vit_tiny', 1e-3), ('vit_small', 5e-4),
                                          ('vit_base', 5e-4)])
def test_aps_cifar_values_are_the_released_ones(vit, base_lr):
  """config/pretrain/vit_*_pretrain.py lr_base (lr = lr_base x 512 / 256) and the timm Block
  ViT (no qkv bias, LayerNorm eps 1e-5) of the official APS code."""
  for dataset in ('cifar10', 'cifar100'):
    c = load_config('aps', f'{dataset},{vit}')
    assert c.optimizer.base_lr == base_lr and c.batch_size == 512
    assert c.optimizer.base_lr * c.batch_size / 256 == pytest.approx(2 * base_lr)
    assert c.model.qkv_bias is False and c.model.layer_norm_eps == 1e-5
    assert (c.optimizer.weight_decay, c.optimizer.warmup_epochs, c.total_epochs) == (
        0.05, 20.0, 1600)
  for key, value in (('qkv_bias', 'no'), ('layer_norm_eps', 0.0)):
    bad = load_config('aps', f'cifar10,{vit}')
    bad.model = type(bad.model)({**bad.model.to_dict(), key: value})  # bypass type-safety
    with pytest.raises(config_lib.ConfigError, match=rf'model\.{key}='):
      train.validate_config(bad, num_devices=1)


def test_config_docstrings_table_the_reference():
  """configs/aps.py and configs/eval_finetune.py carry field | ours | reference | source tables
  and a Deviations list."""
  for name in ('aps', 'eval_finetune'):
    doc = _doc(name)
    assert 'field' in doc and 'reference' in doc and 'source' in doc, name
    assert 'Deviations' in doc and 'visresearch/aps' in doc, name


def test_stray_fields_under_the_bank_search_key_are_an_error():
  """config.knn holds only the methods' bank search's recall_target: a stale
  ``knn.train_examples`` (the evaluators are under config.evals) would be silently ignored, so
  it is an error, which names the key and what config.knn is for (not an evaluator)."""
  c = load_config('byol', 'cifar10,runlocal')
  c.knn.train_examples = 64
  with pytest.raises(config_lib.ConfigError,
                     match=r'config\.knn\.train_examples=.*only knn\.recall_target \(the top-k '
                           r"search of the methods' memory banks\)$"):
    train.validate_config(c, num_devices=1)


def test_config_lib_imports_no_method_code():
  """The method's name is checked by the registry (methods.get) or against names passed in."""
  imported = set()
  for node in ast.walk(ast.parse(open(config_lib.__file__).read())):
    if isinstance(node, ast.ImportFrom):
      imported.update(f'{node.module}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
  assert not [m for m in imported if 'methods' in m], imported
  c = load_config('byol', 'cifar10,runlocal')
  c.method.name = 'simclr'
  config_lib.validate(c)   # no names given: not checked here
  with pytest.raises(config_lib.ConfigError, match=r'method\.name=.simclr. is invalid; accepted: a, b'):
    config_lib.validate(c, method_names=('a', 'b'))
