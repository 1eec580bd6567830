"""Every run path goes through here: a local folder or a ``gs://`` URL, read and written alike.

A run lives on Cloud Storage on a pod (each host must reach it; a preempted spot slice loses its
disks): the workdir and everything under it (config.json, checkpoints, events, plots, results,
exports, logs, profiles, outcome.json), ``--config.pretrained``, image-folder roots, TFDS
``data_dir``. Code in ``ssl_jax/`` never uses the ``os`` module's path, folder or rename calls,
the ``open`` built-in or ``shutil`` on one of them; it calls the plain functions below, which take
and return ``str``. (This module uses them for local paths only, each line says so.)

Library: ``etils.epath`` (the path library Orbax itself uses, so our files and Orbax's
checkpoints take one route). For ``gs://`` we pin epath's fsspec/gcsfs backend
(``EPATH_USE_TF=false``, set before the first ``gs://`` path): the same
client then serves a real bucket (Application Default Credentials: the TPU VM's service account,
or ``gcloud auth application-default login``) and a local emulator in the tests
(``STORAGE_EMULATOR_HOST``), so the tests run the code a pod runs. tensorstore writes Orbax's
array data on its own (``TENSORSTORE_GCS_HTTP_URL`` points it at an emulator).

Never half a file (a reader — a resuming run, an evaluator, TensorBoard — sees the old whole file
or the new whole file):
* local files: written to ``NAME.tmp-<pid>`` in the same folder, then renamed over NAME (atomic on
  POSIX);
* ``gs://`` objects: one upload per object and no temporary name (a Cloud Storage rename is a
  copy plus a delete). An object upload is atomic: it becomes visible whole when it completes,
  replacing the previous generation.
* ``append_text`` (small logs): Cloud Storage has no append, so the whole object is re-uploaded.
* ``move_dir`` (a damaged checkpoint moved aside): a local rename is atomic; on ``gs://``
  it copies every object, then deletes the sources — not atomic: if interrupted, the source is
  still there (still damaged) and the next restore moves it again under a new name.

Writers that cannot take a ``gs://`` path through this layer (TensorFlow's TensorBoard event
writer and the JAX profiler use their own C++ file systems) write into a :class:`Mirror`: a local
staging folder under the system temp dir (never the current directory) that is uploaded to the
run folder after every flush and at the end. A local run folder is written in place.

Bad inputs (``check_reachable``): no network, no credentials, a bucket that does not exist, or
no permission are one :class:`PathError` naming the path and what to check, raised before any
compilation and before anything is created.
"""
from __future__ import annotations

import atexit
import json
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

SCHEMES = ('gs://',)
_DEFAULT_GCS = 'https://storage.googleapis.com'


class PathError(OSError):
  """A run path cannot be used; the message names it and what to check."""


def is_remote(p: str) -> bool:
  """True for a URL (``gs://...``); False for a local path."""
  return '://' in str(p)


def _check_scheme(p: str, what: str = '') -> None:
  s = str(p)
  name = f'{what}={s}' if what else s
  if is_remote(s) and not s.startswith(SCHEMES):
    raise PathError(f'{name}: unsupported URL scheme; accepted: a local path or gs://BUCKET/PATH.')
  if s.startswith('gs:') and not s.startswith('gs://'):   # would be a local folder named gs:
    raise PathError(f'{name} is not a Cloud Storage URL (it would be a local folder named "gs:"); '
                    f'did you mean gs://{s[3:].lstrip("/")}?')


_GCSFS_CHOSEN = False


def _epath(p: str):
  global _GCSFS_CHOSEN  # pylint: disable=global-statement
  _check_scheme(p)
  from etils import epath  # pylint: disable=import-outside-toplevel
  if str(p).startswith('gs://') and not _GCSFS_CHOSEN:
    # gcsfs for gs:// (the functions below use its file system). epath caches its choice at
    # its first gs:// path, which another library (TFDS) may have made already: clear it.
    os.environ['EPATH_USE_TF'] = 'false'
    from etils.epath import gpath  # pylint: disable=import-outside-toplevel
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    _GCSFS_CHOSEN = True
  return epath.Path(p)


def _fs(p: str):
  """The fsspec file system epath uses for ``p`` (gcsfs for gs://)."""
  q = _epath(p)
  return q._backend.fs(str(q))  # pylint: disable=protected-access


def join(base: str, *parts: str) -> str:
  """``base/part/...`` for a local path or a URL (no normalisation of ``gs://``)."""
  base = str(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)  # local path arithmetic only


def absolute(p: str) -> str:
  """A local path made absolute; a URL unchanged."""
  return str(p) if is_remote(p) else os.path.abspath(p)  # local path arithmetic only


def basename(p: str) -> str:
  return posixpath.basename(str(p).rstrip('/'))


def dirname(p: str) -> str:
  s = str(p).rstrip('/')
  return posixpath.dirname(s) if is_remote(s) else os.path.dirname(absolute(s))  # local only


