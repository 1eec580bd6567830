"""The README's commands work as written: its "Quick start" section and the export/PyTorch part
of "Evaluating a trained model (offline)" (from its export command to the end of the by-hand
block).

Every fenced ``bash`` and ``python`` block of those two parts is accounted for
(``test_every_block_is_accounted_for`` fails when one is added, removed or reworded in a way
this file does not handle). What runs, what is substituted, and what is left out and why:

Quick start, its one ``bash`` block, line by line:

1. ``export TFDS_DATA_DIR=...``: runs as written, in the same shell as line 2's training command
   (the tests' ``TFDS_DATA_DIR`` — exported by .ci/run, or set by conftest.py — is kept by it).
2. ``python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt &&
   python -m ssl_jax.main ...``: the venv and install are left out — the tests already run
   inside that venv, .ci/run makes a fresh one with exactly that install, and a test cannot
   build a venv offline (the test checks the three steps are still those). The training command
   runs as written, with ``--config.data.download=True`` (a no-op here: CIFAR-10 is present),
   with two substitutions: ``/tmp/moco_quick`` -> a temporary directory, and appended
   ``--config.total_steps=3 --config.evals.knn.train_examples=512
   --config.evals.knn.eval_examples=256 --config.evals.online_probe.eval_examples=256`` (the
   full run is 780 steps and 5-17 minutes on two cores; this checks that the command works and yields the quick start's network, not what it
   learns — the README states the measured result).
3. ``pip install -r requirements-test.txt && python -m pytest -q tests``: left out — it is this
   suite; .ci/run runs the line verbatim (``test_ci_runs_the_test_line_verbatim`` checks).

Export part (``test_quick_start_then_export_then_pytorch`` runs 4 and 5 on line 2's workdir):

4. the export command (``bash``): runs as written from the checkout, ``WORKDIR`` -> line 2's
   workdir, ``OUT`` -> ``TMP/OUT``.
5. the drop-in snippet (``python``): runs unchanged with the venv's python in ``TMP`` (so its
   ``OUT/backbone.pth`` is 4's export and its ``cat.png`` a 32 x 32 RGB image the test writes
   there), ``PYTHONPATH`` = the checkout (the README: "from the checkout, or anywhere after
   ``pip install -e .``"). Its feature size, ``[N, 64]`` in the comment, must be the shape it
   computes for the quick start's network (``test_drop_in_comment_states_the_quick_start_
   feature_size`` checks the comment against the config without training).
6. the by-hand snippet (``python``): it loads a width-1 ResNet-18 into a stock
   ``torchvision.models.resnet18()``, which the quick start's 1/8-width network is not (its
   ``export.json`` says to use the drop-in way). ``test_by_hand_block_on_a_width_1_resnet18``
   runs it unchanged on the export of a width-1 CIFAR-stem ResNet-18 with random weights
   (``export.export_resnet``; training one through the CLI costs minutes on a CPU and adds
   nothing that 4 does not already cover), with ``uint8_images_nchw`` (which the README leaves
   to the reader) defined before it from ``cat.png``; its features must equal the drop-in
   model's on the same file and have the size its comment states.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TFDS_DATA_DIR

README = REPO / 'README.md'
QUICK_START = 'Quick start'
OFFLINE = 'Evaluating a trained model (offline)'
TRAIN_OVERRIDES = ('--config.total_steps=3', '--config.evals.knn.train_examples=512',
                   '--config.evals.knn.eval_examples=256',
                   '--config.evals.online_probe.eval_examples=256')
VENV_STEPS = ['python3 -m venv .venv', '. .venv/bin/activate', 'pip install -r requirements.txt']
TEST_LINE = 'pip install -r requirements-test.txt && python -m pytest -q tests'
FENCE = re.compile(r'^```(\w*)\n(.*?)^```\n', re.M | re.S)


# =============================================================================================
# Reading the README
# =============================================================================================
def _section(text: str, title: str) -> str:
  """The body of ``## title`` up to the next ``## `` heading."""
  m = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## )', text, re.M | re.S)
  assert m, f'README.md has no "## {title}" section'
  return m.group(1)


def _blocks(text: str) -> list[tuple[str, str]]:
  """``(language, code)`` of every fenced block of ``text``, in order."""
  return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def _export_part(text: str) -> str:
  """The offline section from the block holding the export command to the end of the
  by-hand block (the next ``###`` heading or paragraph that is not about the export)."""
  body = _section(text, OFFLINE)
  body = re.split(r'^### ', body, flags=re.M)[0]
  start = body.index('**Exporting for PyTorch.**')
  end = body.index('```\n', body.index('uint8_images_nchw', start)) + 4
  return body[start:end]


