"""Export a ResNet backbone to a torchvision state dict: ``.pth`` (written without torch), ``.npz``.

``export_resnet(params, batch_stats, path, fmt='pth')`` takes the Flax variables of
``ssl_jax.models.resnet.ResNet`` and writes the state dict that
``torchvision.models.resnet{18,34,50}`` loads with ``load_state_dict`` (``strict=False`` when
``fc`` is not exported)::

  import torch, torchvision
  model = torchvision.models.resnet50()
  missing, unexpected = model.load_state_dict(torch.load('backbone.pth'), strict=False)
  assert set(missing) == {'fc.weight', 'fc.bias'} and not unexpected

The name mapping is the rule of ``resnet.py``: ``layer{i}_{j}`` → ``layer{i}.{j}``,
``downsample_conv`` / ``downsample_bn`` → ``downsample.0`` / ``downsample.1``; conv ``kernel``
``[kh, kw, in, out]`` → ``weight`` ``[out, in, kh, kw]``; BN ``scale``/``bias``/``mean``/``var`` →
``weight``/``bias``/``running_mean``/``running_var``, plus ``num_batches_tracked`` (int64 scalar,
0 unless given: it only matters for PyTorch's ``momentum=None``). An optional ``fc`` (a Flax Dense
params dict ``{'kernel': [C, K], 'bias': [K]}``, e.g. the online probe's) becomes ``fc.weight``
``[K, C]`` / ``fc.bias``. Keys come in torchvision's order; values are float32.

The drop-in way: :func:`torchvision_model` builds the matching torchvision ResNet (CIFAR stem,
any width), loads the file and puts the input preprocessing inside, so raw uint8 images give
the features our backbone computes::

  import numpy as np, torch
  from PIL import Image
  from ssl_jax.export import torchvision_model
  model = torchvision_model('OUT/backbone.pth')             # eval mode; fc = Identity
  image = np.array(Image.open('cat.png').convert('RGB'))    # uint8 [H, W, 3], RGB
  images = torch.from_numpy(image).permute(2, 0, 1)[None]   # uint8 [N, 3, H, W]
  with torch.no_grad():
    features = model(images)  # [N, C]: the pooled backbone features

C = 8 x the base width for ResNet-18/34 (512 at width 1; 64 for the README quick start's
ResNet-18 at 1/8 width, base 8), 32 x the base width for ResNet-50 (``export.json`` records
``base_width``). Pillow reads the image: ``torchvision.io`` needs torchvision's C extensions,
which a CUDA torchvision beside a CPU torch cannot load (:func:`import_torchvision`).

By hand, with a stock torchvision model: see :data:`LOAD_SNIPPET` (also in ``export.json``).

Stems: only ``stem='imagenet'`` ResNets are exactly torchvision's architecture. A ``stem='cifar'``
backbone exports fine, but its ``conv1.weight`` is ``[64, 3, 3, 3]`` and it has no max-pool, so
the torchvision model must be adapted before loading::

  model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
  model.maxpool = torch.nn.Identity()

(with ``64`` the exported base width). Width multipliers other than 1 change every channel count;
build the torch model with matching widths.

The ``.pth`` writer implements PyTorch's zip serialization (``torch.save``'s default since 1.6):
a zip archive, stored uncompressed, of ``archive/data.pkl`` (a protocol-2 pickle of an
``OrderedDict`` of ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False,
OrderedDict())`` calls, each storage a persistent id ``('storage', torch.FloatStorage, key, 'cpu',
numel)``), ``archive/data/<key>`` (raw little-endian bytes, 64-byte aligned like torch's writer),
``archive/byteorder`` and ``archive/version``. ``torch.load`` reads it with the default
``weights_only=True``. ``load_state_dict`` reads such files (and ordinary ``torch.save`` state
dicts) back into numpy without torch; ``load_resnet`` inverts the whole export.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from ssl_jax import paths

FORMATS = ('pth', 'npz')

_BLOCK_ORDER = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv',
                'downsample_bn')
_LAYER_RE = re.compile(r'layer(\d+)_(\d+)')


# ------------------------------------------------------------------------------------------------
# Flax variables <-> torchvision state dict (numpy)
# ------------------------------------------------------------------------------------------------

def _to_dict(tree) -> dict:
  """FrozenDict / Mapping → plain nested dict (leaves untouched)."""
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _unwrap_backbone(params: dict, batch_stats: dict) -> tuple[dict, dict]:
  """Accept the backbone's own variables or a model's that holds it as submodule ``backbone``."""
  if 'conv1' not in params and 'backbone' in params:
    return params['backbone'], batch_stats.get('backbone', {})
  return params, batch_stats


def _module_order(name: str) -> tuple:
  if name == 'conv1':
    return (0,)
  if name == 'bn1':
    return (1,)
  m = _LAYER_RE.fullmatch(name)
  if m:
    return (2, int(m[1]), int(m[2]))
  raise ValueError(f'unexpected top-level ResNet module {name!r}; expected conv1, bn1, '
                   'layer{i}_{j}')


def _torch_prefix(path: tuple[str, ...]) -> str:
  parts = []
  for p in path:
    m = _LAYER_RE.fullmatch(p)
    if m:
      parts += [f'layer{m[1]}', m[2]]
    elif p == 'downsample_conv':
      parts += ['downsample', '0']
    elif p == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(p)
  return '.'.join(parts)


def _f32(x) -> np.ndarray:
  return np.array(x, dtype=np.float32, order='C')


def _add_module(sd: dict, path: tuple[str, ...], p: Mapping, s: Mapping,
                num_batches_tracked: int) -> None:
  key = _torch_prefix(path)
  if 'kernel' in p:  # conv
    kernel = np.asarray(p['kernel'])
    if kernel.ndim != 4:
      raise ValueError(f'{"/".join(path)}: expected a 4-D conv kernel, got shape {kernel.shape}')
    sd[f'{key}.weight'] = _f32(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  elif 'mean' in s:  # batch norm
    mean = _f32(s['mean'])
    sd[f'{key}.weight'] = _f32(p['scale']) if 'scale' in p else np.ones_like(mean)
    sd[f'{key}.bias'] = _f32(p['bias']) if 'bias' in p else np.zeros_like(mean)
    sd[f'{key}.running_mean'] = mean
    sd[f'{key}.running_var'] = _f32(s['var'])
    sd[f'{key}.num_batches_tracked'] = np.asarray(num_batches_tracked, dtype=np.int64)
  else:
    raise ValueError(f'{"/".join(path)}: neither a conv (kernel) nor a BatchNorm (batch_stats '
                     f'mean/var); params keys {sorted(p)}, batch_stats keys {sorted(s)}')


def _fc_params(fc) -> dict | None:
  if fc is None:
    return None
  fc = _to_dict(fc)
  if 'kernel' not in fc and 'fc' in fc:
    fc = fc['fc']
  if 'kernel' not in fc:
    raise ValueError(f'fc must be a Flax Dense params dict with a kernel; got keys {sorted(fc)}')
  return fc


def to_torchvision_state_dict(params, batch_stats, fc=None, *, num_batches_tracked: int = 0
                              ) -> collections.OrderedDict[str, np.ndarray]:
  """The backbone's Flax variables as torchvision's ResNet state dict (numpy, torchvision order).

  Args:
    params: the ResNet's ``params`` collection (or a model's containing it as ``backbone``).
    batch_stats: the matching ``batch_stats`` collection.
    fc: optional Flax Dense params ``{'kernel': [C, K], 'bias': [K]}`` → ``fc.weight``/``fc.bias``.
    num_batches_tracked: value written to every BN's ``num_batches_tracked``.
  """
  params, batch_stats = _unwrap_backbone(_to_dict(params), _to_dict(batch_stats or {}))
  sd: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
  for name in sorted(set(params) | set(batch_stats), key=_module_order):
    if name in ('conv1', 'bn1'):
      _add_module(sd, (name,), params.get(name, {}), batch_stats.get(name, {}),
                  num_batches_tracked)
      continue
    p_block, s_block = params.get(name, {}), batch_stats.get(name, {})
    unknown = (set(p_block) | set(s_block)) - set(_BLOCK_ORDER)
    if unknown:
      raise ValueError(f'{name}: unexpected submodules {sorted(unknown)}; expected some of '
                       f'{_BLOCK_ORDER}')
    for sub in _BLOCK_ORDER:
      if sub in p_block or sub in s_block:
        _add_module(sd, (name, sub), p_block.get(sub, {}), s_block.get(sub, {}),
                    num_batches_tracked)
  fc = _fc_params(fc)
  if fc is not None:
    sd['fc.weight'] = _f32(np.asarray(fc['kernel']).T)
    sd['fc.bias'] = (_f32(fc['bias']) if 'bias' in fc
                     else np.zeros(sd['fc.weight'].shape[0], np.float32))
  return sd


def from_torchvision_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict, dict, dict | None]:
  """Inverse of ``to_torchvision_state_dict``: ``(params, batch_stats, fc or None)`` as numpy.

  Accepts a torchvision ResNet state dict (numpy arrays or anything ``np.asarray`` takes, e.g.
  CPU torch tensors); ``num_batches_tracked`` is dropped.
  """
  params: dict = {}
  batch_stats: dict = {}
  fc: dict = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    parts = key.split('.')
    leaf, mod = parts[-1], parts[:-1]
    if mod == ['fc']:
      fc['kernel' if leaf == 'weight' else leaf] = value.T if leaf == 'weight' else value
      continue
    path: list[str] = []
    i = 0
    while i < len(mod):
      if mod[i].startswith('layer') and i + 1 < len(mod):
        path.append(f'{mod[i]}_{mod[i + 1]}')
        i += 2
      elif mod[i] == 'downsample' and i + 1 < len(mod):
        path.append('downsample_conv' if mod[i + 1] == '0' else 'downsample_bn')
        i += 2
      else:
        path.append(mod[i])
        i += 1
    if leaf == 'num_batches_tracked':
      continue
    if leaf == 'weight' and value.ndim == 4:
      target, leaf, value = params, 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf in ('weight', 'bias'):
      target, leaf = params, ('scale' if leaf == 'weight' else 'bias')
    elif leaf in ('running_mean', 'running_var'):
      target, leaf = batch_stats, ('mean' if leaf == 'running_mean' else 'var')
    else:
      raise ValueError(f'unexpected key {key!r} in a torchvision ResNet state dict')
    node = target
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = np.array(value, order='C')
  return params, batch_stats, (fc or None)


# ------------------------------------------------------------------------------------------------
# PyTorch zip serialization, without torch
# ------------------------------------------------------------------------------------------------

_STORAGE_OF_DTYPE = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage', np.dtype(np.int64): 'LongStorage',
    np.dtype(np.int32): 'IntStorage', np.dtype(np.int16): 'ShortStorage',
    np.dtype(np.int8): 'CharStorage', np.dtype(np.uint8): 'ByteStorage',
    np.dtype(np.bool_): 'BoolStorage',
}
_DTYPE_OF_STORAGE = {v: k for k, v in _STORAGE_OF_DTYPE.items()}


class _Global:
  """Pickled as the global reference ``module.name`` (the module need not be importable here)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce requires a callable; never called here
    raise TypeError(f'{self.module}.{self.name} is a placeholder for pickling')


