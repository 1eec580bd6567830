r"""Offline kNN evaluation (``--mode=knn``) and 2-D embeddings / score plots (``--mode=embed``).

    python -m ssl_jax.main --mode=knn --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=/tmp/byol_c10 --workdir=/tmp/byol_c10_knn

Prints one line per setting (``weighted_k200_t0.1``, ``unweighted_k1``, ``unweighted_k20``)
with its held-out and test accuracy, then the **selected** setting and its test accuracy.
Selection is honest: k and T are chosen on a seeded, class-stratified 10% of the train split
(``selection_holdout``, ``selection_seed``), searched against the other 90%; the test split is
used only to report the selected setting (the full test grid is printed and saved for reference,
labelled, never used to choose). The test bank is the whole train split. ``results.json`` holds
``selected``, ``test_top1``/``test_top5``, ``holdout_grid`` and ``test_grid_for_reference_only``
(lists in numeric order of k, then T); TensorBoard scalars ``offline_knn/top1_<setting>`` and
``offline_knn/selected_top1``.

    python -m ssl_jax.main --mode=embed --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=/tmp/byol_c10 --workdir=/tmp/byol_c10_embed

writes ``embedding.png`` (UMAP if umap-learn is installed, else t-SNE, of 2000 test images) and
``scores.png`` (positive vs negative pair cosine scores), also as TensorBoard images.

Arguments (``get_config('<dataset>[,sweep][,projector][,euclidean][,runlocal]')``):

* default: weighted kNN k = 200, T = 0.1 (lightly's monitor) and unweighted k in {1, 20}
  (MSF), cosine on L2-normalised backbone features.
* ``sweep``: k in {10, 20, 50, 100, 200} x T in {0.02, 0.05, 0.07, 0.1, 0.2, 0.5}
  (one search serves the whole sweep). Override with ``--config.ks='(10, 200)'``.
* ``projector``: the projector's output instead of the backbone's.
* ``euclidean``: rank by L2 distance.
* ``runlocal``: 512 bank / 256 query images, k <= 20 — a smoke test.

Expected (ResNet-18 CIFAR stem, CIFAR-10, k = 200 weighted): lightly's 200-epoch anchors BYOL
86.8%, MoCo 84.7%, SimCLR 84.8%. MSF (ResNet-50, ImageNet, 200 epochs, unweighted): 1-NN
62.0%, 20-NN 64.9%.
"""
from __future__ import annotations

import ml_collections

from ssl_jax.evals import eval_config


def get_config(arg: str | None = None):
  c, rest = eval_config.base_eval_config(arg)
  c.features = 'backbone'          # 'backbone' or 'projector'
  c.metric = 'cosine'              # 'cosine' or 'euclidean'
  c.l2_normalize = True            # euclidean only (cosine always normalises)
  c.ks = (200,)                    # weighted kNN: every k x every temperature
  c.temperatures = (0.1,)
  c.unweighted_ks = (1, 20)        # majority vote (MSF)
  c.chunk_size = 256               # queries per on-device chunk
  # k and T are chosen on a held-out, class-stratified part of the train split (never on test).
  c.selection_holdout = 0.1
  c.selection_seed = 0
  c.embed = ml_collections.ConfigDict({
      'method': 'auto',            # 'auto' (UMAP if installed, else t-SNE), 'umap', 'tsne'
      'num_examples': 2000, 'perplexity': 30.0,
      'num_threads': 1,            # t-SNE/UMAP threads (<= 0: library default)
      'score_examples': 512})      # images for the pos/neg score plot (0: none)
  for token in rest:
    if token == 'sweep':
      c.ks = (10, 20, 50, 100, 200)
      c.temperatures = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5)
    elif token == 'projector':
      c.features = 'projector'
    elif token == 'euclidean':
      c.metric = 'euclidean'
    elif token == 'runlocal':
      c.ks = (20,)
      c.unweighted_ks = (1, 20)
      c.embed.update({'num_examples': 200, 'score_examples': 64})
    else:
      eval_config.reject_tokens([token], ['sweep', 'projector', 'euclidean'])
  return c