def readme_blocks():
  text = README.read_text()
  quick = [b for b in _blocks(_section(text, QUICK_START)) if b[0] in ('bash', 'python')]
  export = [b for b in _blocks(_export_part(text)) if b[0] in ('bash', 'python')]
  return quick, export


def _one_line(cmd: str) -> str:
  """A shell command with its backslash continuations joined."""
  return re.sub(r'\\\n\s*', '', cmd).strip()


def quick_start_lines() -> list[str]:
  quick, _ = readme_blocks()
  return [line for line in quick[0][1].splitlines() if line.strip()]


def train_command() -> tuple[str, str]:
  """(line 1 as written, line 2's training command as written)."""
  lines = quick_start_lines()
  steps = lines[1].split(' && ')
  assert steps[:-1] == VENV_STEPS, steps
  assert steps[-1].startswith('python -m ssl_jax.main '), steps[-1]
  return lines[0], steps[-1]


def _comment_size(code: str, line_start: str) -> int:
  """The ``C`` of a ``# [N, C]`` comment on the snippet line that starts with ``line_start``."""
  line = next(ln for ln in code.splitlines() if ln.strip().startswith(line_start))
  m = re.search(r'#.*?\[N, (\d+)\]', line)
  assert m, f'no "# [N, C]" feature-size comment on {line!r}'
  return int(m.group(1))


# =============================================================================================
# Fast checks
# =============================================================================================
def test_every_block_is_accounted_for():
  quick, export = readme_blocks()
  assert [lang for lang, _ in quick] == ['bash'], (
      'the Quick start now has other fenced bash/python blocks: run them in tests/test_readme.py '
      'or list them as left out (with the reason) in its docstring')
  lines = quick_start_lines()
  assert len(lines) == 3, lines
  assert lines[0].startswith('export TFDS_DATA_DIR=')
  train_command()
  assert lines[2] == TEST_LINE
  assert [lang for lang, _ in export] == ['bash', 'python', 'python'], export
  assert _one_line(export[0][1]).startswith('python -m ssl_jax.main --mode=export ')
  assert 'torchvision_model(' in export[1][1]
  assert 'torchvision.models.resnet18()' in export[2][1]


def test_ci_runs_the_test_line_verbatim():
  ci = (REPO / '.ci' / 'run').read_text().splitlines()
  assert TEST_LINE in ci
  assert 'python3 -m venv .ci_venv' in ci and '. .ci_venv/bin/activate' in ci
  assert any(re.fullmatch(r'python -m pip install( -q)? -r requirements.txt', ln) for ln in ci)
  assert any(ln.startswith('export TFDS_DATA_DIR=') for ln in ci)


def test_pyproject_requires_the_python_the_quick_start_names():
  import tomllib
  version = re.search(r'with Python (3\.\d+)', _section(README.read_text(), QUICK_START)).group(1)
  with open(REPO / 'pyproject.toml', 'rb') as f:
    assert tomllib.load(f)['project']['requires-python'] == f'>={version}'


def test_drop_in_comment_states_the_quick_start_feature_size():
  """The drop-in snippet's ``# [N, C]`` is the pooled feature size of the network the quick
  start trains (ResNet-18 at 1/8 width: 64), read from the config the command names."""
  import harness
  from ssl_jax.models import resnet
  _, train = train_command()
  config_arg = re.search(r'--config=configs/(\w+)\.py:(\S+)', train)
  config = harness.load_config(config_arg.group(1), config_arg.group(2))
  want = resnet.feature_dims(config.model.backbone, width=config.model.width)['pooled']
  _, export = readme_blocks()
  assert _comment_size(export[1][1], 'features = model(images)') == want == 64
  assert _comment_size(export[2][1], 'features = model(preprocess(') == \
      resnet.feature_dims('resnet18')['pooled'] == 512


# =============================================================================================
# Running the blocks
# =============================================================================================
def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PATH'] = os.pathsep.join([os.path.dirname(sys.executable), env.get('PATH', '')])
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  return env


