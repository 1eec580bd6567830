"""docs/presets.md, generated: every config file in configs/ x the dataset presets its
``get_config`` accepts x the default backbone, batch and length of each.

Regenerate (from the repository root) after changing a config:

    python tests/test_presets.py > docs/presets.md

The table is read from the configs themselves: each ``configs/*.py`` is imported and its
``get_config`` called with every dataset preset of ``ssl_jax.config_lib.DATASETS`` (a preset is
listed when the call succeeds), with no argument (the default), and with each backbone and flag
token (listed when accepted). No training, no TensorFlow: a second or two.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run as a script: `python tests/test_presets.py`
  sys.path.insert(0, str(REPO))

from ssl_jax import config_lib  # noqa: E402

DOC = REPO / 'docs' / 'presets.md'
REGENERATE = 'python tests/test_presets.py > docs/presets.md'
# Tokens probed besides datasets and backbones: the method configs' flags and the eval configs'
# protocol tokens (each config's docstring says what they do; docs/recipes/ has the detail).
OTHER_TOKENS = (*config_lib.FLAGS, 'cache', 'msf', 'ft', 'sweep', 'projector', 'euclidean',
                'aps', '1%', '10%')


def _config_files() -> list[pathlib.Path]:
  return sorted((REPO / 'configs').glob('*.py'))


def _module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'ssl_jax_presets_{path.stem}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _try(get_config, arg):
  try:
    return get_config(arg)
  except config_lib.ConfigError:
    return None


def _backbone(c) -> str:
  if 'method' not in c:   # an eval config: the network comes from --config.pretrained
    return "the pretrained run's"
  m = c.model
  text = f'`{m.backbone}`'
  if str(m.backbone).startswith('vit'):   # model.width applies to ResNets only
    return text + f', patch {m.patch_size}'
  if m.get('width', 1.0) != 1.0:
    text += f' x{m.width:g}'
  return text + f', {m.stem} stem'


def _batch(c) -> str:
  if 'batch_size' in c:
    return str(c.batch_size)
  if 'eval_batch_size' not in c:   # --mode=eval: each listed evaluator has its own
    return ', '.join(f'{e.batch_size} ({name})' for name, e in c.evals.items())
  return f'{c.eval_batch_size} (feature extraction)'


def _length(c) -> str:
  if 'method' in c:
    return f'{c.total_steps} steps' if c.total_steps > 0 else f'{c.total_epochs:g} epochs'
  if 'epochs' in c:
    return f'{c.epochs:g} epochs'
  return '— (one pass)'


def generate() -> str:
  """docs/presets.md's text."""
  rows, tokens, sizes = [], [], []
  for path in _config_files():
    get_config = _module(path).get_config
    name = f'`configs/{path.name}`'
    default = get_config(None)
    for ds in config_lib.DATASETS:
      c = _try(get_config, ds)
      if c is None:
        continue
      if 'method' in c:
        is_default = c.to_dict() == default.to_dict()
      else:
        is_default = False
      rows.append(f'| {name} | `{ds}`{" (default)" if is_default else ""} | {_backbone(c)} | '
                  f'{_batch(c)} | {_length(c)} |')
    if 'method' not in default:
      rows.append(f"| {name} | none: the pretraining run's dataset (default) | {_backbone(default)} "
                  f'| {_batch(default)} | {_length(default)} |')
    for flag in config_lib.FLAGS:
      c = _try(get_config, f'cifar10,{flag}')
      if c is not None and 'method' in c:
        sizes.append(f'| {name} | `cifar10,{flag}` | {_backbone(c)} | {c.batch_size} | '
                     f'{_length(c)} |')
    backbones = [b for b in (*config_lib.RESNETS, *config_lib.VITS) if _try(get_config, b)]
    others = [t for t in OTHER_TOKENS if _try(get_config, t)]
    tokens.append(f'| {name} | {", ".join(f"`{b}`" for b in backbones) or "—"} | '
                  f'{", ".join(f"`{t}`" for t in others) or "—"} |')
  return '\n'.join([
      '# Config presets',
      '',
      f'Generated from the configs by `{REGENERATE}` (do not edit by hand;',
      '`tests/test_presets.py` fails when this file is out of date). Each row is',
      '`--config=configs/<file>:<preset>`; the backbone, global batch and length are the',
      "preset's defaults (ResNet widths other than 1 are shown as xW). Every field can be",
      'overridden (`--config.batch_size=...`; README "Configs and overrides"), and',
      '`docs/recipes/<method>.md` has the recipe behind each config\'s presets: the reference',
      "followed field by field, with its sources, and the deliberate deviations.",
      '',
      '| Config | Dataset preset | Default backbone | Global batch | Length |',
      '|---|---|---|---|---|',
      *rows,
      '',
      '## Other tokens accepted in the config argument',
      '',
      'Comma-separated after the preset, e.g. `configs/moco.py:cifar10,quick` or',
      '`configs/byol.py:cifar10,resnet50,bs=512`. Method configs also take `bs=N`, `epochs=N`,',
      '`steps=N` and `seed=N`.',
      '',
      '| Config | Backbone tokens | Other tokens |',
      '|---|---|---|',
      *tokens,
      '',
      '## The small sizes: `quick` and `runlocal`',
      '',
      '`quick` is the README quick start\'s size (a demonstration that learns visibly on a CPU);',
      '`runlocal` a smoke test (a tiny network and a few steps: not a result). On `cifar10`:',
      '',
      '| Config | Argument | Backbone | Global batch | Length |',
      '|---|---|---|---|---|',
      *sizes,
      '',
  ])


def test_presets_doc_is_up_to_date():
  want = generate()
  have = DOC.read_text() if DOC.exists() else ''
  assert have == want, (f'docs/presets.md is out of date with configs/: regenerate it with '
                        f'`{REGENERATE}` (from the repository root) and commit the result.')


def test_every_config_has_a_dataset_preset_and_the_doc_lists_every_config():
  text = generate()
  for path in _config_files():
    assert f'| `configs/{path.name}` | `' in text, path.name


if __name__ == '__main__':
  sys.stdout.write(generate())
