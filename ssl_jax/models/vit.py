"""Vision Transformer (Flax Linen) that runs on a subset of its patch tokens.

Forward pass, for images ``x`` of shape ``[B, H, W, C]`` and patch size ``p``
(grid ``gh × gw = H/p × W/p``, ``N = gh·gw`` patches, row-major: patch ``(r, c)`` has index
``r·gw + c``)::

  t      = PatchEmbed(x)                       # p×p conv, stride p (≡ Dense on patches), [B, N, D]
  t      = t + pos[1:]                         # position embedding of every patch
  t      = t[b, token_indices[b]]              # keep only the sampled patches, [B, K, D]
  z      = concat([cls + pos[0], t])           # [B, 1 + K, D]
  z      = z + DropPath(MHSA(LN(z)))           # × depth, pre-norm blocks
  z      = z + DropPath(MLP(LN(z)))            #   MLP: Dense(D·mlp_ratio) – GELU – Dense(D)
  z      = LN(z)                               # final norm
  return   cls = z[:, 0], tokens = z[:, 1:], pooled = mean_k z[:, 1 + k]

Position embeddings are added *before* the gather, so a kept token carries the position of the
patch it came from, and only the ``K`` kept tokens enter the transformer: the attention cost is
``O((1 + K)²)`` instead of ``O((1 + N)²)``. This is where APS (arXiv 2306.02854) saves compute, and
it matches the official ``ViTEncoderProjHead.forward`` (patchify → + pos → gather → prepend CLS).

Parameter layout follows timm's ``VisionTransformer`` (``num_classes=0``) so that export is a
renaming: ``patch_embed`` (conv kernel ``[p, p, C, D]`` + bias), ``cls_token [1, 1, D]``,
``pos_embedding [1, 1 + N, D]`` (CLS position first; only for ``pos_embed='learned'``),
``block_i/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}``, ``norm``. The learned CLS position is
redundant with ``cls_token`` (both are added to the same vector) but is kept for that layout; the
official APS code has no CLS position, which is the same function class.

Defaults follow the official APS model (timm ``Block`` defaults): **no qkv bias** and LayerNorm
**eps 1e-5** everywhere (``qkv_bias``, ``layer_norm_eps``; ``config.model.qkv_bias`` /
``config.model.layer_norm_eps``). timm's ``VisionTransformer`` layout is
``qkv_bias=True, layer_norm_eps=1e-6``; without the qkv bias the ``attn/qkv`` Dense has only a
``kernel``.

``pos_embed='sincos'``: fixed 2-D sin-cos embedding (MAE / MoCo v3): the first ``D/2`` channels
encode the row, the last ``D/2`` the column, each as ``[sin(pos·ω_i), cos(pos·ω_i)]`` with
``ω_i = 10000^(−i/(D/4))``, ``i = 0..D/4−1``; the CLS position is zero. No parameters.

Attention is ``jax.nn.dot_product_attention`` (``attention_impl=None`` → XLA; pass ``'cudnn'`` on
NVIDIA GPUs for the fused kernel). An optional boolean ``attention_mask [B, K]`` over the patch
tokens that enter the transformer restricts every query to the CLS token plus the tokens whose
mask is ``True``; running the full ViT with the mask set on the kept patches gives the same CLS
output as running it on the kept patches only (tested).

Precision: parameters are float32; ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype of the
patch embedding, Dense layers and attention; LayerNorm reductions run in float32, the final
LayerNorm runs in float32 and every output is float32.

Initialisation (MAE / timm): Dense and patch-embedding kernels Xavier-uniform, biases zero,
``cls_token`` and the learned position embedding truncated-normal(0.02).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

#: name → (hidden_dim, depth, num_heads); mlp_ratio 4 for all.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    'vit_test': (32, 2, 2),
    'vit_tiny': (192, 12, 3),
    'vit_small': (384, 12, 6),
    'vit_base': (768, 12, 12),
}

_dense_init = nn.initializers.xavier_uniform()
_embed_init = nn.initializers.truncated_normal(stddev=0.02)


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def patch_grid(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
  """``(gh, gw) = (H / p, W / p)``; raises ``ValueError`` unless ``p`` divides both sides."""
  h, w = _pair(image_size)
  if h % patch_size or w % patch_size:
    raise ValueError(f'image size {(h, w)} is not divisible by patch size {patch_size}')
  return h // patch_size, w // patch_size


def num_patches(image_size: int | tuple[int, int], patch_size: int) -> int:
  """``N = (H / p)·(W / p)``, the number of patch tokens of a full image."""
  gh, gw = patch_grid(image_size, patch_size)
  return gh * gw


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, ``[gh·gw, dim]`` float32, row-major patch order.

  ``emb[r·gw + c] = [sin(r ω), cos(r ω), sin(c ω), cos(c ω)]`` with
  ``ω_i = 10000^(−i / (dim/4))``, ``i = 0 .. dim/4 − 1``. Requires ``dim % 4 == 0``.
  """
  if dim % 4:
    raise ValueError(f'sincos position embedding needs hidden_dim % 4 == 0, got {dim}')
  gh, gw = grid
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)

  def emb_1d(pos: np.ndarray) -> np.ndarray:
    out = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing='ij')
  emb = np.concatenate([emb_1d(rows.reshape(-1)), emb_1d(cols.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def gather_tokens(tokens: jax.Array, token_indices: jax.Array) -> jax.Array:
  """``out[b, k] = tokens[b, idx[b, k]]``; ``idx`` is ``[B, K]``, or ``[K]`` shared by the batch."""
  token_indices = jnp.asarray(token_indices, jnp.int32)
  if token_indices.ndim == 1:
    return jnp.take(tokens, token_indices, axis=1, mode='clip')
  if token_indices.ndim != 2 or token_indices.shape[0] != tokens.shape[0]:
    raise ValueError(f'token_indices must be [K] or [B={tokens.shape[0]}, K], '
                     f'got {token_indices.shape}')
  return jnp.take_along_axis(tokens, token_indices[:, :, None], axis=1, mode='clip')


class DropPath(nn.Module):
  """Stochastic depth: ``x · m_b / (1 − rate)``, ``m_b ~ Bernoulli(1 − rate)`` per sample.

  Identity when ``deterministic`` or ``rate == 0``; needs the ``'dropout'`` rng otherwise.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention ``proj(softmax(q kᵀ / √d_h + mask) v)``, fused qkv Dense (timm).

  ``qkv_bias``: whether the fused qkv projection has a bias (timm ``Block`` default: no; timm
  ``VisionTransformer`` default: yes). ``proj`` always has one, as in timm.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  qkv_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'hidden_dim {d} is not divisible by num_heads {self.num_heads}')
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=_dense_init,
                   name='qkv')(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, heads, head_dim]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    out = out.reshape(b, t, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name='proj')(out)


class Mlp(nn.Module):
  """``fc2(GELU(fc1(x)))`` with hidden width ``hidden``; exact (erf) GELU as in timm."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: ``x += DP(attn(LN(x)))``; ``x += DP(mlp(LN(x)))``."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  qkv_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    d = x.shape[-1]
    drop = DropPath(self.drop_path_rate)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, qkv_bias=self.qkv_bias,
                  name='attn')(y, mask)
    x = x + drop(y, deterministic=not train)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + drop(y, deterministic=not train)


class ViT(nn.Module):
  """Vision Transformer over an optional subset of patch tokens (see the module docstring).

  Attributes:
    patch_size: side ``p`` of the square patches.
    hidden_dim: token width ``D``.
    depth: number of transformer blocks.
    num_heads: attention heads (``D % num_heads == 0``).
    mlp_ratio: MLP hidden width ``= D · mlp_ratio``.
    pos_embed: ``'learned'`` (parameter ``[1, 1 + N, D]``, its shape fixed by the image size at
      ``init``) or ``'sincos'`` (fixed, any image size).
    use_cls: prepend a CLS token; without it ``cls`` is the mean of the output patch tokens.
    qkv_bias: bias on the fused qkv projection. Default False, as the official APS model
      (``module/model.py`` builds timm ``Block(emb_dim, num_head)``, whose ``qkv_bias`` defaults
      to False); timm's ``VisionTransformer`` / MoCo v3 / MAE use True.
    drop_path_rate: stochastic-depth rate of the last block, linearly increasing from 0 over
      depth (timm/DeiT rule, ``linspace(0, rate, depth)``); active only with ``train=True``
      (needs the ``'dropout'`` rng).
    layer_norm_eps: epsilon of every LayerNorm (blocks and final norm). Default 1e-5, as the
      official APS model (timm ``Block``'s default ``norm_layer=nn.LayerNorm`` and the final
      ``torch.nn.LayerNorm(emb_dim)``: torch's default 1e-5); timm's ``VisionTransformer`` uses
      ``partial(nn.LayerNorm, eps=1e-6)``.
    dtype: compute dtype; parameters stay float32 and outputs are float32.
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention`` (None, 'xla', 'cudnn').
  """
  patch_size: int
  hidden_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  pos_embed: str = 'learned'
  use_cls: bool = True
  qkv_bias: bool = False
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  def num_patches(self, image_size: int | tuple[int, int]) -> int:
    """``(H / p)·(W / p)``; the valid range of ``token_indices`` is ``[0, num_patches)``."""
    return num_patches(image_size, self.patch_size)

  @nn.compact
  def __call__(self,
               images: jax.Array,
               token_indices: jax.Array | None = None,
               train: bool = False,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Encodes ``images [B, H, W, C]``.

    Long on purpose: one encoder forward read top to bottom in the order of the reference ViTs
    (patch embedding, positions, token subset, attention mask, CLS, blocks, final norm and
    pooling); the parameters it creates keep their names only inside this compact method.

    Args:
      images: NHWC images.
      token_indices: ``[B, K]`` or ``[K]`` int32 patch indices (row-major over the patch grid) of
        the tokens to keep, or None for all ``N`` patches. Indices should be distinct (duplicates
        are allowed but then a patch is attended to twice); out-of-range indices are clamped.
      train: enables stochastic depth.
      attention_mask: optional bool ``[B, K]`` (or ``[K]``) over the patch tokens *after* the
        gather; ``False`` tokens cannot be attended to by any query. CLS is always visible
        (with ``use_cls=False`` every row needs at least one ``True``).

    Returns:
      ``{'cls': [B, D], 'tokens': [B, K, D], 'pooled': [B, D]}``, float32, after the final
      LayerNorm. ``pooled`` is the mean of the output patch tokens (over the ``attention_mask``
      ones when given); ``cls`` is the CLS output (equal to ``pooled`` when ``use_cls=False``).
    """
    if self.pos_embed not in ('learned', 'sincos'):
      raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
    b = images.shape[0]
    grid = patch_grid(images.shape[1:3], self.patch_size)
    n = grid[0] * grid[1]
    d = self.hidden_dim

    x = nn.Conv(d, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                padding='VALID', dtype=self.dtype, kernel_init=_dense_init,
                name='patch_embed')(images.astype(self.dtype))
    x = x.reshape(b, n, d)

    num_extra = 1 if self.use_cls else 0
    if self.pos_embed == 'learned':
      if self.has_variable('params', 'pos_embedding'):
        stored = self.get_variable('params', 'pos_embedding').shape[1] - num_extra
        if stored != n:
          raise ValueError(f'learned pos_embedding has {stored} patch positions but the images '
                           f'give {n} ({grid[0]}x{grid[1]}); use the init resolution or '
                           "pos_embed='sincos'")
      pos = self.param('pos_embedding', _embed_init, (1, num_extra + n, d), jnp.float32)
      cls_pos, patch_pos = pos[:, :num_extra], pos[:, num_extra:]
    else:
      patch_pos = jnp.asarray(sincos_pos_embed_2d(grid, d))[None]
      cls_pos = jnp.zeros((1, num_extra, d), jnp.float32)
    x = x + patch_pos.astype(self.dtype)

    if token_indices is not None:
      x = gather_tokens(x, token_indices)
    k = x.shape[1]

    mask = None
    if attention_mask is not None:
      attention_mask = jnp.broadcast_to(jnp.asarray(attention_mask, bool), (b, k))
      key_mask = attention_mask
      if self.use_cls:
        key_mask = jnp.concatenate([jnp.ones((b, 1), bool), key_mask], axis=1)
      mask = key_mask[:, None, None, :]  # [B, heads=1, queries=1, keys]

    if self.use_cls:
      cls = self.param('cls_token', _embed_init, (1, 1, d), jnp.float32)
      cls = jnp.broadcast_to((cls + cls_pos).astype(self.dtype), (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)

    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = Block(self.num_heads, self.mlp_ratio, drop_path_rate=rate,
                layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                attention_impl=self.attention_impl, qkv_bias=self.qkv_bias,
                name=f'block_{i}')(x, mask, train)

    x = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name='norm')(x.astype(jnp.float32))
    tokens = x[:, num_extra:]
    if attention_mask is None:
      pooled = jnp.mean(tokens, axis=1)
    else:
      w = attention_mask.astype(jnp.float32)[:, :, None]
      pooled = jnp.sum(tokens * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    cls_out = x[:, 0] if self.use_cls else pooled
    return {'cls': cls_out, 'tokens': tokens, 'pooled': pooled}


def get_vit(name: str,
            *,
            patch_size: int,
            image_size: int | tuple[int, int],
            dtype: Dtype = jnp.float32,
            **overrides: Any) -> ViT:
  """Preset ViT by name: ``vit_test`` (32/2 blocks/2 heads, for CPU tests), ``vit_tiny``
  (192/12/3), ``vit_small`` (384/12/6), ``vit_base`` (768/12/12); mlp_ratio 4.

  ``image_size`` is checked against ``patch_size`` (must divide it); any other ``ViT`` field
  (``pos_embed``, ``use_cls``, ``drop_path_rate``, even ``depth``) may be passed in
  ``overrides`` and replaces the preset's value (``qkv_bias=True, layer_norm_eps=1e-6`` gives
  timm's ``VisionTransformer``).
  APS on CIFAR: ``get_vit('vit_tiny', patch_size=2, image_size=32)`` → 16×16 = 256 patches.
  """
  if name not in VIT_PRESETS:
    raise ValueError(f'unknown ViT {name!r}; accepted: {", ".join(sorted(VIT_PRESETS))}')
  patch_grid(image_size, patch_size)
  hidden_dim, depth, num_heads = VIT_PRESETS[name]
  kwargs = dict(patch_size=patch_size, hidden_dim=hidden_dim, depth=depth, num_heads=num_heads,
                dtype=dtype)
  kwargs.update(overrides)
  return ViT(**kwargs)


__all__ = ['VIT_PRESETS', 'ViT', 'get_vit', 'num_patches', 'patch_grid', 'sincos_pos_embed_2d',
           'gather_tokens']
