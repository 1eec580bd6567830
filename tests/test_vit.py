"""Tests for ssl_jax.models.vit: shapes, parameter counts, token subsets, position embeddings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import vit as vit_lib
from ssl_jax.models.vit import ViT, get_vit

IMAGE, PATCH = 16, 4  # 4x4 = 16 patches for the CPU tests
N = 16


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _params(model, x, seed=0):
  """Random parameters of the right shapes without compiling ``init`` (its RNG code is slow to
  compile on CPU): LayerNorm scales 1 + noise, everything else N(0, 0.05²)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.05 * rng.standard_normal(leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(b=2, size=IMAGE, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3), jnp.float32)


@pytest.fixture(scope='module')
def test_model():
  """vit_test model, variables and one jitted apply shared by the tests (one compile/shape)."""
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE)
  variables = {'params': _params(model, _images())}
  return model, variables, jax.jit(model.apply)


SUBSET = jnp.array([[3, 0, 9, 12, 6], [15, 1, 2, 8, 4]], jnp.int32)


def test_output_shapes(test_model):
  model, variables, _ = test_model
  x = _images(3)
  for idx, t in ((None, N), (jnp.array([[0, 5, 7], [1, 2, 3], [15, 14, 13]]), 3),
                 (jnp.array([0, 5, 7, 8]), 4)):
    out = jax.eval_shape(model.apply, variables, x, idx)
    assert set(out) == {'cls', 'tokens', 'pooled'}
    assert out['cls'].shape == (3, 32) and out['cls'].dtype == jnp.float32
    assert out['tokens'].shape == (3, t, 32) and out['tokens'].dtype == jnp.float32
    assert out['pooled'].shape == (3, 32)
  assert isinstance(model, ViT) and model.depth == 2 and model.num_heads == 2
  assert model.num_patches(IMAGE) == N == vit_lib.num_patches(IMAGE, PATCH)
  assert vit_lib.patch_grid((32, 16), 4) == (8, 4)


def test_gather_tokens_shared_and_per_example():
  tokens = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  per = vit_lib.gather_tokens(tokens, jnp.array([[4, 0], [1, 5]]))
  np.testing.assert_array_equal(per, np.stack([tokens[0, [4, 0]], tokens[1, [1, 5]]]))
  shared = vit_lib.gather_tokens(tokens, jnp.array([2, 3]))
  np.testing.assert_array_equal(shared, tokens[:, [2, 3]])


def test_unknown_name_and_bad_sizes():
  with pytest.raises(ValueError, match='vit_tiny'):
    get_vit('vit_huge', patch_size=16, image_size=224)
  with pytest.raises(ValueError, match='divisible'):
    get_vit('vit_tiny', patch_size=5, image_size=32)


# timm VisionTransformer(num_classes=0) parameter counts at 224 / patch 16 (qkv_bias=True).
TIMM_COUNTS = {'vit_tiny': 5_524_416, 'vit_small': 21_665_664, 'vit_base': 85_798_656}


@pytest.mark.parametrize('name', ['vit_tiny', 'vit_small', 'vit_base'])
def test_preset_param_counts(name):
  d, depth, _ = vit_lib.VIT_PRESETS[name]

  def count(patch, image, **kw):
    model = get_vit(name, patch_size=patch, image_size=image, **kw)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image, image, 3)))
    return _count(shapes['params'])

  assert count(16, 224, qkv_bias=True) == TIMM_COUNTS[name]
  # APS on CIFAR (default: no qkv bias, as timm Block): patch 2 on 32x32 -> 256 patches. Per
  # block 12 D^2 + 10 D (13 D with the 3 D qkv bias); patch embedding 3 p^2 D + D; CLS D;
  # position (1 + N) D; final norm 2 D.
  n = 256
  want = depth * (12 * d * d + 10 * d) + 3 * 4 * d + d + d + (1 + n) * d + 2 * d
  assert count(2, 32) == want
  assert count(2, 32, qkv_bias=True) == want + depth * 3 * d


