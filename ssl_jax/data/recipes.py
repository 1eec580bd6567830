"""View recipes: which augmented views a method trains on, in one table (no TensorFlow here:
the trainer, the synthetic source and the benchmarks read it without loading tf.data).

A recipe is a tuple of :class:`ViewSpec` (one per output key). ``RECIPES`` holds the recipes of
the methods we reproduce; a method picks one by name through ``data_cfg.views``:

===============  ================================================================================
``byol``         'view1', 'view2': BYOL's asymmetric pair. Both: RandomResizedCrop(0.08-1), flip,
                 ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 (random order), grayscale p 0.2;
                 view1 blur p 1.0 / solarize p 0; view2 blur p 0.1 / solarize p 0.2.
``moco``         'view1', 'view2': MoCo v2. RandomResizedCrop(0.2-1), ColorJitter(0.4, 0.4, 0.4,
                 0.1) p 0.8, grayscale p 0.2, blur p 0.5, flip.
``weak_strong``  MSF: 'weak' = RandomResizedCrop(0.2-1) + flip; 'strong' = the MoCo v2 view.
``multi_res``    CLIM: the two MoCo v2 views + 'view_lr0', 'view_lr1', ...: MoCo v2 views at
                 each of ``data_cfg.extra_resolutions`` (blur kernel scaled to that size).
``aps``          'view1', 'view2': RandomResizedCrop(0.15-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
                 p 0.8, grayscale p 0.2, no blur; plus the geometry 'box1', 'box2' (float32 [4]:
                 y0, x0, h, w of the crop, normalised by the source height/width, *before* the
                 flip) and 'flip1', 'flip2' (bool: the view was mirrored after cropping).
===============  ================================================================================

Dataset-level switches applied on top (see :func:`resolve_views`): ``data_cfg.blur = False``
removes every blur (the CIFAR presets, as is usual at 32 px); ``data_cfg.crop_scale``, when
set, replaces every view's crop scale.

Mapping a view pixel back to the source (APS): output pixel ``(r, c)`` of a ``S x S`` view with
box ``(y0, x0, h, w)`` and flip ``f`` shows source point ``y = y0 + (r + 0.5) / S * h``,
``x = x0 + (c' + 0.5) / S * w`` with ``c' = S - 1 - c`` if ``f`` else ``c`` (normalised coords).

Randomness: every draw is stateless and depends on (seed, global position) only, never on the
process count: per-example crops are seeded by the example's global position, batched draws by
(seed, step, group of rows of the global batch); see ``ssl_jax/data/pipeline.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One augmented view. ``size=None`` means ``data_cfg.image_size``."""
  key: str
  size: int | None = None
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # b, c, s, h
  jitter_p: float = 0.8
  gray_p: float = 0.2
  blur_p: float = 0.0
  solarize_p: float = 0.0
  box_key: str | None = None   # record the normalised crop box under this key
  flip_key: str | None = None  # record the flip flag under this key


_BYOL = ViewSpec('view1', crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                 gray_p=0.2, blur_p=1.0, solarize_p=0.0)
_MOCO = ViewSpec('view1', crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                 gray_p=0.2, blur_p=0.5)
_WEAK = ViewSpec('weak', crop_scale=(0.2, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0,
                 gray_p=0.0, blur_p=0.0)
_APS = ViewSpec('view1', crop_scale=(0.15, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                gray_p=0.2, blur_p=0.0, box_key='box1', flip_key='flip1')

#: Recipe name -> its views. ``multi_res`` gets its low-resolution views from the config.
RECIPES: dict[str, tuple[ViewSpec, ...]] = {
    'byol': (_BYOL, dataclasses.replace(_BYOL, key='view2', blur_p=0.1, solarize_p=0.2)),
    'moco': (_MOCO, dataclasses.replace(_MOCO, key='view2')),
    'weak_strong': (_WEAK, dataclasses.replace(_MOCO, key='strong')),
    'multi_res': (_MOCO, dataclasses.replace(_MOCO, key='view2')),
    'aps': (_APS, dataclasses.replace(_APS, key='view2', box_key='box2', flip_key='flip2')),
}
#: Template of the extra low-resolution views of ``multi_res``.
MULTI_RES_TEMPLATE = _MOCO


def get_recipe(name: str) -> tuple[ViewSpec, ...]:
  """The recipe ``name``; ValueError naming the accepted names otherwise."""
  if name not in RECIPES:
    raise ValueError(f'Unknown view recipe {name!r}; accepted: {sorted(RECIPES)}.')
  return RECIPES[name]


def resolve_views(data_cfg) -> tuple[ViewSpec, ...]:
  """The concrete views for ``data_cfg``: recipe + sizes + dataset switches (blur, crop scale)."""
  specs = list(get_recipe(data_cfg.views))
  if data_cfg.views == 'multi_res':
    for i, res in enumerate(data_cfg.get('extra_resolutions') or ()):
      specs.append(dataclasses.replace(MULTI_RES_TEMPLATE, key=f'view_lr{i}', size=int(res)))
  out = []
  for spec in specs:
    changes = {'size': spec.size or int(data_cfg.image_size)}
    if not data_cfg.get('blur', True):
      changes['blur_p'] = 0.0
    if data_cfg.get('crop_scale') is not None:
      lo, hi = data_cfg.crop_scale
      changes['crop_scale'] = (float(lo), float(hi))
    out.append(dataclasses.replace(spec, **changes))
  return tuple(out)


def output_keys(specs: Sequence[ViewSpec]) -> list[str]:
  """Keys a train batch carries for ``specs`` (besides 'label')."""
  keys = []
  for s in specs:
    keys += [k for k in (s.key, s.box_key, s.flip_key) if k]
  return keys