def realpath(p: str) -> str:
  """A local path with its symbolic links resolved; a URL unchanged (no links there)."""
  return str(p) if is_remote(p) else os.path.realpath(p)  # local only


def exists(p: str) -> bool:
  return _epath(p).exists()


def isdir(p: str) -> bool:
  return _epath(p).is_dir()


def isfile(p: str) -> bool:
  q = _epath(p)
  return q.exists() and not q.is_dir()


def listdir(p: str) -> list[str]:
  """Names (not paths) in folder ``p``, sorted; [] when it does not exist."""
  q = _epath(p)
  if not q.is_dir():
    return []
  return sorted(c.name for c in q.iterdir())


def walk(p: str, *, followlinks: bool = False):
  """Like the os module's walk: ``(dirpath, dirnames, filenames)``, local folder or URL."""
  if not is_remote(p):
    yield from os.walk(p, followlinks=followlinks)  # local
    return
  for dirpath, dirnames, filenames in _fs(p).walk(str(p)):
    yield 'gs://' + dirpath, sorted(dirnames), sorted(filenames)


def makedirs(p: str) -> None:
  """Create folder ``p`` and its parents (on ``gs://`` folders are implicit: nothing to do)."""
  if not is_remote(p):
    _epath(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: str) -> bytes:
  return _epath(p).read_bytes()


def read_text(p: str) -> str:
  return _epath(p).read_text()


def read_json(p: str) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: str, data: bytes) -> str:
  """Write ``data`` to ``p`` whole: local = temporary name + rename, gs:// = one upload."""
  p = str(p)
  if is_remote(p):
    with _epath(p).open('wb') as f:  # epath: one gs:// upload
      f.write(data)
    return p
  makedirs(dirname(p))
  tmp = f'{p}.tmp-{os.getpid()}'
  try:
    with _epath(tmp).open('wb') as f:  # epath, local temporary name
      f.write(data)
    os.replace(tmp, p)  # local and atomic (see the module docstring)
  except BaseException:  # any failure (disk full, Ctrl-C): remove the half file, then re-raise
    if os.path.exists(tmp):  # local temporary name: no half file left behind (disk full)
      os.remove(tmp)  # local temporary name
    raise
  return p


def write_text(p: str, text: str) -> str:
  return write_bytes(p, text.encode('utf-8'))


def write_json(p: str, obj: Any) -> str:
  return write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=float) + '\n')


def append_text(p: str, text: str) -> None:
  """Append ``text``; on ``gs://`` the object is re-uploaded whole (no append there)."""
  if is_remote(p):
    old = read_text(p) if exists(p) else ''
    write_text(p, old + text)
    return
  makedirs(dirname(p))
  with _epath(p).open('a') as f:  # epath, local append
    f.write(text)


def remove(p: str) -> None:
  q = _epath(p)
  if q.exists():
    q.unlink()


def move_dir(src: str, dst: str) -> None:
  """Rename folder ``src`` to ``dst`` (see the module docstring for ``gs://``)."""
  if not is_remote(src):
    os.rename(src, dst)  # local, atomic
    return
  fs = _fs(src)
  src, dst = str(src).rstrip('/'), str(dst).rstrip('/')
  names = fs.find(src)   # every object under src (no scheme)
  for name in names:     # server-side copies (no bytes through this host)
    fs.copy(name, dst[len('gs://'):] + name[len(src) - len('gs://'):])
  fs.rm(names)


# ---------------------------------------------------------------------------------------------
# Reachability: one line before any compilation, nothing created
# ---------------------------------------------------------------------------------------------
def _endpoint() -> str:
  return os.environ.get('STORAGE_EMULATOR_HOST') or _DEFAULT_GCS


