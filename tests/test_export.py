"""Export of ResNet backbones to torchvision state dicts (.pth written without torch, and .npz).

The torch checks need a CPU torch (``pip install torch==2.13.0``); torchvision is required too
(``pip install --no-deps torchvision==0.28.0``, as .ci/run does): with it the exported files are compared with
``torchvision.models.resnet18/50``, without it with ``TorchResNet`` below, which copies
torchvision's module layout. A missing torch or torchvision is an error, not a skip.
"""
from __future__ import annotations

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import export
from ssl_jax.models import resnet

import torch  # required: pip install torch==2.13.0 (CPU build; .ci/run installs it)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def np_variables(model, x_shape, seed=0):
  """Random variables of the right structure, filled from numpy (no RNG compile): conv kernels
  N(0, 2/fan_out), and BN scale / bias / running statistics away from their init values so a
  wrong mapping shows."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct(x_shape, jnp.float32))

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return rng.normal(0.0, np.sqrt(2.0 / (np.prod(shape[:-2]) * shape[-1])),
                        shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_fc(in_dim, num_classes, seed=1):
  rng = np.random.default_rng(seed)
  return {'kernel': rng.normal(0, in_dim**-0.5, (in_dim, num_classes)).astype(np.float32),
          'bias': rng.normal(0, 0.1, (num_classes,)).astype(np.float32)}


def jax_logits(model, variables, fc, x_nhwc):
  pooled = jax.jit(lambda v, x: model.apply(v, x, train=False)['pooled'])(variables, x_nhwc)
  return np.asarray(pooled) @ fc['kernel'] + fc['bias']


torchvision = export.import_torchvision()
assert torchvision is not None, "pip install --no-deps torchvision==0.28.0 (as .ci/run does)"

if torch is not None:
  tnn = torch.nn

  class TorchBlock(tnn.Module):
    """torchvision's BasicBlock (expansion 1) or Bottleneck (expansion 4), same attribute names."""

    def __init__(self, bottleneck: bool, inplanes: int, planes: int, stride: int):
      super().__init__()
      self.bottleneck = bottleneck
      exp = 4 if bottleneck else 1
      if bottleneck:
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
      else:
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride if bottleneck else 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      if bottleneck:
        self.conv3 = tnn.Conv2d(planes, planes * exp, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * exp)
      self.downsample = None
      if stride != 1 or inplanes != planes * exp:
        self.downsample = tnn.Sequential(
            tnn.Conv2d(inplanes, planes * exp, 1, stride, bias=False),
            tnn.BatchNorm2d(planes * exp))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.bottleneck:
        y = self.bn3(self.conv3(torch.relu(y)))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class TorchResNet(tnn.Module):
    """torchvision.models.ResNet's layout (keys and forward) with any base width and stem."""

    def __init__(self, bottleneck, layers, base=64, stem='imagenet', num_classes=1000):
      super().__init__()
      if stem == 'imagenet':
        self.conv1 = tnn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
      else:
        self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.maxpool = tnn.Identity()
      self.bn1 = tnn.BatchNorm2d(base)
      exp, inplanes = (4 if bottleneck else 1), base
      for i, n in enumerate(layers):
        blocks = []
        for j in range(n):
          blocks.append(TorchBlock(bottleneck, inplanes, base * 2**i, 2 if i and not j else 1))
          inplanes = base * 2**i * exp
        setattr(self, f'layer{i + 1}', tnn.Sequential(*blocks))
      self.fc = tnn.Linear(inplanes, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for i in range(4):
        x = getattr(self, f'layer{i + 1}')(x)
      return self.fc(x.mean(dim=(2, 3)))


def torch_model(name: str, stem: str = 'imagenet', base: int | None = None, num_classes=1000):
  """torchvision's model for resnet18/34/50 when available (adapted as export.py documents for
  the cifar stem), else TorchResNet."""
  block, layers, default_base = resnet.RESNET_SPECS[name]
  base = base or default_base
  if torchvision is not None and name != 'resnet_tiny' and base == 64:
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if stem == 'cifar':
      model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
      model.maxpool = torch.nn.Identity()
    return model.eval()
  return TorchResNet(block == 'bottleneck', layers, base, stem, num_classes).eval()


# ------------------------------------------------------------------------------------------------
# tests without torch
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  model = resnet.get_backbone('resnet_tiny', stem='imagenet')
  variables = np_variables(model, (1, 32, 32, 3))
  fc = random_fc(resnet.feature_dims('resnet_tiny')['pooled'], 10)
  return model, variables, fc


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_state_dict_keys_and_layout(tiny):
  model, variables, fc = tiny
  sd = export.to_torchvision_state_dict(variables['params'], variables['batch_stats'], fc)
  keys = list(sd)
  assert keys[:6] == ['conv1.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean',
                      'bn1.running_var', 'bn1.num_batches_tracked']
  assert keys[-2:] == ['fc.weight', 'fc.bias']
  assert 'layer2.0.downsample.0.weight' in sd and 'layer2.0.downsample.1.running_var' in sd
  assert 'layer1.0.downsample.0.weight' not in sd
  kernel = variables['params']['layer2_0']['conv1']['kernel']  # HWIO
  np.testing.assert_array_equal(sd['layer2.0.conv1.weight'], kernel.transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd['layer3.0.bn2.running_var'],
                                variables['batch_stats']['layer3_0']['bn2']['var'])
  assert sd['fc.weight'].shape == (10, 64)
  assert sd['bn1.num_batches_tracked'].dtype == np.int64 and sd['bn1.num_batches_tracked'].ndim == 0
  # A whole model's variables (backbone as a submodule named 'backbone') work too.
  wrapped = export.to_torchvision_state_dict({'backbone': variables['params'], 'head': {}},
                                             {'backbone': variables['batch_stats']})
  assert list(wrapped) == keys[:-2]


def test_npz_round_trip(tiny, tmp_path):
  model, variables, fc = tiny
  path = export.export_resnet(variables['params'], variables['batch_stats'],
                              tmp_path / 'tiny.npz', fmt='npz', fc=fc)
  with np.load(path) as data:
    assert list(data.files) == list(export.to_torchvision_state_dict(
        variables['params'], variables['batch_stats'], fc))
  params, batch_stats, fc2 = export.load_resnet(path)
  _assert_tree_equal(params, variables['params'])
  _assert_tree_equal(batch_stats, variables['batch_stats'])
  _assert_tree_equal(fc2, fc)


def test_pth_round_trip_without_torch(tiny, tmp_path):
  model, variables, fc = tiny
  path = export.export_resnet(variables['params'], variables['batch_stats'],
                              tmp_path / 'tiny.pth', fc=fc, num_batches_tracked=7)
  with zipfile.ZipFile(path) as zf:
    assert {'archive/data.pkl', 'archive/version', 'archive/byteorder'} <= set(zf.namelist())
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      if info.filename.startswith('archive/data/'):
        header = 30 + len(info.filename) + len(info.extra)
        assert (info.header_offset + header) % 64 == 0  # aligned like torch's writer
  sd = export.load_state_dict(path)
  assert int(sd['layer4.0.bn1.num_batches_tracked']) == 7
  params, batch_stats, fc2 = export.load_resnet(path)
  _assert_tree_equal(params, variables['params'])
  _assert_tree_equal(batch_stats, variables['batch_stats'])
  _assert_tree_equal(fc2, fc)


def test_bad_inputs_raise(tiny, tmp_path):
  _, variables, _ = tiny
  with pytest.raises(ValueError, match='onnx'):
    export.export_resnet(variables['params'], variables['batch_stats'], tmp_path / 'x', fmt='onnx')
  with pytest.raises(ValueError, match='proj'):
    export.to_torchvision_state_dict({**variables['params'], 'proj': {}}, variables['batch_stats'])


# ------------------------------------------------------------------------------------------------
# tests against torch
# ------------------------------------------------------------------------------------------------

def _logits_match(name, stem, size, tmp_path, base=None, num_classes=10):
  jmodel = resnet.get_backbone(name, stem=stem, base_width=base)
  variables = np_variables(jmodel, (1, size, size, 3))
  fc = random_fc(resnet.feature_dims(name, base_width=base)['pooled'], num_classes)
  path = export.export_resnet(variables['params'], variables['batch_stats'],
                              tmp_path / f'{name}_{stem}.pth', fc=fc)
  state_dict = torch.load(path, weights_only=True)
  tmodel = torch_model(name, stem, base, num_classes)
  tmodel.load_state_dict(state_dict, strict=True)
  x = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    t_logits = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  j_logits = jax_logits(jmodel, variables, fc, jnp.asarray(x))
  np.testing.assert_allclose(j_logits, t_logits, rtol=1e-3, atol=1e-3 * np.abs(t_logits).max())
  return path, tmodel, variables, fc


@pytest.mark.parametrize('stem,size', [('imagenet', 45), ('cifar', 27)])  # odd sizes: padding
def test_pth_gives_same_logits_in_torch_tiny(stem, size, tmp_path):
  _logits_match('resnet_tiny', stem, size, tmp_path)


@pytest.mark.parametrize('stem,size', [('imagenet', 64), ('cifar', 32)])
def test_pth_gives_same_logits_in_torchvision_resnet18(stem, size, tmp_path):
  """With the cifar stem the torchvision model is adapted as export.py's docstring says."""
  path, tmodel, variables, fc = _logits_match('resnet18', stem, size, tmp_path)
  if stem == 'cifar':
    return
  # And back: a state dict saved by torch itself loads into the JAX model's layout.
  torch.save(tmodel.state_dict(), tmp_path / 'from_torch.pth')
  params, batch_stats, fc2 = export.load_resnet(tmp_path / 'from_torch.pth')
  _assert_tree_equal(params, variables['params'])
  _assert_tree_equal(batch_stats, variables['batch_stats'])
  _assert_tree_equal(fc2, fc)


def test_resnet50_keys_and_shapes_match_torchvision(tmp_path):
  jmodel = resnet.get_backbone('resnet50', stem='imagenet')
  shapes = jax.eval_shape(lambda x: jmodel.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  path = export.export_resnet(zeros['params'], zeros['batch_stats'], tmp_path / 'r50.pth')
  state_dict = torch.load(path, weights_only=True, mmap=True)
  reference = torch_model('resnet50').state_dict()
  assert list(state_dict) == [k for k in reference if not k.startswith('fc.')]
  for k, v in state_dict.items():
    assert v.shape == reference[k].shape and v.dtype == reference[k].dtype, k
  missing, unexpected = torch_model('resnet50').load_state_dict(state_dict, strict=False)
  assert set(missing) == {'fc.weight', 'fc.bias'} and not unexpected


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_fallback_torch_resnet_matches_torchvision_layout(name):
  assert torchvision.models.ResNet is not None
  block, layers, _ = resnet.RESNET_SPECS[name]
  ours = TorchResNet(block == 'bottleneck', layers).state_dict()
  ref = getattr(torchvision.models, name)().state_dict()
  assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in ref.items()]


@pytest.mark.parametrize('name,stem,base,size', [
    ('resnet18', 'cifar', 16, 32), ('resnet18', 'imagenet', None, 64),
    pytest.param('resnet50', 'cifar', 8, 32, marks=pytest.mark.slow)])   # bottlenecks: in CI
def test_torchvision_model_drop_in_gives_our_features_on_raw_uint8(name, stem, base, size,
                                                                    tmp_path):
  """``export.torchvision_model``: stock torchvision classes, the preprocessing inside, raw
  uint8 NCHW in -> exactly our pooled backbone features on the normalised NHWC images."""
  from ssl_jax.models.normalize import normalize
  jmodel = resnet.get_backbone(name, stem=stem, base_width=base)
  variables = np_variables(jmodel, (1, size, size, 3))
  path = export.export_resnet(variables['params'], variables['batch_stats'], tmp_path / 'b.pth')
  model = export.torchvision_model(path)
  assert isinstance(model[1], torchvision.models.ResNet) and not model.training
  images = np.random.default_rng(3).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  ours = np.asarray(jax.jit(lambda v, x: jmodel.apply(v, normalize(x), train=False)['pooled'])(
      variables, jnp.asarray(images)))
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert theirs.shape == ours.shape
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
  # Without the preprocessing the raw pixels give other features: the helper's step matters.
  with torch.no_grad():
    raw = model[1](torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)))
  assert not np.allclose(raw.numpy(), ours, rtol=1e-2)


def test_load_snippet_runs_on_a_stock_torchvision_resnet18(tmp_path):
  """The by-hand recipe of export.json / README, executed as written on a CIFAR-stem export."""
  from ssl_jax.models.normalize import normalize
  jmodel = resnet.get_backbone('resnet18', stem='cifar')
  variables = np_variables(jmodel, (1, 32, 32, 3))
  export.export_resnet(variables['params'], variables['batch_stats'], tmp_path / 'backbone.pth')
  images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  scope = {'uint8_images_nchw': torch.from_numpy(images.transpose(0, 3, 1, 2).copy())}
  import torchvision.transforms.v2  # noqa: F401  (the snippet uses it)
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    with torch.no_grad():
      exec(export.load_snippet('resnet18', 'cifar', 64), scope)  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  ours = np.asarray(jmodel.apply(variables, normalize(jnp.asarray(images)), train=False)['pooled'])
  np.testing.assert_allclose(scope['features'].numpy(), ours, rtol=1e-4,
                             atol=1e-4 * np.abs(ours).max())
