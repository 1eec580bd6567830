"""docs/architecture.md's new-method walkthrough, run as written: its four blocks (the method
file, the registry line, the config, the test) are installed in a temporary directory and the
walkthrough's own test is run on the trainer's jitted step."""
from __future__ import annotations

import ast
import importlib
import pathlib
import re
import sys

from ssl_jax import methods

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'architecture.md'


def _walkthrough_blocks() -> list[str]:
  text = DOC.read_text()
  section = text[text.index('## A new method, step by step'):]
  return re.findall(r'```python\n(.*?)```', section, re.S)


def test_walkthrough_has_the_four_blocks_in_order():
  method_file, registry_line, config_file, test_file = _walkthrough_blocks()
  assert 'class Method(base.Method)' in method_file
  assert re.fullmatch(r"\s*'simsiam': 'ssl_jax\.methods\.simsiam',\s*", registry_line)
  assert "method='simsiam'" in config_file and 'def get_config' in config_file
  assert test_file.count('def test_') == 1


def test_walkthrough_runs(tmp_path, monkeypatch):
  method_file, registry_line, config_file, test_file = _walkthrough_blocks()
  # 1. the method file, importable under a private name (ssl_jax/ is not written to)
  (tmp_path / 'walkthrough_simsiam.py').write_text(method_file)
  # 2. the registry line: the same entry, pointing at that file
  name, module = ast.literal_eval('{' + registry_line.strip() + '}').popitem()
  assert module == 'ssl_jax.methods.simsiam'
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(methods._REGISTRY, name, 'walkthrough_simsiam')  # pylint: disable=protected-access
  # 3. the config, at the path the walkthrough's test reads
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'simsiam.py').write_text(config_file)
  monkeypatch.chdir(tmp_path)
  # 4. the test, run as pytest would (tests/ is on the path: it imports method_steps)
  namespace: dict = {}
  exec(compile(test_file, 'tests/test_simsiam.py', 'exec'), namespace)  # pylint: disable=exec-used
  tests = [f for n, f in namespace.items() if n.startswith('test_')]
  assert len(tests) == 1
  tests[0]()
  assert methods.get('simsiam').__module__ == 'walkthrough_simsiam'
  sys.modules.pop('walkthrough_simsiam', None)
  importlib.invalidate_caches()