def test_defaults_follow_the_official_aps_model():
  """timm Block(dim, heads): qkv_bias=False, nn.LayerNorm (eps 1e-5) — and the config path."""
  from ssl_jax.models import ssl_model
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE)
  assert model.qkv_bias is False and model.layer_norm_eps == 1e-5
  params = jax.eval_shape(model.init, jax.random.key(0), _images())['params']
  assert set(params['block_0']['attn']['qkv']) == {'kernel'}
  assert set(params['block_0']['attn']['proj']) == {'kernel', 'bias'}
  # configs/aps.py sets both fields; build_backbone passes them on.
  from harness import load_config
  c = load_config('aps', 'cifar10,vit_tiny')
  assert c.model.qkv_bias is False and c.model.layer_norm_eps == 1e-5
  built = ssl_model.build_backbone(c.model, 32)
  assert (built.qkv_bias, built.layer_norm_eps, built.patch_size) == (False, 1e-5, 2)
  # A config.json written before the fields existed rebuilds the ViT it trained (bias, 1e-6).
  legacy = c.model.to_dict()
  del legacy['qkv_bias'], legacy['layer_norm_eps']
  import ml_collections
  old = ssl_model.build_backbone(ml_collections.ConfigDict(legacy), 32)
  assert (old.qkv_bias, old.layer_norm_eps) == (True, 1e-6)
  fine = ssl_model.build_backbone(c.model, 32, drop_path_rate=0.1)
  assert fine.drop_path_rate == 0.1
  with pytest.raises(ValueError, match='only apply to ViT'):
    ssl_model.build_backbone(ml_collections.ConfigDict(
        {'backbone': 'resnet_tiny', 'stem': 'cifar', 'width': 1.0, 'dtype': 'float32'}), 32,
        drop_path_rate=0.1)


def _np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _np_vit(params, images, *, heads, patch, eps):
  """Slow float64 reference of the full-token ViT forward (pre-norm blocks, CLS first)."""
  from scipy.special import erf
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  cols = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  cols = cols.reshape(b, gh * gw, patch * patch * c)
  k = p['patch_embed']['kernel']
  t = cols @ k.reshape(-1, k.shape[-1]) + p['patch_embed']['bias']
  pos = p['pos_embedding'][0]
  t = t + pos[1:]
  cls = np.broadcast_to(p['cls_token'][0] + pos[:1], (b, 1, t.shape[-1]))
  z = np.concatenate([cls, t], axis=1)
  d = z.shape[-1]
  hd = d // heads
  i = 0
  while f'block_{i}' in p:
    blk = p[f'block_{i}']
    y = _np_layer_norm(z, blk['norm1'], eps)
    qkv = y @ blk['attn']['qkv']['kernel'] + blk['attn']['qkv'].get('bias', 0.0)
    qkv = qkv.reshape(b, -1, 3, heads, hd)
    q, kk, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B, T, H, hd]
    logits = np.einsum('bqhd,bkhd->bhqk', q, kk) / np.sqrt(hd)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, -1, d)
    z = z + o @ blk['attn']['proj']['kernel'] + blk['attn']['proj']['bias']
    y = _np_layer_norm(z, blk['norm2'], eps)
    y = y @ blk['mlp']['fc1']['kernel'] + blk['mlp']['fc1']['bias']
    y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
    z = z + y @ blk['mlp']['fc2']['kernel'] + blk['mlp']['fc2']['bias']
    i += 1
  return _np_layer_norm(z, p['norm'], eps)


@pytest.mark.parametrize('qkv_bias, eps', [(False, 1e-5), (True, 1e-6)])
def test_forward_matches_numpy_reference(qkv_bias, eps):
  """qkv_bias and layer_norm_eps reach every block and the final norm. Low-amplitude images keep
  the LayerNorm variances small (~1e-3), so the two eps values give measurably different
  outputs and the check is sensitive to which one is used."""
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, qkv_bias=qkv_bias,
                  layer_norm_eps=eps)
  x = 0.01 * _images(2, seed=3)
  params = _params(model, x, seed=4)
  assert ('bias' in params['block_0']['attn']['qkv']) == qkv_bias
  out = jax.jit(model.apply)({'params': params}, x)
  _, heads = vit_lib.VIT_PRESETS['vit_test'][1:]
  ref = _np_vit(params, x, heads=heads, patch=PATCH, eps=eps)
  np.testing.assert_allclose(out['cls'], ref[:, 0], atol=2e-5)
  np.testing.assert_allclose(out['tokens'], ref[:, 1:], atol=2e-5)
  other = _np_vit(params, x, heads=heads, patch=PATCH, eps=1e-5 if eps == 1e-6 else 1e-6)
  assert np.max(np.abs(ref - other)) > 1e-3  # the eps really matters at this scale
  if qkv_bias:  # and so does the qkv bias
    no_bias = jax.tree.map(lambda a: a, params)
    no_bias['block_0']['attn']['qkv'] = {'kernel': params['block_0']['attn']['qkv']['kernel']}
    no_bias['block_1']['attn']['qkv'] = {'kernel': params['block_1']['attn']['qkv']['kernel']}
    assert np.max(np.abs(_np_vit(no_bias, x, heads=heads, patch=PATCH, eps=eps) - ref)) > 1e-3


