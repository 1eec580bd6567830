"""Config parsing and validation: every preset builds; bad input names the key and the choices."""
import importlib.util
import os
import subprocess
import sys

import pytest

from ssl_jax import config_lib

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
METHOD_CONFIGS = ('byol', 'moco', 'msf', 'ft', 'clim', 'csml')


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize('name', METHOD_CONFIGS)
@pytest.mark.parametrize('preset', ['cifar10', 'cifar100', 'imagenet100', 'imagenet',
                                    'cifar10,runlocal', 'cifar10,resnet50,bs=64,epochs=3'])
def test_every_preset_validates(name, preset):
  c = _load(name).get_config(preset)
  config_lib.validate(c, num_devices=1)
  if 'bs=64' in preset:
    assert c.batch_size == 64 and c.total_epochs == 3 and c.model.backbone == 'resnet50'
  if 'runlocal' in preset:
    assert c.model.backbone == 'resnet_tiny' and c.total_steps > 0


def test_docstrings_carry_command_and_expectation():
  for name in METHOD_CONFIGS:
    doc = _load(name).__doc__
    assert 'python -m ssl_jax.main' in doc and f'configs/{name}.py' in doc, name
    assert '%' in doc, f'{name}: expected accuracy missing'


@pytest.mark.parametrize('arg, match', [
    ('cifar11', r"'cifar11' is not recognised; accepted: a dataset \(cifar10, cifar100"),
    ('cifar10,bs=abc', r'bs must be an integer'),
    ('cifar10,lr=3', r"unknown key 'lr'"),
])
def test_bad_config_args(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    _load('byol').get_config(arg)


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
  c = _load('byol').get_config('cifar10')
  section, field = key.split('.')
  c[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, num_devices=1)


def test_batch_that_does_not_divide_across_devices():
  c = _load('moco').get_config('cifar10')
  c.batch_size = 30
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=30 does not divide across 4 devices'):
    config_lib.validate(c, num_devices=4)


def test_cli_typo_stops_before_compiling(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'ssl_jax.main',
                      '--config=configs/byol.py:cifar10,runlocal', f'--workdir={tmp_path}',
                      '--config.optimizer.nmae=lars'], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert 'nmae' in r.stderr, r.stderr[-2000:]
  r = subprocess.run([sys.executable, '-m', 'ssl_jax.main',
                      '--config=configs/byol.py:cifar10,runlocal', f'--workdir={tmp_path}',
                      '--config.optimizer.name=adam'], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "config.optimizer.name='adam' is invalid; accepted: sgd, lars, adamw" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


@pytest.mark.parametrize('preset', ['cifar10', 'cifar100', 'imagenet', 'cifar10,runlocal',
                                    'cifar10,vit_tiny', 'cifar100,vit_base,bs=64'])
def test_aps_presets_validate(preset):
  c = _load('aps').get_config(preset)
  config_lib.validate(c, num_devices=1)
  assert c.model.backbone.startswith('vit') and c.model.patch_size >= 1
  assert 'python -m ssl_jax.main' in _load('aps').__doc__


def test_runlocal_keeps_a_backbone_the_user_named():
  from harness import load_config
  assert load_config('byol', 'cifar10,resnet18,runlocal').model.backbone == 'resnet18'
  assert load_config('byol', 'cifar10,runlocal').model.backbone == 'resnet_tiny'
  assert load_config('moco', 'resnet34,runlocal').model.backbone == 'resnet34'
