"""ResNet backbones and MLP heads: shapes, parameter counts, precision, BatchNorm semantics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax.models import heads, resnet

NAMES = ('resnet18', 'resnet34', 'resnet50', 'resnet_tiny')


def np_variables(model, x_shape, seed=0, randomize=False):
  """The model's variables filled from numpy (skips compiling the init's threefry RNG, which
  is slow on a CPU): conv kernels N(0, 2/fan_out), Dense N(0, 1/fan_in); BN scale 1, bias 0,
  mean 0, var 1, or random values around those with ``randomize``."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct(x_shape, jnp.float32))

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      std = np.sqrt(2.0 / (np.prod(shape[:-2]) * shape[-1])) if len(shape) == 4 else shape[0]**-0.5
      return rng.normal(0.0, std, shape).astype(np.float32)
    if name in ('scale', 'var'):
      return (rng.uniform(0.5, 1.5, shape) if randomize else np.ones(shape)).astype(np.float32)
    return (rng.normal(0.0, 0.1, shape) if randomize else np.zeros(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _torch_out(size: int, k: int, s: int, p: int) -> int:
  return (size + 2 * p - k) // s + 1


def _expected_hw(size: int, stem: str) -> list[int]:
  """PyTorch's output sizes for each stage (conv/pool arithmetic with floor)."""
  if stem == 'imagenet':
    size = _torch_out(_torch_out(size, 7, 2, 3), 3, 2, 1)
  out = [size]
  for _ in range(3):
    size = _torch_out(size, 3, 2, 1)
    out.append(size)
  return out


def _shapes(model, x_shape):
  """(variables, eval-mode outputs) as shapes only: nothing is compiled or computed."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


@pytest.mark.parametrize('stem,size', [('imagenet', 50), ('cifar', 27)])
@pytest.mark.parametrize('name', NAMES)
def test_stage_shapes_and_strides(name, stem, size):
  model = resnet.get_backbone(name, stem=stem)
  _, out = _shapes(model, (2, size, size, 3))
  dims = resnet.feature_dims(name)
  hw = _expected_hw(size, stem)
  first = 4 if stem == 'imagenet' else 1        # the stem's down-sampling before stage 1
  for i in range(4):
    key = f'stage{i + 1}'
    assert out[key].shape == (2, hw[i], hw[i], dims[key]), key
    assert hw[i] == -(-size // (first * 2**i))  # ceil(size / stride), as PyTorch
  assert out['pooled'].shape == (2, dims['pooled'])
  assert out['pooled'].dtype == jnp.float32


def test_feature_dims():
  assert resnet.feature_dims('resnet50') == {
      'stage1': 256, 'stage2': 512, 'stage3': 1024, 'stage4': 2048, 'pooled': 2048}
  assert resnet.feature_dims('resnet18', width=0.5)['pooled'] == 256
  assert resnet.feature_dims('resnet_tiny')['stage1'] == 8
  assert resnet.feature_dims('resnet18', base_width=16)['stage4'] == 128
  assert resnet.get_backbone('resnet18', stem='cifar', width=0.25).base_width == 16


def test_unknown_names_raise():
  with pytest.raises(ValueError, match=r"'resnet101'.*resnet18, resnet34, resnet50, resnet_tiny"):
    resnet.get_backbone('resnet101', stem='cifar')
  with pytest.raises(ValueError, match='resnet101'):
    resnet.feature_dims('resnet101')
  with pytest.raises(ValueError, match=r"'tiny'.*cifar, imagenet"):
    resnet.get_backbone('resnet18', stem='tiny')


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,expected', [('resnet18', 11_689_512), ('resnet50', 25_557_032)])
def test_param_count_matches_torchvision(name, expected):
  variables, _ = _shapes(resnet.get_backbone(name, stem='imagenet'), (1, 32, 32, 3))
  pooled = resnet.feature_dims(name)['pooled']
  assert _count(variables['params']) + pooled * 1000 + 1000 == expected


def test_module_names_follow_torchvision():
  variables, _ = _shapes(resnet.get_backbone('resnet50', stem='imagenet'), (1, 32, 32, 3))
  params = variables['params']
  assert set(params) == {'conv1', 'bn1'} | {
      f'layer{i + 1}_{j}' for i, n in enumerate((3, 4, 6, 3)) for j in range(n)}
  assert set(params['layer2_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                     'downsample_conv', 'downsample_bn'}
  assert 'downsample_conv' not in params['layer2_1']
  # v1.5: the stride sits on the 3x3 conv; shapes are HWIO.
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['layer1_0']['downsample_conv']['kernel'].shape == (1, 1, 64, 256)
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert set(variables['batch_stats']['bn1']) == {'mean', 'var'}


@pytest.fixture(scope='module')
def tiny():
  """resnet_tiny (cifar stem), its variables, a batch, and jitted train / eval applies."""
  model = resnet.get_backbone('resnet_tiny', stem='cifar')
  x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, (8, 16, 16, 3)), jnp.float32)
  variables = np_variables(model, x.shape)
  # Train mode also captures the stem BN's output (for the BatchNorm test).
  train_fn = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'bn1' and mdl.parent.name is None))
  eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, variables, x, train_fn, eval_fn


def test_kaiming_fan_out_init():
  kernel = np.asarray(resnet.conv_init(jax.random.key(1), (3, 3, 64, 64)))
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.05)
  assert np.abs(kernel).max() > 2.5 * np.sqrt(2.0 / (9 * 64))  # untruncated normal
  bn = jax.eval_shape(lambda: resnet._bn(False, jnp.float32, 'bn').init(
      jax.random.key(0), jnp.zeros((1, 4))))
  assert set(bn['params']) == {'scale', 'bias'}


def test_bfloat16_compute(tiny):
  _, variables, x, train_fn, _ = tiny
  model16 = resnet.get_backbone('resnet_tiny', stem='cifar', dtype=jnp.bfloat16)
  v16 = jax.eval_shape(lambda x: model16.init(jax.random.key(1), x, train=False), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v16))  # params stay f32
  out32, _ = train_fn(variables, x)
  out16, new_stats = jax.jit(
      lambda v, x: model16.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert out16['pooled'].dtype == jnp.float32
  assert out16['stage4'].dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_stats['batch_stats']))
  a, b = np.asarray(out32['pooled']), np.asarray(out16['pooled'])
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3


def test_batchnorm_train_uses_batch_statistics(tiny):
  _, variables, x, train_fn, eval_fn = tiny
  out, state = train_fn(variables, x)
  y = np.asarray(state['intermediates']['bn1']['__call__'][0])  # stem BN output (scale 1, bias 0)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-2)
  # The running mean moves by (1 - momentum) towards the batch mean of conv1's output.
  kernel = variables['params']['conv1']['kernel']
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(state['batch_stats']['bn1']['mean'],
                             0.1 * np.asarray(conv).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Train mode couples the examples of a batch; eval mode does not.
  x2 = x.at[0].multiply(3.0)
  assert not np.allclose(train_fn(variables, x2)[0]['pooled'][1:], out['pooled'][1:], atol=1e-4)
  np.testing.assert_allclose(eval_fn(variables, x2)['pooled'][1:],
                             eval_fn(variables, x)['pooled'][1:], atol=1e-6)


def test_batchnorm_statistics_are_global_under_sharding(tiny):
  _, variables, x, train_fn, _ = tiny
  n = min(4, jax.device_count())
  mesh = jax.make_mesh((n,), ('data',), devices=jax.devices()[:n])
  ref_out, ref_state = train_fn(variables, x)
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  out, state = train_fn(variables, xs)
  stats, ref_stats = state['batch_stats'], ref_state['batch_stats']
  np.testing.assert_allclose(out['pooled'], ref_out['pooled'], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats,
               ref_stats)


def _init_head(head, x):
  return np_variables(head, x.shape)


def test_byol_and_moco_heads():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)), jnp.float32)
  byol = heads.MLP(hidden_dim=32, out_dim=8, dtype=jnp.bfloat16)
  v = _init_head(byol, x)
  assert set(v['params']) == {'dense_0', 'bn_0', 'dense_1'}
  assert set(v['params']['dense_0']) == {'kernel', 'bias'}
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
  y, _ = byol.apply(v, x, train=True, mutable=['batch_stats'])
  assert y.shape == (4, 8) and y.dtype == jnp.float32

  moco = heads.MLP(hidden_dim=32, out_dim=8, use_bn=False)
  v = _init_head(moco, x)
  assert set(v['params']) == {'dense_0', 'dense_1'} and 'batch_stats' not in v
  assert moco.apply(v, x, train=True).shape == (4, 8)


def test_aps_projector_last_bn_has_no_affine():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16)), jnp.float32)
  aps = heads.MLP(hidden_dim=32, out_dim=8, num_layers=3, use_bias=False, last_bn=True,
                  last_bn_affine=False)
  v = _init_head(aps, x)
  assert set(v['params']) == {'dense_0', 'bn_0', 'dense_1', 'bn_1', 'dense_2'}  # bn_2: no params
  assert all(set(v['params'][f'dense_{i}']) == {'kernel'} for i in range(3))
  assert set(v['params']['bn_1']) == {'scale', 'bias'}
  assert set(v['batch_stats']) == {'bn_0', 'bn_1', 'bn_2'}
  y, _ = aps.apply(v, x, train=True, mutable=['batch_stats'])
  assert y.shape == (6, 8) and y.dtype == jnp.float32
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)  # BN without affine: standardised output
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-2)