def test_subset_equals_masked_full_attention(test_model):
  _, variables, apply = test_model
  x = _images(2, seed=1)
  sub = apply(variables, x, SUBSET)
  mask = np.zeros((2, N), bool)
  mask[np.arange(2)[:, None], np.asarray(SUBSET)] = True
  full = apply(variables, x, attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(sub['cls'], full['cls'], atol=1e-5)
  for b in range(2):  # kept tokens also agree, in gather order
    np.testing.assert_allclose(sub['tokens'][b], full['tokens'][b, SUBSET[b]], atol=1e-5)
  np.testing.assert_allclose(sub['pooled'], full['pooled'], atol=1e-5)
  # The mask really matters: unmasked full attention gives a different CLS.
  plain = apply(variables, x)
  assert np.max(np.abs(plain['cls'] - sub['cls'])) > 1e-3


def test_position_follows_the_patch(test_model):
  """Position embeddings are added before the gather: permuting all tokens changes nothing."""
  _, variables, apply = test_model
  x = _images(2, seed=2)
  perm = jax.random.permutation(jax.random.key(5), N).astype(jnp.int32)
  a = apply(variables, x)
  b = apply(variables, x, perm)
  np.testing.assert_allclose(a['cls'], b['cls'], atol=1e-5)
  np.testing.assert_allclose(a['tokens'][:, perm], b['tokens'], atol=1e-5)


def test_learned_vs_sincos():
  x = _images(2)
  learned = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, pos_embed='learned')
  sincos = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, pos_embed='sincos')
  p_l = jax.eval_shape(learned.init, jax.random.key(0), x)['params']
  p_s = jax.eval_shape(sincos.init, jax.random.key(0), x)['params']
  assert p_l['pos_embedding'].shape == (1, 1 + N, 32)
  assert 'pos_embedding' not in p_s
  assert _count(p_l) - _count(p_s) == (1 + N) * 32
  # Sin-cos table: row r / column c in the two halves; position (0, 0) is [0.., 1.., 0.., 1..].
  emb = vit_lib.sincos_pos_embed_2d((4, 4), 32)
  np.testing.assert_allclose(emb[0], np.repeat([0., 1., 0., 1.], 8), atol=1e-7)
  r, c = 2, 3
  np.testing.assert_allclose(emb[r * 4 + c, 0], np.sin(r), atol=1e-6)
  np.testing.assert_allclose(emb[r * 4 + c, 16], np.sin(c), atol=1e-6)
  np.testing.assert_allclose(emb[r * 4 + c, 8], np.cos(r), atol=1e-6)
  # Sin-cos works at another resolution with the same parameters; learned refuses it.
  big = _images(1, size=24)
  assert jax.eval_shape(sincos.apply, {'params': p_s}, big)['tokens'].shape == (1, 36, 32)
  with pytest.raises(ValueError, match='patch positions'):
    jax.eval_shape(learned.apply, {'params': p_l}, big)
  # The two embeddings give different functions of the same weights.
  small = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, depth=1)
  small_sc = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, depth=1, pos_embed='sincos')

  v = {'params': _params(small, x)}
  v_sc = {'params': {k: a for k, a in v['params'].items() if k != 'pos_embedding'}}
  a = jax.jit(small.apply)(v, x)['cls']
  b = jax.jit(small_sc.apply)(v_sc, x)['cls']
  assert np.all(np.isfinite(b)) and np.max(np.abs(a - b)) > 1e-3


def test_no_cls_pools_tokens():
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, use_cls=False, depth=1)
  x = _images(2)

  variables = {'params': _params(model, x)}
  out = jax.jit(model.apply)(variables, x, jnp.arange(5))
  assert 'cls_token' not in variables['params']
  assert variables['params']['pos_embedding'].shape == (1, N, 32)
  assert out['tokens'].shape == (2, 5, 32)
  np.testing.assert_allclose(out['cls'], out['tokens'].mean(1), atol=1e-6)