_REBUILD_TENSOR_V2 = _Global('torch._utils', '_rebuild_tensor_v2')
_STORAGE_GLOBALS = {name: _Global('torch', name) for name in _DTYPE_OF_STORAGE}


class _Storage:

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:

  def __init__(self, storage: _Storage, shape: tuple[int, ...]):
    self.storage, self.shape = storage, shape

  def __reduce__(self):
    stride, acc = [], 1
    for d in reversed(self.shape):
      stride.append(acc)
      acc *= d
    return (_REBUILD_TENSOR_V2, (self.storage, 0, tuple(self.shape), tuple(reversed(stride)),
                                 False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pure-Python pickler: lets us emit foreign globals
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_foreign_global(self, obj: _Global):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
    self.memoize(obj)

  dispatch[_Global] = _save_foreign_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', _STORAGE_GLOBALS[_STORAGE_OF_DTYPE[obj.dtype]], obj.key, 'cpu',
              obj.numel)
    return None


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> str:
  """Write ``{name: array}`` as a ``.pth`` that ``torch.load`` reads (torch not needed here).

  ``path``: a local path or a gs:// URL, written whole (``ssl_jax.paths.write_bytes``)."""
  path = os.fspath(path)
  arrays = collections.OrderedDict()
  tensors = collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    a = np.asarray(value)
    if a.dtype not in _STORAGE_OF_DTYPE:
      raise ValueError(f'{name}: dtype {a.dtype} has no torch storage type here; accepted: '
                       f'{", ".join(str(d) for d in _STORAGE_OF_DTYPE)}')
    a = np.array(a, dtype=a.dtype.newbyteorder('<'), order='C')
    arrays[str(i)] = a
    tensors[name] = _Tensor(_Storage(str(i), np.dtype(a.dtype.newbyteorder('=')), a.size),
                            a.shape)
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(tensors)

  records = [('data.pkl', buf.getvalue()), ('byteorder', b'little')]
  records += [(f'data/{k}', a.tobytes()) for k, a in arrays.items()]
  records += [('version', b'3\n')]
  out = io.BytesIO()
  with zipfile.ZipFile(out, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, data in records:
      info = zipfile.ZipInfo(f'archive/{name}', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_STORED
      # Pad the local header's extra field ('FB' id, as torch's writer) so the data start is
      # 64-byte aligned, which lets torch.load(mmap=True) map the storages.
      start = zf.fp.tell() + 30 + len(info.filename.encode('utf-8')) + 4
      pad = -start % 64
      info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad
      zf.writestr(info, data)
  return paths.write_bytes(path, out.getvalue())


class _StorageType:

  def __init__(self, name: str):
    self.name = name
    self.dtype = _DTYPE_OF_STORAGE.get(name)
    if name == 'BFloat16Storage':
      import ml_dtypes  # a JAX dependency
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    if self.dtype is None:
      raise pickle.UnpicklingError(f'unsupported torch storage type {name}')


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  del requires_grad, hooks, metadata
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


class _TorchUnpickler(pickle.Unpickler):

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._zf, self._prefix = zf, prefix

  def find_class(self, module, name):
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return lambda data, requires_grad=False, hooks=None: data
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in a state dict')

  def persistent_load(self, pid):
    typename, storage_type, key, _, numel = pid
    if typename != 'storage' or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    data = self._zf.read(f'{self._prefix}data/{key}')
    return np.frombuffer(data, storage_type.dtype.newbyteorder('<'), count=numel)


def _readable(path):
  """A local path as is; a gs:// URL as an in-memory file (``ssl_jax.paths``)."""
  return io.BytesIO(paths.read_bytes(os.fspath(path))) if paths.is_remote(os.fspath(path)) \
      else path


def load_state_dict(path: str | os.PathLike) -> collections.OrderedDict[str, np.ndarray]:
  """Read a ``.pth`` state dict (PyTorch zip format) into numpy arrays, without torch."""
  with zipfile.ZipFile(_readable(path)) as zf:
    names = zf.namelist()
    pkl = next((n for n in names if n.endswith('data.pkl') and n.count('/') == 1), None)
    if pkl is None:
      raise ValueError(f'{path}: not a PyTorch zip checkpoint (no <archive>/data.pkl)')
    prefix = pkl[:-len('data.pkl')]
    if f'{prefix}byteorder' in names and zf.read(f'{prefix}byteorder') != b'little':
      raise ValueError(f'{path}: big-endian checkpoints are not supported')
    out = _TorchUnpickler(io.BytesIO(zf.read(pkl)), zf, prefix).load()
  return collections.OrderedDict((k, np.asarray(v)) for k, v in out.items())


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

def export_resnet(params, batch_stats, path: str | os.PathLike, fmt: str = 'pth', fc=None, *,
                  num_batches_tracked: int = 0) -> str:
  """Write the ResNet backbone ``(params, batch_stats)`` as a torchvision state dict.

  Args:
    params, batch_stats: the backbone's Flax collections (or a model's holding it as
      ``backbone``), as produced by ``ssl_jax.models.resnet``.
    path: output file; written as given (no suffix is added).
    fmt: ``'pth'`` (``torch.load``-able, written without torch) or ``'npz'`` (same keys).
    fc: optional Flax Dense params of a classifier on ``pooled`` (e.g. the linear probe).
    num_batches_tracked: value of every BN's ``num_batches_tracked``.

  Returns:
    The written path.

  Arrays are read with ``np.asarray``: on several hosts, call it on process 0 with fully
  addressable (e.g. ``multihost_utils.process_allgather``-ed) or host-local numpy trees.
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown export format {fmt!r}; accepted: {", ".join(FORMATS)}')
  sd = to_torchvision_state_dict(params, batch_stats, fc, num_batches_tracked=num_batches_tracked)
  path = os.fspath(path)
  if fmt == 'pth':
    return save_state_dict(sd, path)
  buf = io.BytesIO()
  np.savez(buf, **sd)
  return paths.write_bytes(path, buf.getvalue())


# The loading recipe written into export.json and the README ({arch}, {base} filled in).
LOAD_SNIPPET = """\
import torch, torchvision
model = torchvision.models.{arch}()
{stem}sd = torch.load('backbone.pth')
model.fc = torch.nn.Identity()                   # or a Linear, when fc.* was exported
model.load_state_dict({{k: v for k, v in sd.items() if not k.startswith('fc.')}})
model.eval()
# Inputs: RGB, scaled to [0, 1], then normalised with ImageNet mean/std (as in training):
preprocess = torchvision.transforms.v2.Compose([
    torchvision.transforms.v2.ToDtype(torch.float32, scale=True),
    torchvision.transforms.v2.Normalize(mean={mean}, std={std})])
features = model(preprocess(uint8_images_nchw))  # [N, {channels}] pooled backbone features"""

_CIFAR_STEM = ("model.conv1 = torch.nn.Conv2d(3, {base}, kernel_size=3, stride=1, padding=1, "
               "bias=False)\nmodel.maxpool = torch.nn.Identity()             # CIFAR stem\n")

from ssl_jax.models.normalize import MEAN_RGB, STDDEV_RGB  # noqa: E402  (the training input's)


def _pooled_width(backbone: str, base_width: int) -> int:
  """The feature size C of the snippets' ``[N, C]`` comments: the pooled stage-4 channels."""
  from ssl_jax.models import resnet  # pylint: disable=import-outside-toplevel
  return resnet.feature_dims(backbone, base_width=base_width)['pooled']


def load_snippet(backbone: str, stem: str, base_width: int = 64) -> str:
  """The by-hand loading code for a stock torchvision model (widths other than 64 need
  :func:`torchvision_model`)."""
  return LOAD_SNIPPET.format(arch=backbone, base=base_width,
                             channels=_pooled_width(backbone, base_width),
                             stem=_CIFAR_STEM.format(base=base_width) if stem == 'cifar' else '',
                             mean=list(MEAN_RGB), std=list(STDDEV_RGB))


def import_torchvision():
  """``import torchvision`` that also works with a CUDA-build torchvision beside a CPU torch:
  its C ops (``torchvision::nms``/``qnms``) fail to register there; defining the two schemas
  first lets the pure-Python model zoo import (the models need no C op)."""
  import sys  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    return torchvision
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
    del sys.modules[name]
  global _TV_STUB_LIB  # pylint: disable=global-statement
  if _TV_STUB_LIB is None:
    _TV_STUB_LIB = torch.library.Library('torchvision', 'DEF')
    _TV_STUB_LIB.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _TV_STUB_LIB.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import torchvision  # pylint: disable=import-outside-toplevel
  return torchvision


_TV_STUB_LIB = None


def torchvision_model(path: str | os.PathLike, *, preprocess: bool = True):
  """A ready ``torchvision.models.ResNet`` (eval mode) holding an exported backbone.

  The architecture is read from the file: block type (``conv3`` keys: Bottleneck), blocks per
  stage, base width (``conv1.weight``'s output channels; torchvision's ResNet is rebuilt with
  that width when it is not 64) and stem (a 3x3 ``conv1``: the CIFAR stem, 3x3/1 conv and no
  max-pool). ``fc`` is the exported classifier, or ``Identity`` (the model returns the pooled
  features). With ``preprocess`` (default) the model takes raw images — uint8 ``[N, 3, H, W]``
  as ``torchvision.io.read_image`` gives, or floats in [0, 1] — and applies the training
  normalisation (``x / 255``, ImageNet mean/std) itself.
  """
  import torch  # pylint: disable=import-outside-toplevel
  tv = import_torchvision()
  resnet_mod = tv.models.resnet
  sd = load_state_dict(path) if zipfile.is_zipfile(_readable(path)) \
      and not str(path).endswith('.npz') else collections.OrderedDict(np.load(_readable(path)).items())
  bottleneck = any('.conv3.' in k for k in sd)
  blocks = [1 + max((int(m.group(1)) for k in sd
                     for m in [re.match(rf'layer{i}\.(\d+)\.', k)] if m), default=-1)
            for i in range(1, 5)]
  w1 = sd['conv1.weight']
  base, kernel = int(w1.shape[0]), int(w1.shape[-1])
  block = resnet_mod.Bottleneck if bottleneck else resnet_mod.BasicBlock
  model = resnet_mod.ResNet(block, blocks)
  if base != 64:  # torchvision hard-codes 64: rebuild every stage at the exported width
    model.inplanes = base
    model.bn1 = torch.nn.BatchNorm2d(base)
    model.layer1 = model._make_layer(block, base, blocks[0])  # pylint: disable=protected-access
    for i, mult in ((2, 2), (3, 4), (4, 8)):
      setattr(model, f'layer{i}', model._make_layer(block, base * mult, blocks[i - 1], stride=2))  # pylint: disable=protected-access
  model.conv1 = torch.nn.Conv2d(3, base, kernel_size=kernel, stride=2 if kernel == 7 else 1,
                                padding=kernel // 2, bias=False)
  if kernel == 3:
    model.maxpool = torch.nn.Identity()
  if 'fc.weight' in sd:
    k, c = sd['fc.weight'].shape
    model.fc = torch.nn.Linear(int(c), int(k))
  else:
    model.fc = torch.nn.Identity()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  model.eval()
  if not preprocess:
    return model

  class Preprocess(torch.nn.Module):
    """uint8 (or [0, 1] float) NCHW RGB -> ``(x - mean) / std``, as the training input."""

    def __init__(self):
      super().__init__()
      self.register_buffer('mean', torch.tensor(MEAN_RGB).view(1, 3, 1, 1))
      self.register_buffer('std', torch.tensor(STDDEV_RGB).view(1, 3, 1, 1))

    def forward(self, x):
      x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
      return (x - self.mean) / self.std

  return torch.nn.Sequential(Preprocess(), model).eval()


def load_resnet(path: str | os.PathLike) -> tuple[dict, dict, dict | None]:
  """Read an exported (or torchvision) ResNet ``.pth``/``.npz`` → ``(params, batch_stats, fc)``.

  The format is detected from the content (zip with ``data.pkl`` → pth, otherwise npz). Arrays
  are numpy; pass them to ``ResNet.apply`` as ``{'params': params, 'batch_stats': batch_stats}``.
  """
  with zipfile.ZipFile(_readable(path)) as zf:
    is_pth = any(n.endswith('/data.pkl') for n in zf.namelist())
  if is_pth:
    sd = load_state_dict(path)
  else:
    with np.load(_readable(path)) as data:
      sd = collections.OrderedDict((k, data[k]) for k in data.files)
  return from_torchvision_state_dict(sd)


# =============================================================================================
# --mode=export
# =============================================================================================
def run(config, workdir: str) -> dict[str, str]:
  """``--mode=export``: write ``backbone.pth`` / ``backbone.npz`` (torchvision ResNet keys) and
  ``export.json`` (how to load it) to ``workdir``."""
  import jax  # pylint: disable=import-outside-toplevel
  from ssl_jax import checkpoint as ckpt_lib, config_lib, utils  # pylint: disable=import-outside-toplevel
  from ssl_jax.evals import eval_config, report  # pylint: disable=import-outside-toplevel
  eval_config.validate_common(config)
  formats = tuple(config.export.formats)
  for fmt in formats:
    config_lib.require(fmt in FORMATS, 'export.formats', formats, ', '.join(FORMATS))
  pre, params, batch_stats, step = ckpt_lib.load_pretrained(
      config.pretrained, weights=config.weights,
      step=utils.optional(config.checkpoint_step), replica=config.get('replica', -1))
  if not str(pre.model.backbone).startswith('resnet'):
    raise config_lib.ConfigError(
        f'--mode=export writes torchvision ResNet state dicts; the pretrained backbone is '
        f'{pre.model.backbone!r}. Accepted: a resnet* backbone.')
  fc = None
  if config.export.include_probe:
    probe, _ = ckpt_lib.restore_state(config.pretrained, step=step, items=('probe_params',),
                                      replica=config.get('replica', -1))
    fc = probe['probe_params']['params']
  out = {}
  if jax.process_index() == 0:
    for fmt in formats:
      path = export_resnet(params['backbone'], batch_stats.get('backbone', {}),
                           paths.join(workdir, f'backbone.{fmt}'), fmt=fmt, fc=fc)
      out[fmt] = str(path)
      report.log(f'Exported {pre.model.backbone} ({pre.model.stem} stem) from '
          f'{config.pretrained}/checkpoints/{step}{eval_config.replica_text(config, pre)} to '
          f'{path}.')
  sd_base = int(np.asarray(to_torchvision_state_dict(
      params['backbone'], batch_stats.get('backbone', {}))['conv1.weight']).shape[0])
  how = {
      'drop_in': "from ssl_jax.export import torchvision_model; model = torchvision_model("
                 f"{out.get('pth') or out.get('npz') or 'backbone.pth'!r})  # raw uint8 "
                 f"[N,3,H,W] in, [N,{_pooled_width(pre.model.backbone, sd_base)}] features out",
      'by_hand': load_snippet(pre.model.backbone, pre.model.stem, sd_base).split('\n'),
      'preprocessing': {'scale': '1/255', 'mean': list(MEAN_RGB),
                        'std': list(STDDEV_RGB), 'layout': 'RGB'},
  }
  if sd_base != 64:
    how['by_hand'] = [f'base width {sd_base} != 64: use torchvision_model (it rebuilds '
                      'torchvision.models.ResNet at this width)']
  report.write_json(workdir, 'export.json', {'pretrained': config.pretrained, 'step': step,
                                             'backbone': pre.model.backbone, 'stem': pre.model.stem,
                                             'base_width': sd_base, 'files': out, 'load': how,
                                             'replica': config.get('replica', -1),
                                             'seed': pre.get('seed')})
  if jax.process_index() == 0:
    report.log('Load it in PyTorch: ' + how['drop_in'] + ' (export.json has the by-hand recipe).')
  return out
