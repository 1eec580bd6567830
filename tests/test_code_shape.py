"""The shape rules of docs/architecture.md, checked on the source: long functions say why, the
layers import only what they may, and no trainer takes callbacks."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'ssl_jax'
MAX_LINES = 80


def _modules():
  return sorted(PACKAGE.rglob('*.py'))


def _imports(path: pathlib.Path) -> set[str]:
  """Every module ``path`` imports, at the top or inside a function."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


def test_long_functions_say_why():
  """A function over 80 lines carries "Long on purpose" and the reason in its docstring."""
  silent = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_LINES and 'long on purpose' not in (ast.get_docstring(node) or '').lower():
          silent.append(f'{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)')
  assert not silent, silent


@pytest.mark.parametrize('module, forbidden', [
    ('config_lib.py', 'ssl_jax.methods'),      # the config layer knows no method
    ('utils.py', 'ssl_jax'),                   # plain helpers: jax and numpy only
    ('ops', 'ssl_jax.methods'),                # ops know no method, trainer or evaluator
    ('ops', 'ssl_jax.train'),
    ('ops', 'ssl_jax.evals'),
    ('methods', 'ssl_jax.train'),              # a method knows no trainer or evaluator
    ('methods', 'ssl_jax.evals'),
    ('models', 'ssl_jax.methods'),
])
def test_layers_import_only_what_they_may(module, forbidden):
  target = PACKAGE / module
  files = sorted(target.rglob('*.py')) if target.is_dir() else [target]
  bad = [f'{f.relative_to(ROOT)} imports {m}' for f in files for m in _imports(f)
         if m == forbidden or m.startswith(forbidden + '.')]
  assert not bad, bad


def test_no_callback_loop():
  """The trainers write their loops inline: no ``loop.run`` with callback parameters."""
  assert not (PACKAGE / 'loop.py').exists()
  users = [str(p.relative_to(ROOT)) for p in _modules() if 'ssl_jax.loop' in _imports(p)]
  assert not users, users