def _run(args, cwd, *, stdin=None, timeout=600) -> tuple[str, str]:
  """(stdout, stderr) of a command that must succeed."""
  r = subprocess.run(args, cwd=cwd, env=_env(), input=stdin, capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, (f'{args} (cwd {cwd}) exited {r.returncode}:\n'
                             f'{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
  return r.stdout, r.stderr


def _write_image(path) -> np.ndarray:
  from PIL import Image
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(image).save(path)
  return image


def _run_snippet(code: str, cwd, *, before: str = '', after: str = '') -> dict:
  """Run ``code`` (a README python block, unchanged) in a fresh interpreter in ``cwd`` and
  return the JSON that ``after`` prints on its last line."""
  out, err = _run([sys.executable, '-'], cwd, stdin='\n'.join([before, code, after]),
                  timeout=300)
  assert '<stdin>:' not in err, err   # no warning raised by the snippet's own lines
  return json.loads(out.strip().splitlines()[-1])


REPORT = """
import json as _json
print(_json.dumps({'shape': list(features.shape),
                   'finite': bool(__import__('torch').isfinite(features).all())}))
"""


@pytest.mark.slow
def test_quick_start_then_export_then_pytorch(tmp_path):
  assert TFDS_DATA_DIR, 'set TFDS_DATA_DIR to a data dir with cifar10 (.ci/run exports it)'
  line1, train = train_command()
  workdir = tmp_path / 'moco_quick'
  assert ' --workdir=/tmp/moco_quick' in train and '--config.data.download=True' in train
  train = train.replace('--workdir=/tmp/moco_quick', f'--workdir={shlex.quote(str(workdir))}')
  script = '\n'.join([line1, ' '.join([train, *TRAIN_OVERRIDES])])
  out, _ = _run(['bash', '-euo', 'pipefail', '-c', script], REPO)
  assert 'Final after 3 steps | kNN top-1' in out, out[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['model']['backbone'], config['model']['width']) == ('resnet18', 0.125)

  _, export = readme_blocks()
  cmd = _one_line(export[0][1])
  cmd = re.sub(r'\bWORKDIR\b', shlex.quote(str(workdir)), cmd)
  cmd = re.sub(r'\bOUT\b', shlex.quote(str(tmp_path / 'OUT')), cmd)
  out, _ = _run(['bash', '-euo', 'pipefail', '-c', cmd], REPO)
  assert (tmp_path / 'OUT' / 'backbone.pth').exists(), out
  how = json.loads((tmp_path / 'OUT' / 'export.json').read_text())
  assert how['base_width'] == 8 and '[N,64] features out' in how['load']['drop_in'], how

  _write_image(tmp_path / 'cat.png')
  got = _run_snippet(export[1][1], tmp_path, after=REPORT)
  stated = _comment_size(export[1][1], 'features = model(images)')
  assert got == {'shape': [1, stated], 'finite': True}, got
  assert stated == 64


BY_HAND_BEFORE = """
import numpy as _np, torch as _torch
from PIL import Image as _Image
uint8_images_nchw = _torch.from_numpy(
    _np.array(_Image.open('cat.png').convert('RGB'))).permute(2, 0, 1)[None]
"""
BY_HAND_AFTER = """
import json as _json
from ssl_jax.export import torchvision_model as _tvm
_ref = _tvm('OUT/backbone.pth')(uint8_images_nchw).detach()
print(_json.dumps({'shape': list(features.shape),
                   'max_diff': float((features.detach() - _ref).abs().max()),
                   'scale': float(_ref.abs().max())}))
"""


@pytest.mark.slow
def test_by_hand_block_on_a_width_1_resnet18(tmp_path):
  from test_export import np_variables
  from ssl_jax import export as export_lib
  from ssl_jax.models import resnet
  model = resnet.get_backbone('resnet18', stem='cifar')
  variables = np_variables(model, (1, 32, 32, 3))
  (tmp_path / 'OUT').mkdir()
  export_lib.export_resnet(variables['params'], variables['batch_stats'],
                           tmp_path / 'OUT' / 'backbone.pth')
  _write_image(tmp_path / 'cat.png')
  _, export = readme_blocks()
  got = _run_snippet(export[2][1], tmp_path, before=BY_HAND_BEFORE, after=BY_HAND_AFTER)
  stated = _comment_size(export[2][1], 'features = model(preprocess(')
  assert got['shape'] == [1, stated] == [1, 512], got
  assert got['max_diff'] <= 1e-4 * got['scale'], got
  # The drop-in snippet on this width-1 export: the "[N, 512] at width 1" of its comment.
  drop_in = _run_snippet(export[1][1], tmp_path, after=REPORT)
  assert drop_in == {'shape': [1, 512], 'finite': True}, drop_in
