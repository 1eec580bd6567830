"""APS — Asymmetric Patch Sampling for contrastive learning (Shen et al., arXiv 2306.02854).

Network (official ``module/model.py``): a ViT (CIFAR: patch 2 on 32 px, 256 patches) built from
timm ``Block(emb_dim, num_head)``, i.e. without a qkv bias and with LayerNorm eps 1e-5
(``config.model.qkv_bias=False``, ``config.model.layer_norm_eps=1e-5``), whose CLS output
(``features``) feeds a projector ``g`` and a predictor ``q`` of the same shape (MoCo v3 heads)::

  g: Linear(D, 512, no bias)-BN-ReLU-Linear(512, 512, no bias)-BN-ReLU-Linear(512, 128, no bias)
     -BN(affine=False)
  q: the same with 128 -> 512 -> 512 -> 128

(``config.model.projector`` / ``.predictor``: ``hidden_dim``, ``out_dim``, ``num_layers`` and the
extra keys ``use_bias``, ``last_bn``, ``last_bn_affine`` read by ``ssl_model.mlp_from_config``.)

One step, per image ``b`` of the global batch (all sampling on device, vmapped over the batch,
static shapes; ``N = (H/p)(W/p)`` patches, ``K = N·ratio``, ``C = 1/ratio``)::

  chunks_b = sparse_chunks(key_b, N, ratio)          # [C, K]: a random permutation of the N
                                                     #   patches in C disjoint chunks
  I1_b     = chunks_b[j]                             # view 1: sparse patches (chunk j ~ U{0..C-1})
  I2_b     = selective_sample(key'_b, N, K, I1_b,    # view 2: K cells drawn without replacement
                box1_b, box2_b, flip1_b, flip2_b)    #   with p ∝ max(0, 1 − cover_j)^power
  z_v      = g(f(x_v[I_v])),  p_v = q(z_v)           # only the kept tokens enter the ViT
  L        = ctr(p_1, sg(z_2)) + ctr(p_2, sg(z_1))
  ctr(p, z) = CE(n(p) n(z)ᵀ / τ, arange(B)) = mean_i [logsumexp_k s_ik − s_ii],  τ = 0.1

``n`` is L2 normalisation and ``B`` the *global* batch: under ``jax.jit`` with the batch
sharded over ``'data'``, ``n(p) n(z)ᵀ`` on the global arrays is the all-device version (the
official code all-gathers the keys; each device's rows against all keys, then DDP averages the
gradients, which is the same mean over the global rows).

Targets. Default (official release, ``args.momentum = False``): both views go through the same
online encoder and ``z`` is taken under stop-gradient. ``momentum_target=True`` computes ``z_1``,
``z_2`` with the trainer's EMA target (``target_params``: backbone + projector, rate
``config.ema``) on the same tokens, in training-mode BatchNorm, as MoCo v3.

Chunk pairs and optimizer steps. The official loop takes ``C = 4`` optimizer steps per batch, one
per chunk pair (same images, same crops, chunk ``j`` of view 1 against its selective partner).
The trainer here takes one optimizer step per batch, so ``chunk_mode`` chooses:

* ``'one'`` (default): one chunk pair per step, ``j`` drawn from ``rng`` (a fresh permutation is
  drawn every step, so view 1 is a uniform random ``K``-subset). Each optimizer step costs what
  an official one costs and an "epoch" has the same number of optimizer steps as every other
  method here, so schedules, checkpoints and kNN cadences mean the same thing across methods.
  An official epoch is ``C`` of ours in optimizer steps and in compute; to match the official
  number of updates run ``C``x the epochs (``epochs=6400`` for the paper's 1600), with
  ``C``x the warm-up. The difference is then only that consecutive chunk pairs see fresh crops
  rather than the same crops ``C`` times.
* ``'all'``: every chunk pair of the batch in one step (``lax.scan`` over the ``C`` pairs,
  BatchNorm statistics threaded through them in order), ``L`` averaged over the pairs. The
  official compute per batch with one optimizer step (a ``C``-step gradient accumulation, not the
  official ``C`` sequential updates).

Deviations from the official code: flips are handled correctly by ``selective_sample`` (see
``ssl_jax.ops.patches``); cells with zero ratio fill the draw when fewer than ``K`` cells are
uncovered (the official ``np.random.choice`` raises there).

Metrics: ``aps/pos_sim`` (mean ``n(p_1)·n(z_2)``/``n(p_2)·n(z_1)`` of positives, the official
"similarity"), ``aps/ctr_top1`` (in-batch retrieval accuracy of the positive), ``aps/view2_cover``
(mean fraction of a kept view-2 cell covered by kept view-1 patches: low means the views share
little appearance). The online probe is trained on view 1's CLS feature, i.e. on ``K`` of ``N``
tokens; the kNN monitor evaluates the full-token network.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import config_lib
from ssl_jax.methods import base
from ssl_jax.models import vit
from ssl_jax.ops import losses, patches, summaries


def _diagonal(s: jax.Array) -> jax.Array:
  """``s[i, i]`` of a square ``[B, B]`` matrix as a gather (``take_along_axis``). Identical to
  ``jnp.diagonal``, whose gradient compiles to a conditional holding all-gathers under the
  per-device step; on a 4-device CPU mesh those deadlocked (XLA:CPU rendezvous timeout)."""
  return jnp.take_along_axis(s, jnp.arange(s.shape[0])[:, None], axis=1)[:, 0]

CHUNK_MODES = ('one', 'all')


def contrastive_logits(p: jax.Array, z: jax.Array, temperature: float) -> jax.Array:
  """``s = n(p) n(sg(z))ᵀ / τ``, ``[B, B]`` float32 (row ``i``'s positive is column ``i``)."""
  q = losses.l2_normalize(p)
  k = losses.l2_normalize(jax.lax.stop_gradient(z))
  return jnp.matmul(q, k.T, precision=jax.lax.Precision.HIGHEST) / temperature


def contrastive_loss(p: jax.Array, z: jax.Array, temperature: float = 0.1, *,
                     with_logits: bool = False):
  """``ctr(p, z) = CE(n(p) n(sg(z))ᵀ / τ, arange(B)) = mean_i [logsumexp_k s_ik − s_ii]``.

  ``p``, ``z`` are ``[B, d]`` (any float dtype; computed in float32); ``z`` is a constant.
  The step's loss is ``L = ctr(p1, sg(z2)) + ctr(p2, sg(z1))`` (``Method.pair_loss``).
  Returns ``ctr``; with ``with_logits=True``, ``(ctr, s)`` with ``s`` the ``[B, B]`` logits
  (``contrastive_logits``), which the step's metrics read.
  """
  s = contrastive_logits(p, z, temperature)
  loss = jnp.mean(jax.nn.logsumexp(s, axis=-1) - _diagonal(s))
  return (loss, s) if with_logits else loss


class Method(base.Method):
  name = 'aps'
  first_view = 'view1'
  uses_predictor = True

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch=None):
    super().__init__(config, steps_per_epoch)
    m = config.method
    self.patch_size = int(config.model.patch_size)
    self.grid = vit.patch_grid(self.image_size, self.patch_size)
    self.num_patches = self.grid[0] * self.grid[1]
    self.ratio = float(m.ratio)
    self.num_chunks, self.keep = patches.chunk_shape(self.num_patches, self.ratio)
    self.power = float(m.power)
    self.temperature = float(m.temperature)
    self.chunk_mode = str(m.chunk_mode)
    self.momentum_target = bool(m.momentum_target)
    self.uses_ema_target = self.momentum_target   # no EMA update and no tau without one

  @staticmethod
  def validate_config(config):
    m, mc = config.method, config.model
    if mc.backbone not in config_lib.VITS:
      raise config_lib.ConfigError(
          f'config.model.backbone={mc.backbone!r} is invalid for APS (it samples ViT patch '
          f'tokens); accepted: {", ".join(config_lib.VITS)}')
    size = int(config.data.image_size)
    p = mc.get('patch_size')
    if not (isinstance(p, int) and p > 0 and size % p == 0):
      raise config_lib.ConfigError(
          f'config.model.patch_size={p!r} is invalid for image_size {size}; accepted: a positive '
          f'integer dividing {size} (CIFAR: 2, ImageNet: 16)')
    n = (size // p) ** 2
    try:
      patches.chunk_shape(n, m.ratio)
    except (ValueError, TypeError):
      ok = [f'1/{d}' for d in range(1, min(n, 16) + 1) if n % d == 0]
      raise config_lib.ConfigError(
          f'config.method.ratio={m.ratio!r} is invalid for {n} patches; accepted: 1/m with m '
          f'dividing {n} ({", ".join(ok)}, ...)') from None
    if m.chunk_mode not in CHUNK_MODES:
      raise config_lib.ConfigError(
          f'config.method.chunk_mode={m.chunk_mode!r} is invalid; accepted: '
          f'{", ".join(CHUNK_MODES)}')

    def number(v):
      return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e30
    if not (number(m.temperature) and m.temperature > 0):
      raise config_lib.ConfigError(
          f'config.method.temperature={m.temperature!r} is invalid; accepted: a number > 0')
    if not (number(m.power) and m.power >= 0):
      raise config_lib.ConfigError(
          f'config.method.power={m.power!r} is invalid; accepted: a number >= 0')
    if not isinstance(m.momentum_target, bool):
      raise config_lib.ConfigError(
          f'config.method.momentum_target={m.momentum_target!r} is invalid; accepted: True, False')
    qkv_bias = mc.get('qkv_bias', True)
    if not isinstance(qkv_bias, bool):
      raise config_lib.ConfigError(
          f'config.model.qkv_bias={qkv_bias!r} is invalid; accepted: True, False (official APS: '
          'False)')
    eps = mc.get('layer_norm_eps', 1e-6)
    if not (number(eps) and 0 < eps < 1):
      raise config_lib.ConfigError(
          f'config.model.layer_norm_eps={eps!r} is invalid; accepted: a number in (0, 1) '
          '(official APS: 1e-5)')
    if config.data.views != 'aps':
      raise config_lib.ConfigError(
          f'config.data.views={config.data.views!r} is invalid for APS (it needs the crop boxes '
          "and flips); accepted: aps")

  # -------------------------------------------------------------------------------------------
  def sample_indices(self, rng: jax.Array, batch: dict[str, jax.Array]
                     ) -> tuple[jax.Array, jax.Array]:
    """Token indices of both views, int32 ``[B, K]`` each (``chunk_mode='all'``: ``[B, C, K]``).

    ``k_perm, k_chunk, k_sel = split(rng, 3)``; image ``b`` uses ``split(k_perm, B)[b]`` for its
    permutation and ``split(k_sel, B)[b]`` for its selective draw (``selective_sample`` in
    ``'one'`` mode, ``selective_chunks`` in ``'all'`` mode); ``j = randint(k_chunk, 0, C)``.
    """
    k_perm, k_chunk, k_sel = jax.random.split(rng, 3)
    b = batch['view1'].shape[0]
    chunks = jax.vmap(lambda k: patches.sparse_chunks(k, self.num_patches, self.ratio))(
        jax.random.split(k_perm, b))                                        # [B, C, K]
    geometry = (batch['box1'], batch['box2'], batch['flip1'], batch['flip2'])
    sel_keys = jax.random.split(k_sel, b)
    if self.chunk_mode == 'all':
      fn = functools.partial(patches.selective_chunks, keep=self.keep, grid=self.grid,
                             power=self.power)
      idx2 = jax.vmap(lambda k, c, b1, b2, f1, f2: fn(k, c, box1=b1, box2=b2, flip1=f1,
                                                       flip2=f2))(sel_keys, chunks, *geometry)
      return chunks, idx2
    j = jax.random.randint(k_chunk, (), 0, self.num_chunks)
    idx1 = jnp.take(chunks, j, axis=1)                                      # [B, K]
    fn = functools.partial(patches.selective_sample, num_patches=self.num_patches,
                           keep=self.keep, grid=self.grid, power=self.power)
    idx2 = jax.vmap(lambda k, i, b1, b2, f1, f2: fn(k, first_view_indices=i, box1=b1, box2=b2,
                                                     flip1=f1, flip2=f2))(sel_keys, idx1,
                                                                          *geometry)
    return idx1, idx2

  def view2_cover(self, batch: dict[str, jax.Array], idx1: jax.Array, idx2: jax.Array
                  ) -> jax.Array:
    """Mean over images and kept view-2 cells of ``cover_j`` (fraction covered by view 1)."""
    def one(i1, i2, b1, b2, f1, f2):
      cover = patches.coverage(i1, grid=self.grid, box1=b1, box2=b2, flip1=f1, flip2=f2)
      return jnp.mean(cover[i2])
    return jnp.mean(jax.vmap(one)(idx1, idx2, batch['box1'], batch['box2'], batch['flip1'],
                                  batch['flip2']))

  def pair_loss(self, ctx: base.StepContext, batch_stats, x1, x2, idx1, idx2
                ) -> tuple[jax.Array, dict[str, jax.Array], Any, jax.Array, dict[str, jax.Array]]:
    """``L = ctr(p1, sg(z2)) + ctr(p2, sg(z1))`` (``contrastive_loss``) for one chunk pair;
    ``idx`` may be None (all tokens, the full-token baseline). ``batch_stats``: the BatchNorm
    statistics to start from (threaded through the pairs in ``chunk_mode='all'``).

    Returns ``(loss, metrics, batch_stats, view-1 features, scores)``.
    """
    o1, batch_stats = ctx.forward(batch_stats, x1, token_indices=idx1)
    o2, batch_stats = ctx.forward(batch_stats, x2, token_indices=idx2)
    if self.momentum_target:
      z1 = ctx.target_forward(batch_stats, x1, token_indices=idx1)['proj']
      z2 = ctx.target_forward(batch_stats, x2, token_indices=idx2)['proj']
    else:
      z1 = jax.lax.stop_gradient(o1['proj'])
      z2 = jax.lax.stop_gradient(o2['proj'])
    l12, s12 = contrastive_loss(o1['pred'], z2, self.temperature, with_logits=True)
    l21, s21 = contrastive_loss(o2['pred'], z1, self.temperature, with_logits=True)
    loss = l12 + l21
    arange = jnp.arange(s12.shape[0])
    top1 = 0.5 * (jnp.mean(jnp.argmax(s12, -1) == arange) + jnp.mean(jnp.argmax(s21, -1) == arange))
    pos_sim = 0.5 * self.temperature * (jnp.mean(_diagonal(s12)) + jnp.mean(_diagonal(s21)))
    q = jax.lax.stop_gradient(losses.l2_normalize(o1['pred']))
    k = losses.l2_normalize(jax.lax.stop_gradient(z2))
    pos, neg = summaries.in_batch_scores(q, k)
    metrics = {'aps/loss_12': l12, 'aps/loss_21': l21, 'aps/pos_sim': pos_sim,
               'aps/ctr_top1': top1, **summaries.score_summary(pos, neg),
               **summaries.embedding_summary(o1['proj'])}
    return loss, metrics, batch_stats, o1['features'], {'pos': pos, 'neg': neg}

  def loss(self, ctx, batch):
    x1, x2 = batch['view1'], batch['view2']
    idx1, idx2 = self.sample_indices(ctx.rng, batch)
    if self.chunk_mode == 'one':
      loss, metrics, batch_stats, feats, scores = self.pair_loss(
          ctx, ctx.batch_stats, x1, x2, idx1, idx2)
      cover = self.view2_cover(batch, idx1, idx2)
    else:
      def body(bs, ids):
        i1, i2 = ids
        l, mets, bs, f, sc = self.pair_loss(ctx, bs, x1, x2, i1, i2)
        return bs, (l, mets, f, sc)
      xs = (jnp.swapaxes(idx1, 0, 1), jnp.swapaxes(idx2, 0, 1))              # [C, B, K]
      batch_stats, (ls, mets, fs, scs) = jax.lax.scan(body, ctx.batch_stats, xs)
      loss = jnp.mean(ls)
      metrics = jax.tree.map(jnp.mean, mets)
      feats, scores = fs[0], jax.tree.map(lambda a: a[0], scs)
      cover = jnp.mean(jax.vmap(lambda a, c: self.view2_cover(batch, a, c))(*xs))
    metrics = {'loss': loss, **metrics, 'aps/view2_cover': cover}
    return loss, base.LossAux(metrics, ctx.method_state, batch_stats, feats, scores)
