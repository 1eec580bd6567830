"""Input-pipeline throughput: BYOL two-view augmentation of CIFAR-10 train, ours vs torch.

Ours: ``ssl_jax.data.make_train_iterator`` (tf.data, batched stateless augmentation) with
``num_workers=2``. Torch: a ``torch.utils.data.DataLoader`` with ``num_workers=2`` over the same
decoded uint8 images and torchvision.transforms.v2 with the same recipe (per view:
RandomResizedCrop(32, (0.08, 1)), horizontal flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
RandomGrayscale(0.2); view 2 also RandomSolarize(128, p 0.2); no blur at 32 px as in our CIFAR
preset), uint8 tensors in and out. Both produce batches of two uint8 views + labels; we count
source images per second after a warm-up.

The torch side runs in a subprocess with a separate virtualenv (default
``<repo>/.torch_venv``: ``python -m venv .torch_venv && .torch_venv/bin/pip install
torch==2.13.0 && .torch_venv/bin/pip install --no-deps torchvision==0.28.0``). The only
torchvision wheel for torch 2.13 is a CUDA build whose C++ extension cannot load next to the CPU
torch; its transforms are pure Python, so the subprocess registers placeholder schemas for the
two custom ops (``torchvision::nms``/``qnms``) that torchvision's import registers fake kernels
for. No torchvision C++ op is used by these transforms.

Usage::

  python benchmarks/bench_input.py [--batch 256] [--warmup 10] [--batches 60] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TORCH_SCRIPT = r'''
import json, sys, time
import numpy as np
import torch
# torchvision 0.28 (CUDA wheel) with CPU torch: its C++ ops do not load; declare the two op
# schemas its import registers fake kernels for. Transforms v2 are pure PyTorch.
_lib = torch.library.Library('torchvision', 'DEF')
_lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
_lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
import warnings
warnings.filterwarnings('ignore')
import torchvision
from torchvision.transforms import v2

path, batch, warmup, batches, workers = sys.argv[1], *map(int, sys.argv[2:6])
blob = np.load(path)
images = torch.from_numpy(blob['images']).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
labels = torch.from_numpy(blob['labels'])

def view(solarize_p):
  ops = [v2.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True),
         v2.RandomHorizontalFlip(),
         v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)]
  if solarize_p:
    ops.append(v2.RandomSolarize(128, p=solarize_p))
  return v2.Compose(ops)

class TwoViews(torch.utils.data.Dataset):
  def __init__(self):
    self.t1, self.t2 = view(0.0), view(0.2)
  def __len__(self):
    return len(images)
  def __getitem__(self, i):
    x = images[i]
    return self.t1(x), self.t2(x), labels[i]

loader = torch.utils.data.DataLoader(TwoViews(), batch_size=batch, shuffle=True, drop_last=True,
                                     num_workers=workers, persistent_workers=True,
                                     prefetch_factor=4)
import os

def cpu_seconds(pids):
  # user + system CPU time of the main process and the workers, from /proc.
  total = 0.0
  for pid in pids:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  return total

it = iter(loader)
for _ in range(warmup):
  next(it)
pids = [os.getpid()] + [w.pid for w in it._workers]
c0 = cpu_seconds(pids)
t0 = time.perf_counter()
n = 0
for _ in range(batches):
  v1, v2_, y = next(it)  # 50000 // batch batches per epoch: no epoch end inside the window
  n += v1.shape[0]
dt = time.perf_counter() - t0
cpu = cpu_seconds(pids) - c0
print(json.dumps({'images_per_s': n / dt, 'cpu_ms_per_image': 1e3 * cpu / n,
                  'shape': list(v1.shape), 'dtype': str(v1.dtype),
                  'torch': torch.__version__, 'torchvision': torchvision.__version__}))
'''


def bench_ours(batch: int, warmup: int, batches: int, workers: int, data_dir: str | None):
  """Images/s of our train iterator (two BYOL views per image)."""
  from ssl_jax import data  # pylint: disable=import-outside-toplevel
  cfg = data.default_data_config('cifar10')
  cfg.views = 'byol'
  cfg.num_workers = workers
  if data_dir:
    cfg.data_dir = data_dir
  it = data.make_train_iterator(cfg, global_batch_size=batch, seed=0, process_index=0,
                                process_count=1)
  for _ in range(warmup):
    b = next(it)
  c0 = time.process_time()  # all threads of this process (tf.data runs here)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  cpu = time.process_time() - c0
  assert b['view1'].dtype == np.uint8 and b['view2'].shape == (batch, 32, 32, 3)
  return {'images_per_s': batch * batches / dt, 'cpu_ms_per_image': 1e3 * cpu / (batch * batches)}


def bench_torch(python: str, npz: str, batch: int, warmup: int, batches: int, workers: int):
  """Images/s of the torch DataLoader (subprocess with the torch virtualenv)."""
  with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
    f.write(TORCH_SCRIPT)
    script = f.name
  try:
    out = subprocess.run([python, script, npz, str(batch), str(warmup), str(batches),
                          str(workers)], check=True, capture_output=True, text=True)
  finally:
    os.unlink(script)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--data_dir', default=os.environ.get(
      'TFDS_DATA_DIR', os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tfds')))
  parser.add_argument('--torch_python', default=os.path.join(REPO, '.torch_venv', 'bin',
                                                             'python'))
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  from ssl_jax import data  # pylint: disable=import-outside-toplevel
  cfg = data.default_data_config('cifar10')
  cfg.data_dir = args.data_dir
  t0 = time.perf_counter()
  arrays = sources.build_source(cfg, 'train')  # decoded once, shared by both sides
  print(f'decoded {arrays.num_examples} CIFAR-10 train images in {time.perf_counter() - t0:.1f}s')
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, 'cifar10_train.npz')
    np.savez(npz, images=arrays.images, labels=arrays.labels)
    ours, theirs, info = [], [], {}
    for r in range(args.repeats):  # interleaved: the machine may be shared
      ours.append(bench_ours(args.batch, args.warmup, args.batches, args.workers, args.data_dir))
      print(f'[{r}] ours: {ours[-1]["images_per_s"]:.0f} images/s, '
            f'{ours[-1]["cpu_ms_per_image"]:.3f} CPU-ms/image (load {os.getloadavg()[0]:.1f})')
      if os.path.exists(args.torch_python):
        info = bench_torch(args.torch_python, npz, args.batch, args.warmup, args.batches,
                           args.workers)
        theirs.append(info)
        print(f'[{r}] torch DataLoader: {info["images_per_s"]:.0f} images/s, '
              f'{info["cpu_ms_per_image"]:.3f} CPU-ms/image (load {os.getloadavg()[0]:.1f})')

  def row(name, runs):
    ips = [x['images_per_s'] for x in runs]
    cpu = [x['cpu_ms_per_image'] for x in runs]
    return (f'| {name} | {args.workers} | {args.batch} | {max(ips):.0f} | '
            f'{", ".join(f"{x:.0f}" for x in ips)} | {min(cpu):.3f} |')
  print()
  print(f'| pipeline | workers | batch | images/s (best of {args.repeats}) | all runs | '
        'CPU-ms per image (best) |')
  print('|---|---|---|---|---|---|')
  print(row('ssl_jax tf.data (batched stateless aug)', ours))
  if theirs:
    print(row(f'torch {info["torch"]} DataLoader + torchvision {info["torchvision"]} v2',
              theirs))
    speed = max(x['images_per_s'] for x in ours) / max(x['images_per_s'] for x in theirs)
    cpu = (min(x['cpu_ms_per_image'] for x in theirs) /
           min(x['cpu_ms_per_image'] for x in ours))
    print(f'\nratio ours / torch: {speed:.2f}x images/s (best vs best); '
          f'{cpu:.2f}x less CPU per image')
  else:
    print(f'(torch side skipped: {args.torch_python} not found)')


if __name__ == '__main__':
  main()