def check_reachable(p: str, *, what: str, write: bool) -> None:
  """Raise :class:`PathError` unless ``p`` can be used (``write``: written).

  Local: the nearest existing parent must be a folder (writable when ``write``); nothing is
  created. ``gs://``: Cloud Storage answers (network), credentials exist, the bucket exists and
  (``write``) accepts and deletes a probe object; each failure is one line naming ``p``.
  Credentials are looked up first (local and fast: a missing key file or no ADC at all), then the
  endpoint is dialled (10 s at most), so no client library's retry loop runs on a dead route.
  """
  p = str(p)
  _check_scheme(p, what)
  if not is_remote(p):
    q = os.path.abspath(p)  # local path arithmetic
    while not os.path.exists(q):  # local
      q = os.path.dirname(q)  # local
    if not os.path.isdir(q) or (write and not os.access(q, os.W_OK)):  # local
      raise PathError(f'{what}={p} cannot be {"written" if write else "read"} ({q} is not a '
                      f'{"writable " if write else ""}directory); choose a directory you can '
                      f'{"write to" if write else "read"}.')
    return
  u = urlparse(p)
  bucket = u.netloc
  if not bucket:
    raise PathError(f'{what}={p}: no bucket name; expected gs://BUCKET/PATH.')
  if 'STORAGE_EMULATOR_HOST' not in os.environ:
    import google.auth  # pylint: disable=import-outside-toplevel
    try:
      google.auth.default()
    except Exception as e:  # noqa: BLE001 — DefaultCredentialsError and friends
      raise PathError(f'{what}={p}: no Google Cloud credentials on this machine; run '
                      '`gcloud auth application-default login`, or run on a VM whose service '
                      'account can use the bucket.') from e
  host = urlparse(_endpoint())
  port = host.port or (443 if host.scheme == 'https' else 80)
  try:
    socket.create_connection((host.hostname, port), timeout=10).close()
  except OSError as e:
    raise PathError(f'{what}={p}: Cloud Storage is not reachable ({host.hostname}:{port}: '
                    f'{e.strerror or e}); check the network, or use a local path.') from e
  fs = _fs(f'gs://{bucket}')
  try:
    fs.info(bucket)
  except FileNotFoundError as e:
    raise PathError(f'{what}={p}: bucket gs://{bucket} does not exist; create it (gcloud '
                    f'storage buckets create gs://{bucket} --location=REGION) or fix the '
                    'name.') from e
  except Exception:  # noqa: BLE001 — e.g. 403: object-only roles (storage.objectAdmin) may
    pass             # not read bucket metadata; the probe below (write) or the first read decides
  if write:
    probe = join(p, f'.ssl_jax_write_probe-{socket.gethostname()}-{os.getpid()}')
    try:
      write_bytes(probe, b'')
      remove(probe)
    except Exception as e:  # noqa: BLE001
      raise PathError(f'{what}={p} cannot be written ({type(e).__name__}: '
                      f'{str(e).splitlines()[0][:160] if str(e) else ""}); check that your '
                      'credentials may write to the bucket.') from e


# ---------------------------------------------------------------------------------------------
# Mirror: a local staging folder for writers that cannot write through this layer
# ---------------------------------------------------------------------------------------------
class Mirror:
  """Where a third-party writer should write for run folder ``target``, kept in sync with it.

  Local ``target``: :attr:`local` is ``target`` itself and :meth:`sync` does nothing.
  ``gs://`` ``target``: :attr:`local` is a fresh folder under the system temp dir;
  :meth:`sync` uploads every file that is new or changed (size, mtime) since the last sync,
  at most every ``min_interval_s`` seconds unless ``force``; :meth:`close` syncs and deletes the
  staging folder. A hard kill loses what was written since the last sync.
  """

  def __init__(self, target: str, *, min_interval_s: float = 30.0):
    self.target = str(target)
    self.remote = is_remote(self.target)
    self.min_interval_s = min_interval_s
    self._seen: dict[str, tuple[int, float]] = {}
    self._last = time.monotonic()   # the first periodic upload: min_interval_s from now
    if self.remote:
      self.local = tempfile.mkdtemp(prefix='ssl_jax_stage_')
      atexit.register(self._at_exit)
    else:
      self.local = self.target
      makedirs(self.local)

  def due(self) -> bool:
    """True when a remote mirror's last sync is ``min_interval_s`` old."""
    return self.remote and time.monotonic() - self._last >= self.min_interval_s

  def sync(self, *, force: bool = False) -> int:
    """Upload new/changed files; returns how many. A failed periodic upload is a warning and is
    retried at the next one; a failed ``force`` upload (the last one) is a :class:`PathError`."""
    if not self.remote or not (force or self.due()):
      return 0
    self._last = time.monotonic()
    try:
      return self._upload()
    except Exception as e:  # noqa: BLE001
      msg = (f'could not upload {self.local} to {self.target} ({type(e).__name__}: '
             f'{str(e).splitlines()[0][:160] if str(e) else ""})')
      if force:
        raise PathError(msg) from e
      print(f'WARNING: {msg}; retrying in {self.min_interval_s:.0f} s.', file=sys.stderr,
            flush=True)
      return 0

  def _upload(self) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(self.local):  # the local staging folder
      for f in filenames:
        src = os.path.join(dirpath, f)  # staging folder
        st = os.stat(src)  # staging folder
        key = os.path.relpath(src, self.local)  # staging folder
        if self._seen.get(key) == (st.st_size, st.st_mtime):
          continue
        with open(src, 'rb') as fh:  # staging folder (local by construction)
          write_bytes(join(self.target, *key.split(os.sep)), fh.read())
        self._seen[key] = (st.st_size, st.st_mtime)
        n += 1
    return n

  def close(self) -> None:
    if self.remote and os.path.isdir(self.local):  # staging folder
      self.sync(force=True)
      shutil.rmtree(self.local, ignore_errors=True)  # staging folder (local by construction)

  def _at_exit(self) -> None:
    """A run that ends without ``close()`` (an error) still uploads what it staged."""
    try:
      self.close()
    except Exception as e:  # noqa: BLE001 — at exit: say it, never a traceback
      print(f'WARNING: could not upload {self.local} to {self.target} at exit '
            f'({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}).',
            file=sys.stderr, flush=True)
      shutil.rmtree(self.local, ignore_errors=True)  # staging folder