def test_bf16_path(test_model):
  _, variables, apply = test_model
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, dtype=jnp.bfloat16)
  x = _images(2, seed=1)
  out = jax.jit(model.apply)(variables, x, SUBSET)
  ref = apply(variables, x, SUBSET)
  for k in ('cls', 'tokens', 'pooled'):
    assert out[k].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[k])))
  np.testing.assert_allclose(out['cls'], ref['cls'], atol=0.1)
  assert np.max(np.abs(out['cls'] - ref['cls'])) > 0  # it really ran in bf16
  # Parameters stay float32 when initialised with bf16 compute.
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_drop_path_identity_at_eval_and_per_sample_in_train():
  """DropPath: exact identity when deterministic; in train, each sample's whole branch is
  either dropped (0) or scaled by 1 / keep, with P(kept) = keep, so E[out] = x."""
  rate, b = 0.3, 4000
  keep = 1.0 - rate
  dp = vit_lib.DropPath(rate)
  x = 1.0 + jax.random.uniform(jax.random.key(0), (b, 3, 5))
  np.testing.assert_array_equal(dp.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(vit_lib.DropPath(0.0).apply({}, x, deterministic=False), x)
  y = np.asarray(jax.jit(lambda r: dp.apply({}, x, deterministic=False, rngs={'dropout': r}))(
      jax.random.key(1)))
  ratio = y / np.asarray(x)                              # 0 or 1 / keep, constant per sample
  per_sample = ratio.reshape(b, -1)
  np.testing.assert_allclose(per_sample, per_sample[:, :1] * np.ones_like(per_sample), atol=1e-6)
  kept = per_sample[:, 0] > 0
  np.testing.assert_allclose(per_sample[kept, 0], 1.0 / keep, rtol=1e-6)
  np.testing.assert_array_equal(per_sample[~kept, 0], 0.0)
  # P(kept) = keep within 4 binomial standard deviations; the mean ratio is 1 (E[out] = x).
  sd = np.sqrt(keep * rate / b)
  assert abs(kept.mean() - keep) < 4 * sd
  assert abs(per_sample[:, 0].mean() - 1.0) < 4 * sd / keep
  # A different rng gives a different mask; the same rng the same one.
  y2 = jax.jit(lambda r: dp.apply({}, x, deterministic=False, rngs={'dropout': r}))(
      jax.random.key(2))
  assert not np.array_equal(y, np.asarray(y2))


def test_drop_path_train_mode():
  # Per-block drop rates 0 and 0.5 (linear in depth from 0).
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, drop_path_rate=0.5, depth=2)
  x = _images(4)

  @jax.jit
  def run(params, rng):
    eval_out = model.apply({'params': params}, x, jnp.arange(6))['cls']

    def loss(p):
      out = model.apply({'params': p}, x, jnp.arange(6), train=True, rngs={'dropout': rng})['cls']
      return jnp.sum(out ** 2), out

    (_, train_out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return eval_out, train_out, grads

  eval_out, train_out, grads = run(_params(model, x), jax.random.key(1, impl='rbg'))
  assert train_out.shape == (4, 32)
  assert np.max(np.abs(eval_out - train_out)) > 1e-4
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_real_init():
  """The one compiled ``init``: timm/MAE initialisers (trunc-normal 0.02, zero biases)."""
  model = get_vit('vit_test', patch_size=PATCH, image_size=IMAGE, depth=1)
  # 'rbg' keys: the same initialisers, half the CPU compile time of threefry.
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), _images())['params']
  pos = np.asarray(params['pos_embedding'])
  assert 0.01 < pos.std() < 0.03 and np.abs(pos).max() <= 0.04 + 1e-6
  assert 'bias' not in params['block_0']['attn']['qkv']     # official APS: no qkv bias
  assert np.all(np.asarray(params['block_0']['attn']['proj']['bias']) == 0)
  assert np.all(np.asarray(params['norm']['scale']) == 1)
  limit = np.sqrt(6 / (32 + 96))  # Xavier-uniform bound of the [32, 96] qkv kernel
  assert np.abs(np.asarray(params['block_0']['attn']['qkv']['kernel'])).max() <= limit
