"""Input-pipeline throughput at ImageNet resolution: BYOL two-view 224 px views of real JPEGs.

Ours: ``ssl_jax.data.make_train_iterator`` on an image folder with the ``configs/byol.py:imagenet``
data config (views 'byol' at 224 px: RandomResizedCrop(0.08-1), flip, ColorJitter(0.4, 0.4,
0.2, 0.1) p 0.8 in random order, grayscale p 0.2, Gaussian blur (kernel 23, sigma 0.1-2) p 1.0 /
0.1, solarize p 0 / 0.2). Torch: a ``torch.utils.data.DataLoader`` over the same files, PIL
decode (``Image.open(...).convert('RGB')``) and torchvision.transforms.v2 with the same recipe on
the PIL image, ``PILToTensor`` at the end (uint8 out, as ours). Same number of workers, same
batch. Each side runs in its own process (this script with ``--side``), the repeats interleaved.

Reported per run: source images per second after a warm-up (each image -> two 224 px uint8
views + label), and CPU-ms per image = user + system CPU time of every process and thread
involved (ours: the one process, ``time.process_time``; torch: the main process and its workers,
from ``/proc``) divided by the images.

The images: the 1,000 ImageNet JPEGs (one random image per class) of
github.com/EliSchwartz/imagenet-sample-images, arranged as ``ROOT/train/<wnid>/<file>``::

  git clone --depth 1 https://github.com/EliSchwartz/imagenet-sample-images /tmp/inet
  ROOT=/work/imagenet_sample_folder
  for f in /tmp/inet/*.JPEG; do b=$(basename $f); c=${b%%_*}
    mkdir -p $ROOT/train/$c && ln -s $f $ROOT/train/$c/
  done
  python benchmarks/bench_input_imagenet.py --root $ROOT --repeats 3

``--sides before,ours,torch --before_repo DIR`` adds the ssl_jax of another checkout (e.g. the
commit before a change) as side 'before'.

``--stages`` instead prints our CPU-ms per image by stage (decode, crop, colour; one thread,
inside tf.data), for finding the hot spot.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _proc_cpu_seconds(pids) -> float:
  """user + system CPU seconds of ``pids`` (every thread), from /proc."""
  total = 0.0
  for pid in pids:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  return total


def _data_config(root: str, workers: int):
  from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
  code = os.path.dirname(os.path.dirname(os.path.abspath(config_lib.__file__)))
  cfg = config_lib.load_config_file(os.path.join(code, 'configs', 'byol.py'), 'imagenet').data
  cfg.source = 'folder'
  cfg.folder_root = root
  cfg.train_split = 'train'
  cfg.folder_validate = 'none'  # start-up only; the timed window never sees it
  cfg.num_workers = workers
  return cfg


def run_ours(args) -> dict:
  """Images/s and CPU-ms/image of our train iterator on the folder."""
  from ssl_jax import data  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  cfg = _data_config(args.root, args.workers)
  it = data.make_train_iterator(cfg, global_batch_size=args.batch, seed=0, process_index=0,
                                process_count=1)
  for _ in range(args.warmup):
    b = next(it)
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(args.batches):
    b = next(it)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  assert b['view1'].dtype == np.uint8 and b['view2'].shape == (args.batch, 224, 224, 3)
  n = args.batch * args.batches
  return {'images_per_s': n / dt, 'cpu_ms_per_image': 1e3 * cpu / n}


def _torch_view(v2, blur_p: float, solarize_p: float):
  ops = [v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True),
         v2.RandomHorizontalFlip(),
         v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)]
  if blur_p:
    ops.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p))
  if solarize_p:
    ops.append(v2.RandomSolarize(128, p=solarize_p))
  ops.append(v2.PILToTensor())
  return v2.Compose(ops)


def run_torch(args) -> dict:
  """Images/s and CPU-ms/image of a torch DataLoader + torchvision v2 on PIL images."""
  import warnings  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from ssl_jax import export  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings('ignore')
  tv = export.import_torchvision()
  from torchvision.transforms import v2  # pylint: disable=import-outside-toplevel
  # The folder's files as ours lists them, without importing TensorFlow into the torch side.
  split = os.path.join(args.root, 'train')
  classes = sorted(c for c in os.listdir(split) if not c.startswith('.'))
  paths, labels = [], []
  for label, c in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(split, c))):
      if f.lower().endswith(('.jpg', '.jpeg', '.png')) and not f.startswith('.'):
        paths.append(os.path.join(split, c, f))
        labels.append(label)
  t1, t2 = _torch_view(v2, 1.0, 0.0), _torch_view(v2, 0.1, 0.2)

  class TwoViews(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with Image.open(paths[i]) as im:
        img = im.convert('RGB')
      return t1(img), t2(img), labels[i]

  loader = torch.utils.data.DataLoader(
      TwoViews(), batch_size=args.batch, shuffle=True, drop_last=True,
      num_workers=args.workers, persistent_workers=True, prefetch_factor=4)

  def forever():
    while True:
      yield from loader
  it = forever()
  for _ in range(args.warmup):
    next(it)
  workers = loader._iterator._workers  # pylint: disable=protected-access
  pids = [os.getpid()] + [w.pid for w in workers]
  c0, t0 = _proc_cpu_seconds(pids), time.perf_counter()
  for _ in range(args.batches):
    v1, _, _ = next(it)
  dt, cpu = time.perf_counter() - t0, _proc_cpu_seconds(pids) - c0
  assert v1.dtype == torch.uint8 and tuple(v1.shape) == (args.batch, 3, 224, 224)
  n = args.batch * args.batches
  return {'images_per_s': n / dt, 'cpu_ms_per_image': 1e3 * cpu / n,
          'torch': torch.__version__, 'torchvision': tv.__version__}


def run_stages(args) -> dict:
  """CPU-ms per image of our stages on one thread, inside tf.data: decode, crop (both views),
  colour (both views, batched), each as the difference of cumulative pipelines over in-memory
  JPEG bytes."""
  from ssl_jax.data import augment, sources, views  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  cfg = _data_config(args.root, 1)
  specs = views.resolve_views(cfg)
  paths, _, _ = sources.list_image_folder(args.root, 'train')
  n = args.stage_images // args.batch * args.batch
  blobs = tf.data.Dataset.from_tensor_slices(paths[:n]).map(tf.io.read_file).cache()
  for _ in blobs:
    pass
  seed = tf.constant([1, 2], tf.int64)
  crop = views.traced_crop_views_example(specs)
  finish = views.traced_finish_views_batch(specs)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False

  def cpu_ms(ds):
    ds = ds.map(lambda *_: tf.constant(0, tf.int64)).with_options(options)
    total = lambda: ds.reduce(tf.constant(0, tf.int64), lambda a, b: a + b)  # noqa: E731
    total()  # warm-up (traces; XLA compiles)
    best = float('inf')
    for _ in range(3):
      c0 = time.process_time()
      total()
      best = min(best, time.process_time() - c0)
    return 1e3 * best / n

  def cropped(b):
    return crop(sources.decode_image(b), augment.fold_in(seed, tf.strings.length(b)))
  t_read = cpu_ms(blobs)
  t_decode = cpu_ms(blobs.map(sources.decode_image))
  t_crop = cpu_ms(blobs.map(cropped))
  t_all = cpu_ms(blobs.map(cropped).batch(args.batch, drop_remainder=True).map(
      lambda batch: finish(batch, seed)))
  return {'decode': t_decode - t_read, 'crop': t_crop - t_decode, 'colour': t_all - t_crop,
          'total': t_all - t_read, 'images': n}


def _side(args, side: str) -> dict:
  code = args.before_repo if side == 'before' else REPO
  cmd = [sys.executable, os.path.abspath(__file__), '--side',
         'torch' if side == 'torch' else 'ours', '--code', code, '--root', args.root,
         '--batch', str(args.batch), '--workers', str(args.workers), '--warmup',
         str(args.warmup), '--batches', str(args.batches)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=code)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='/work/imagenet_sample_folder')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--sides', default='ours,torch',
                      help="comma-separated of 'ours', 'torch', 'before' (needs --before_repo)")
  parser.add_argument('--before_repo', help="a checkout whose ssl_jax is run as side 'before'")
  parser.add_argument('--side', choices=['ours', 'torch'], help=argparse.SUPPRESS)
  parser.add_argument('--code', default=REPO, help=argparse.SUPPRESS)
  parser.add_argument('--stages', action='store_true')
  parser.add_argument('--stage_images', type=int, default=256)
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.code != REPO:  # measure another checkout's ssl_jax (the 'before' side)
    sys.path.insert(0, args.code)
  if args.side or args.stages:
    res = (run_stages(args) if args.stages else
           run_ours(args) if args.side == 'ours' else run_torch(args))
    print(json.dumps(res))
    return
  sides = args.sides.split(',')
  runs = {s: [] for s in sides}
  info = {}
  for r in range(args.repeats):  # interleaved: the machine is shared
    for s in sides:
      res = _side(args, s)
      runs[s].append(res)
      info.update({k: v for k, v in res.items() if k in ('torch', 'torchvision')})
      print(f'[{r}] {s}: {res["images_per_s"]:.1f} images/s, {res["cpu_ms_per_image"]:.2f} '
            f'CPU-ms/image (load {os.getloadavg()[0]:.1f})', flush=True)
  names = {'ours': 'ssl_jax tf.data', 'before': f'ssl_jax tf.data, before ({args.before_repo})',
           'torch': f'torch {info.get("torch")} DataLoader + torchvision '
                    f'{info.get("torchvision")} v2 on PIL'}
  med = {s: {k: statistics.median(x[k] for x in runs[s])
             for k in ('images_per_s', 'cpu_ms_per_image')} for s in sides}
  print(f'\n| pipeline | workers | batch | images/s (median of {args.repeats}) | all runs | '
        'CPU-ms per image (median) | all runs |')
  print('|---|---|---|---|---|---|---|')
  for s in sides:
    print(f'| {names[s]} | {args.workers} | {args.batch} | {med[s]["images_per_s"]:.1f} | '
          + ', '.join(f'{x["images_per_s"]:.1f}' for x in runs[s]) +
          f' | {med[s]["cpu_ms_per_image"]:.2f} | '
          + ', '.join(f'{x["cpu_ms_per_image"]:.2f}' for x in runs[s]) + ' |')
  if 'ours' in med and 'torch' in med:
    a, b = med['ours'], med['torch']
    print(f'\nours / torch: {a["images_per_s"] / b["images_per_s"]:.2f}x images/s, '
          f'{b["cpu_ms_per_image"] / a["cpu_ms_per_image"]:.2f}x less CPU per image (medians)')


if __name__ == '__main__':
  main()
