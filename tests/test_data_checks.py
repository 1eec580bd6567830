"""Data checks every run passes before a label reaches a loss (issue 27, items 1 and 4a).

Each test is one case that used to run silently (exit 0, wrong numbers): tiny image folders
written here (a few PNGs per class), a few CIFAR-10 records from the offline TFDS data dir.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time

import numpy as np
import pytest
from PIL import Image

from harness import load_config
from ssl_jax import data
from ssl_jax.data import sources
from ssl_jax import checkpoint
from ssl_jax.evals import knn_eval

REAL_TFDS = os.environ.get('TFDS_DATA_DIR')
HAVE_CIFAR = bool(REAL_TFDS) and os.path.isdir(os.path.join(REAL_TFDS, 'cifar10'))


def _png(path, value: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(path)


def _folder(root, split, classes, per_class=1):
  for i, c in enumerate(classes):
    for k in range(per_class):
      _png(root / split / c / f'{k}.png', 17 * i + k)


def _cfg(root, preset='cifar10', **overrides):
  cfg = data.default_data_config(preset)
  cfg.source = 'folder'
  cfg.folder_root = str(root)
  cfg.eval_split = 'val'
  cfg.folder_validate = 'header'
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(autouse=True)
def _fresh_cache():
  sources.clear_cache()
  yield
  sources.clear_cache()


def _one_line_error(exc_info) -> str:
  msg = str(exc_info.value)
  assert '\n' not in msg
  return msg


# ----------------------------------------------------------------------------------------------
# Class folders (training and every offline mode: one check)
# ----------------------------------------------------------------------------------------------


def test_offline_knn_stops_on_a_stray_macosx_folder(tmp_path, monkeypatch):
  """An empty train/__MACOSX shifted every train label by one: kNN 26.70% -> 7.20%, exit 0."""
  root = tmp_path / 'pets'
  _folder(root, 'train', ['cat', 'dog'])
  _folder(root, 'val', ['cat', 'dog'])
  (root / 'train' / '__MACOSX').mkdir()
  pre = load_config('byol', 'cifar10,runlocal')
  pre.data.source, pre.data.folder_root, pre.data.eval_split = 'folder', str(root), 'val'
  # The run's weights are never reached: the data check comes first.
  monkeypatch.setattr(checkpoint, 'load_pretrained', lambda *a, **k: (pre, {}, {}, 7))
  c = load_config('eval_knn', 'runlocal')
  c.pretrained = str(tmp_path / 'run')
  with pytest.raises(data.DataConfigError) as e:
    knn_eval.run(c, str(tmp_path / 'knn'))
  assert _one_line_error(e) == (
      f"image folder {root}: train/ has classes not in val/: ['__MACOSX']; labels index the "
      f"sorted class folders, so they would not match. Make both splits hold the same class "
      f"folders.")
  # Training calls the same check through its existing entry point.
  with pytest.raises(data.DataConfigError, match=re.escape(str(e.value))):
    data.check_same_classes(pre.data, 'train', 'val')


def test_num_classes_set_below_the_folders_is_an_error(tmp_path):
  """12 class folders, num_classes=10 set: labels 10 and 11 were out of range (NaN probe loss)."""
  _folder(tmp_path, 'train', [f'c{k:02d}' for k in range(12)])
  _folder(tmp_path, 'val', [f'c{k:02d}' for k in range(12)])
  cfg = _cfg(tmp_path, 'cifar100', num_classes=10)
  with pytest.raises(data.DataConfigError) as e:
    data.check_folder_source(cfg, 'train', 'val')
  assert _one_line_error(e) == (
      f'image folder {tmp_path}: --config.data.num_classes=10 but train/ has 12 class folders; '
      f'set --config.data.num_classes=12 (or -1: from the folders).')
  # Without the check, loading the data stops too (the labels are range-checked when loaded).
  with pytest.raises(data.DataConfigError) as e:
    data.num_examples(cfg, 'train')
  assert _one_line_error(e) == (
      f'2 of 12 labels of {tmp_path}/train are outside [0, 10) (labels 0..11); set '
      f'--config.data.num_classes=12 (--config.data.num_classes=10 now).')


def test_num_classes_set_above_the_folders_is_an_error(tmp_path):
  """10 class folders, num_classes=5: ran with exit 0."""
  _folder(tmp_path, 'train', [f'c{k}' for k in range(10)])
  _folder(tmp_path, 'val', [f'c{k}' for k in range(10)])
  cfg = _cfg(tmp_path, num_classes=5)
  with pytest.raises(data.DataConfigError) as e:
    data.check_same_classes(cfg, 'train', 'val')
  assert _one_line_error(e) == (
      f'image folder {tmp_path}: --config.data.num_classes=5 but train/ has 10 class folders; '
      f'set --config.data.num_classes=10 (or -1: from the folders).')


def test_one_class_is_an_error(tmp_path):
  """One class folder: 'kNN 100.00%', no warning."""
  _folder(tmp_path, 'train', ['cat'], per_class=2)
  _folder(tmp_path, 'val', ['cat'])
  with pytest.raises(data.DataConfigError) as e:
    data.check_same_classes(_cfg(tmp_path), 'train', 'val')
  assert _one_line_error(e) == (
      f"image folder {tmp_path}: train/ has one class folder ('cat'); a labelled folder needs "
      f"at least 2 classes (with one, every kNN/probe prediction is right). Add the other class "
      f"folders, or put unlabelled images directly in train/.")


@pytest.mark.parametrize('num_classes', [10, -1])
def test_num_classes_comes_from_the_folders_when_not_set(tmp_path, num_classes):
  """12 folders with the cifar10 preset's 10 (or -1): num_classes becomes 12 and every label
  is in range; the banner says so."""
  classes = [f'c{k:02d}' for k in range(12)]
  _folder(tmp_path, 'train', classes)
  _folder(tmp_path, 'val', classes)
  cfg = _cfg(tmp_path, num_classes=num_classes)
  summary = data.check_same_classes(cfg, 'train', 'val')
  assert cfg.num_classes == 12
  assert (summary.num_classes, summary.num_classes_from, summary.class_names) == (
      12, 'folders', tuple(classes))
  assert data.describe(cfg) == f'folder {tmp_path} (12 classes)'
  labels = np.concatenate([b['label'] for b in data.make_eval_iterator(
      cfg, split='train', global_batch_size=4, process_index=0, process_count=1)])
  assert sorted(labels[labels >= 0].tolist()) == list(range(12))
  # An explicit value equal to the folders is kept; the check is idempotent.
  assert data.check_same_classes(cfg, 'train', 'val').num_classes_from == 'config'


def test_describe(tmp_path):
  assert data.describe(data.default_data_config('cifar10')) == 'tfds cifar10 (10 classes)'
  _folder(tmp_path, 'train', ['a', 'b', 'c'])
  assert data.describe(_cfg(tmp_path)) == f'folder {tmp_path} (3 classes)'   # not checked yet


# ----------------------------------------------------------------------------------------------
# Sub-folders and links
# ----------------------------------------------------------------------------------------------


def test_symlinked_sub_folder_inside_a_class_is_read(tmp_path):
  """A linked sub-folder was dropped (2,850 of 3,000 images used, no word)."""
  root = tmp_path / 'root'
  _folder(root, 'train', ['cat', 'dog'], per_class=2)
  _folder(root, 'val', ['cat', 'dog'])
  for k in range(3):
    _png(tmp_path / 'more_cats' / 'deeper' / f'{k}.png', 100 + k)
  os.symlink(tmp_path / 'more_cats', root / 'train' / 'cat' / 'more')
  cfg = _cfg(root)
  summary = data.check_folder_source(cfg, 'train', 'val')
  assert summary.num_train == 7
  src = sources.build_source(cfg, 'train')
  assert src.num_examples == 7 and src.labels.tolist() == [0] * 5 + [1] * 2
  assert sum('/cat/more/deeper/' in p for p in src.paths) == 3


def test_symlink_cycle_is_skipped_with_one_warning(tmp_path, caplog):
  root = tmp_path / 'root'
  _folder(root, 'train', ['cat', 'dog'], per_class=2)
  _png(root / 'train' / 'cat' / 'sub' / 'x.png', 9)
  os.symlink(root / 'train' / 'cat', root / 'train' / 'cat' / 'sub' / 'loop')   # sub/loop -> cat
  t = time.time()
  with caplog.at_level(logging.WARNING, logger='ssl_jax.data'):
    files, labels, classes = sources.list_image_folder(str(root), 'train')
  assert time.time() - t < 10
  assert classes == ('cat', 'dog') and labels == [0, 0, 0, 1, 1] and len(set(files)) == 5
  warned = [r.getMessage() for r in caplog.records if 'already read' in r.getMessage()]
  assert warned == [f'Skipping {root}/train/cat/sub/loop: a link to {root}/train/cat, which is '
                    f'already read (a link cycle or a second link to one folder).']


# ----------------------------------------------------------------------------------------------
# TFDS labels and download
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('cache', [True, False])
def test_tfds_labels_out_of_range_are_an_error(cache):
  """cifar10 with num_classes=5: labels 5..9 reached the probe loss."""
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  cfg = data.default_data_config('cifar10')
  cfg.update(data_dir=REAL_TFDS, cache=cache, num_classes=5)
  if cache:   # in-memory arrays: the labels themselves are checked
    labels = sources.build_source(data.default_data_config('cifar10'), 'test[:64]').labels
    with pytest.raises(data.DataConfigError) as e:
      sources.build_source(cfg, 'test[:64]')
    assert _one_line_error(e) == (
        f'{int((labels >= 5).sum())} of 64 labels of cifar10/test[:64] are outside [0, 5) '
        f'(labels 0..9); set --config.data.num_classes=10 (--config.data.num_classes=5 now).')
  else:       # streamed: the dataset info's class count
    with pytest.raises(data.DataConfigError) as e:
      sources.build_source(cfg, 'test[:64]')
    assert _one_line_error(e) == (
        'cifar10 has 10 classes (TFDS info: labels 0..9), so labels 5..9 are outside [0, 5); '
        'set --config.data.num_classes=10 (--config.data.num_classes=5 now).')


def _online() -> bool:
  try:
    socket.create_connection(('www.cs.toronto.edu', 443), timeout=3).close()
    return True
  except OSError:
    return False


def test_download_without_network_is_one_line(tmp_path):
  """--config.data.download=True died in TFDS's import (importlib_resources); offline TFDS then
  retries for minutes. Now: one line at once, naming the data dir to fill."""
  if _online():
    pytest.skip('this machine has network: the test would download CIFAR-10')
  cfg = data.default_data_config('cifar10')
  cfg.update(data_dir=str(tmp_path), download=True)
  t = time.time()
  with pytest.raises(data.DatasetNotFound) as e:
    data.num_examples(cfg, 'train')
  assert time.time() - t < 30
  msg = _one_line_error(e)
  assert re.fullmatch(
      r'could not download cifar10 \(no network: cannot reach www\.cs\.toronto\.edu:443: '
      r'gaierror: .+\); put a prepared TFDS data dir at --config\.data\.data_dir or '
      rf"TFDS_DATA_DIR \(now '{re.escape(str(tmp_path))}'; `tfds build cifar10 "
      r'--data_dir=DIR` prepares one on a machine with network\)\.', msg), msg


def test_download_true_with_the_data_present_never_touches_the_network(monkeypatch):
  assert HAVE_CIFAR, 'set TFDS_DATA_DIR to a data dir with cifar10 (../shared/data/tfds)'
  def no_network(*a, **k):
    raise AssertionError('network used although the data is prepared')
  monkeypatch.setattr(socket, 'create_connection', no_network)
  cfg = data.default_data_config('cifar10')
  cfg.update(data_dir=REAL_TFDS, download=True)
  assert data.num_examples(cfg, 'test') == 10_000
