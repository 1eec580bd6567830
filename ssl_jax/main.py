r"""Entry point: parse flags, then train (or run another mode).

    python -m ssl_jax.main --config=configs/byol.py:cifar10 --workdir=/tmp/byol \
        [--config.batch_size=512 --config.optimizer.base_lr=0.3 ...]

Evaluations of a training run (WORKDIR = its ``--workdir``; EVAL_DIR gets results.json,
TensorBoard events and, for the trained ones, checkpoints):

    python -m ssl_jax.main --mode=linear --config=configs/eval_linear.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=finetune --config=configs/eval_finetune.py:cifar10,1% \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=eval --config=configs/eval.py \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR   # the training run's evaluators
    python -m ssl_jax.main --mode=knn --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=embed --config=configs/eval_knn.py:cifar10 \
        --config.pretrained=WORKDIR --workdir=EVAL_DIR
    python -m ssl_jax.main --mode=export --config=configs/eval_linear.py \
        --config.pretrained=WORKDIR --workdir=OUT      # OUT/backbone.pth, OUT/backbone.npz

Flags: ``--config`` (an ml_collections config file with ``get_config(arg)``, the argument after
``:``), ``--workdir`` (checkpoints, TensorBoard events, config.json), ``--mode`` (``train``,
``eval``, ``linear``, ``finetune``, ``knn``, ``embed``, ``export``; every mode but ``train``
runs ``<module>.run(config, workdir)`` of ``EVAL_MODES``), ``--allow_config_change`` (resume a
workdir written by a different config). Multi-host runs call ``jax.distributed.initialize()``
first (``--distributed``, or automatically when the launcher sets the cluster environment).

Importing this module changes nothing outside it but absl's flag registry (the ``DEFINE_*``
below: absl reads flags only from defined names, at ``app.run``). The screen set-up (TF's C++
log level, library log levels, the Orbax error filter) happens in :func:`cli` and :func:`main`.
"""
from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _verbose(argv=None) -> bool:
  """``--verbosity=N`` (N >= 0) on the command line (``argv``, default ``sys.argv``): library
  logs and tracebacks on. Default: a clean screen."""
  argv = sys.argv if argv is None else argv
  for i, a in enumerate(argv):
    for name in ('--verbosity', '-v'):
      if a == name and i + 1 < len(argv):
        a = f'{name}={argv[i + 1]}'
      if a.startswith(name + '='):
        try:
          return int(a.split('=', 1)[1]) >= 0
        except ValueError:
          return True
  return False


def _quiet_native_logs(argv) -> None:
  """Without ``--verbosity``: TensorFlow's and XLA's C++ INFO/WARNING banners (CPU features)
  off. Called by :func:`cli` before TensorFlow or a JAX backend loads (they read the variable
  once, at load). (TF's oneDNN banner: ``ssl_jax/__init__.py`` turns oneDNN off.)"""
  if not _verbose(argv):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


# absl's flags are defined at import, as absl requires (its parser knows only defined names).
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard.')
# --mode -> the module whose ``run(config, workdir)`` it calls (train: ssl_jax.train).
EVAL_MODES = {
    'linear': 'ssl_jax.evals.linear',
    'finetune': 'ssl_jax.evals.finetune',
    'eval': 'ssl_jax.evals.offline',
    'knn': 'ssl_jax.evals.knn_eval',
    'embed': 'ssl_jax.evals.embedding',
    'export': 'ssl_jax.export',
}
_MODE = flags.DEFINE_enum('mode', 'train', ['train', *EVAL_MODES], 'What to run.')
_ALLOW_CHANGE = flags.DEFINE_bool('allow_config_change', False,
                                  'Resume a workdir whose config.json differs from --config.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                                 'Call jax.distributed.initialize(): auto = when a cluster '
                                 'environment (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS) is seen.')

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host without a cluster manager: host:port of process 0 '
    '(env JAX_COORDINATOR_ADDRESS); needs --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run (env JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (env JAX_PROCESS_ID).')

_CLUSTER_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                'MEGASCALE_COORDINATOR_ADDRESS')


def _explicit_cluster() -> dict | None:
  """``--coordinator_address/--num_processes/--process_id`` (or their env variables), all three
  or none; None when no coordinator is named. Slurm and TPU pods need none of them (JAX reads
  their environment)."""
  def pick(flag, env, cast):
    if flag.value is not None:
      return flag.value
    v = os.environ.get(env)
    return cast(v) if v not in (None, '') else None
  coord = pick(_COORDINATOR, 'JAX_COORDINATOR_ADDRESS', str)
  num = pick(_NUM_PROCESSES, 'JAX_NUM_PROCESSES', int)
  pid = pick(_PROCESS_ID, 'JAX_PROCESS_ID', int)
  if coord is None and num is None and pid is None:
    return None
  managed = any(os.environ.get(k) for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES'))
  if coord is not None and managed and num is None and pid is None:
    return None  # Slurm / TPU: JAX derives the process count and id itself
  missing = [name for name, v in (('--coordinator_address (JAX_COORDINATOR_ADDRESS)', coord),
                                  ('--num_processes (JAX_NUM_PROCESSES)', num),
                                  ('--process_id (JAX_PROCESS_ID)', pid)) if v is None]
  if missing:
    raise _UserError(f'a multi-host run without Slurm or a TPU pod needs all three of '
                     f'--coordinator_address, --num_processes, --process_id; missing: '
                     f'{", ".join(missing)}.')
  if not (num >= 1 and 0 <= pid < num):
    raise _UserError(f'--process_id={pid} must be in 0..{num - 1} (--num_processes={num}).')
  return {'coordinator_address': coord, 'num_processes': num, 'process_id': pid}


def _maybe_initialize_distributed() -> None:
  import jax
  mode = _DISTRIBUTED.value
  explicit = _explicit_cluster() if mode != 'no' else None
  if explicit is not None:
    # CPU hosts need a collectives library for cross-process all-reduces (GPU/TPU ignore it).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**explicit)
    logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
    return
  if mode == 'yes' or (mode == 'auto' and any(os.environ.get(k) for k in _CLUSTER_ENV)
                       and int(os.environ.get('SLURM_NTASKS', '2')) > 1):
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())


class _UserError(Exception):
  """A mistake in the command (config, data, workdir): printed as one line, exit code 2."""


def _fail(msg: str, exc: BaseException | None = None) -> None:
  """Print ``Config error: msg`` (one line) and exit 2; with --verbosity, raise the traceback."""
  if _verbose() and exc is not None:
    raise exc
  print(f'Config error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _explain_flag_error(exc: BaseException, argv) -> str:
  """One line for an error raised while reading ``--config`` and its overrides."""
  import glob
  import re
  from ssl_jax import config_lib
  for e in _chain(exc):
    if isinstance(e, config_lib.ConfigError):
      return str(e)
    # config_flags folds get_config's traceback into its message: take the last error line.
    m = re.search(r'ConfigError: (.+)', str(e))
    if m:
      return m.group(1).strip()
  for e in _chain(exc):
    text = str(e.args[0]) if isinstance(e, AttributeError) and e.args else ''
    m = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if m:
      good, bad = m.groups()
      flag = next((a.split('=', 1)[0] for a in argv
                   if a.startswith('--config.') and a.split('=', 1)[0].endswith('.' + bad)), bad)
      return (f'{flag}: no such config key; did you mean '
              f'{flag[:len(flag) - len(bad)]}{good}?')
    if isinstance(e, (AttributeError, KeyError)) and e.args:
      named = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
      keys = set(_config_keys(argv))   # the one the config lacks, not merely the first named
      flag = next((f for f in named if keys and f[len('--config.'):] not in keys),
                  named[0] if named else '--config.*')
      hint = _suggest_key(flag, argv) or f' ({str(e.args[0]).strip()!s})'
      return f'{flag}: no such config key{hint}'
  for e in _chain(exc):   # an override of the wrong type, e.g. --config.replicas=1.5
    m = re.search(r"invalid literal for (int|float)\(\) with base 10: '(.*)'|"
                  r"could not convert string to (float): '(.*)'", str(e))
    if m:
      kind, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
      flag = next((a for a in argv if a.startswith('--config.') and a.split('=', 1)[-1] == value),
                  None)
      if flag:
        return f'{flag}: not {"an integer" if kind == "int" else "a number"}; accepted: ' + (
            'an integer, e.g. ' + flag.split('=', 1)[0] + '=3' if kind == 'int' else 'a number')
  arg = _config_arg(argv) or ''
  path = arg.split(':', 1)[0]
  if '://' in arg:
    path = arg.rsplit(':', 1)[0] if arg.count(':') > 1 else arg
    return (f'--config={path}: config files are Python code read on this machine; copy it here '
            f'first (gcloud storage cp {path} .).')
  # The config file is Python code on this machine (not a run path): local calls below.
  if path and not os.path.exists(path):  # local config file
    where = os.path.dirname(path) or '.'  # local config folder
    if not os.path.isdir(where):  # local config folder
      where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')  # package's configs/
    have = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(where, '*.py'))  # local configs
                  if not os.path.basename(p).startswith('_'))  # local config names
    return (f'config file {path!r} does not exist; available: {", ".join(have) or "none"} '
            '(e.g. --config=configs/byol.py:cifar10,runlocal)')
  last = list(_chain(exc))[-1]
  return f'--config={arg}: {type(last).__name__}: {str(last).splitlines()[0] if str(last) else ""}'


# Names users type for our config keys (the difflib match alone would not find them).
_SYNONYMS = {'learning_rate': 'base_lr', 'lr': 'base_lr', 'wd': 'weight_decay', 'epochs':
             'total_epochs', 'steps': 'total_steps', 'bs': 'batch_size', 'num_steps':
             'total_steps', 'num_epochs': 'total_epochs', 'warmup': 'warmup_epochs'}


def _config_keys(argv) -> list[str]:
  """Every dotted key of the --config file named in ``argv`` ([] if it does not load)."""
  arg = _config_arg(argv) or ''
  path, _, cfg_arg = arg.partition(':')
  try:
    from ssl_jax import checkpoint, config_lib
    c = config_lib.load_config_file(path, cfg_arg or None)
    return sorted(checkpoint._flatten(checkpoint.config_to_dict(c)))  # pylint: disable=protected-access
  except Exception:  # noqa: BLE001 — no suggestion then
    return []


def _closest(name: str, keys: list[str]) -> str | None:
  import difflib
  last = name.rsplit('.', 1)[-1]
  want = _SYNONYMS.get(last)
  if want:
    prefix = name[:len(name) - len(last)]
    for k in keys:
      if k == prefix + want or (k.endswith('.' + want) or k == want) and k.startswith(prefix):
        return k
  if name in keys:
    return name
  tails = [k for k in keys if k.rsplit('.', 1)[-1] == last]
  if len(tails) == 1:
    return tails[0]
  close = difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
  return close[0] if close else None


def _suggest_key(flag: str, argv) -> str:
  """'; did you mean --config.X?' for a --config.<key> that does not exist."""
  key = _closest(flag[len('--config.'):], _config_keys(argv)) if flag.startswith('--config.') \
      else None
  return f'; did you mean --config.{key}?' if key else ''


def _suggest_flag(e: BaseException, argv) -> str:
  """'; did you mean ...?' for an unknown command-line flag (a program flag or a config key)."""
  import difflib
  import re
  m = re.search(r"Unknown command line flag '([^']+)'", str(e))
  if not m:
    return ''
  name = m.group(1)
  key = _closest(name, _config_keys(argv))
  if not key and 'Did you mean' in str(e):
    return ''   # absl named the program flag already
  if key:
    return f'; did you mean --config.{key}?'
  close = difflib.get_close_matches(name, [n for n in flags.FLAGS if len(n) > 2], n=1, cutoff=0.7)
  return f'; did you mean --{close[0]}?' if close else ''


def _parse_flags(argv):
  """absl's flag parsing, with config-file and override errors as one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if any(a.startswith('--config') for a in argv[1:]) and 'config' in str(e):
      _fail(_explain_flag_error(e, argv), e)
    if _verbose(argv):
      raise
    hint = _suggest_flag(e, argv)
    print(f'Flag error: {e}{hint}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.<key> override
    _fail(_explain_flag_error(e, argv), e)


def _check_run_paths(config, workdir: str, mode: str) -> None:
  """Every run path the command names can be used: one line (exit 2) before any compilation,
  nothing created (``paths.check_reachable``: network, credentials, bucket, permissions)."""
  from ssl_jax import paths
  paths.check_reachable(workdir, what='--workdir', write=True)
  if mode != 'train' and isinstance(config.get('pretrained'), str) and config.pretrained:
    paths.check_reachable(config.pretrained, what='--config.pretrained', write=False)
  named = [(f'--config.{key}', config.get(key)) for key in ('data_dir', 'folder_root')]  # evals
  if config.get('data') is not None:
    named += [(f'--config.data.{key}', config.data.get(key)) for key in ('data_dir', 'folder_root')]
  named.append(('TFDS_DATA_DIR', os.environ.get('TFDS_DATA_DIR')))
  for what, v in named:
    if isinstance(v, str) and paths.is_remote(v):
      paths.check_reachable(v, what=what, write=False)


class _LibraryErrors(logging_std.Filter):
  """Orbax reports a failed background save on each of its threads, each with a traceback (a
  disk-full save: five of them, 345 lines). On a clean screen the first one is kept as one line;
  all of them, tracebacks included, go to WORKDIR/error.log if the run fails (``_stop_error``)."""

  def __init__(self):
    super().__init__()
    self.records: list[str] = []

  def filter(self, record) -> bool:
    # Orbax's own error records, and asyncio's 'Task exception was never retrieved' for the
    # writes of Orbax's background threads that failed alongside.
    ours = '/orbax/' in record.pathname.replace('\\', '/') or record.name == 'asyncio'
    if record.levelno < logging_std.ERROR or not ours:
      return True
    text = record.getMessage()
    if record.exc_info:
      import traceback
      text += '\n' + ''.join(traceback.format_exception(*record.exc_info))
    self.records.append(text)
    if len(self.records) > 1:
      return False
    record.msg, record.args = text.splitlines()[0][:240] + ' [Orbax]', None
    record.exc_info = record.exc_text = None
    return True


_LIBRARY_ERRORS = _LibraryErrors()


def main(argv):
  if len(argv) > 1:
    print(f'Flag error: unexpected arguments {argv[1:]}; flags are written --name=value (e.g. '
          '--config.batch_size=256).', file=sys.stderr)
    sys.exit(2)
  if not _verbose():  # library INFO logs (Orbax, TFDS, absl) off; --verbosity=0|1 turns them on
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_LIBRARY_ERRORS)   # every record that reaches the screen
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # config_flags defers a load error to the first access
  except Exception as e:  # pylint: disable=broad-except
    _fail(_explain_flag_error(e, sys.argv), e)
  if config is None or _WORKDIR.value is None:
    missing = ' and '.join(f for f, v in (('--config', config), ('--workdir', _WORKDIR.value))
                           if v is None)
    print(f'Flag error: {missing} {"is" if " and " not in missing else "are"} required, e.g. '
          '--config=configs/byol.py:cifar10,runlocal --workdir=/tmp/byol', file=sys.stderr)
    sys.exit(2)
  from ssl_jax import paths
  try:  # before any compilation, before anything is created
    _check_run_paths(config, _WORKDIR.value, _MODE.value)
  except paths.PathError as e:
    _fail(str(e), e)
  try:  # before any module can start a JAX backend
    _maybe_initialize_distributed()
  except _UserError as e:
    _fail(str(e), e)
  from ssl_jax import checkpoint, config_lib
  from ssl_jax.data import sources
  errors = (_UserError, config_lib.ConfigError, checkpoint.WorkdirError, sources.DatasetNotFound, sources.DataConfigError,
            checkpoint.ConfigMismatchError, checkpoint.PretrainedNotFound, paths.PathError)
  from ssl_jax import utils
  try:
    if _MODE.value == 'train':
      _train(config, _WORKDIR.value, errors)
      return
    run_eval(_MODE.value, config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
  except errors as e:
    _fail(str(e), e)
  except utils.NonFiniteError as e:
    _stop_error('Stopped', str(e), e, _WORKDIR.value)
  except KeyboardInterrupt as e:
    _stop_error('Interrupted', 'Ctrl-C: exiting at once, nothing saved since the last '
                'checkpoint; rerun the same command to resume', e, _WORKDIR.value, code=130,
                keep_traceback=False)
  except Exception as e:  # noqa: BLE001 — a few lines here, the traceback in WORKDIR/error.log
    _stop_error('Error', _explain_runtime_error(e), e, _WORKDIR.value)


def _explain_runtime_error(e: BaseException) -> str:
  """The cause of an unexpected failure in one line, with the fix where one is known."""
  import errno
  import re
  for c in _chain(e):
    full = isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(c)
    if full or 'No space left on device' in text or "os_error_code='28'" in text:
      m = re.search(r'(?:local file|Failed writing:) "([^"]+)"', text)
      where = c.filename if full and c.filename else (m.group(1) if m else '')
      return (f'No space left on device{" writing " + where if where else ""}: the disk is '
              'full. Free space or choose another --workdir, then rerun the same command (it '
              'resumes from the last complete checkpoint).')
  first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
  return f'{type(e).__name__}: {first}'


def _stop_error(kind: str, msg: str, exc: BaseException, workdir: str, code: int = 1,
                keep_traceback: bool = True) -> None:
  """At most a few lines on stderr; the full traceback goes to WORKDIR/error.log (process 0),
  or to the screen with --verbosity."""
  import traceback
  if _verbose():
    raise exc
  where = ''
  try:
    import jax
    from ssl_jax import paths
    if keep_traceback and jax.process_index() == 0 and paths.exists(workdir):
      log = paths.join(workdir, 'error.log')
      paths.write_text(log, ''.join(traceback.format_exception(exc)) + ''.join(
          f'\n--- logged by Orbax ---\n{r}' for r in _LIBRARY_ERRORS.records))
      where = f'\n(full traceback: {log}; or rerun with --verbosity=0 to print it)'
  except Exception:  # noqa: BLE001 — the error itself is what matters
    pass
  print(f'{kind}: {msg}{where}', file=sys.stderr, flush=True)
  sys.exit(code)


def _train(config, workdir: str, errors: tuple) -> None:
  """``--mode=train``, recording how it ended in ``WORKDIR/outcome.json`` (``train.write_outcome``:
  done / stopped / failed, the exit code and the final line; launch/tpu_pod.sh reads it)."""
  from ssl_jax import train
  try:   # the config is validated once, by the trainer (train.validate_config)
    results = train.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
  except errors as e:
    train.write_outcome(workdir, 'failed', 2, f'Config error: {e}')
    raise
  except BaseException as e:  # noqa: BLE001 — recorded, then re-raised unchanged
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else (
        130 if isinstance(e, KeyboardInterrupt) else 1)
    first = str(e).splitlines()[0] if str(e) else ''
    train.write_outcome(workdir, 'failed', code, f'{type(e).__name__}: {first}'[:500])
    raise
  stopped = 'preempted_at' in results
  if results.get('frozen_replicas') and not stopped:   # the run did not give all it promised
    line = train.frozen_summary(results)
    train.write_outcome(workdir, 'failed', 1, line, step=results.get('final_step'))
    print(f'Stopped: {line}', file=sys.stderr, flush=True)
    sys.exit(1)
  train.write_outcome(workdir, 'stopped' if stopped else 'done', 0, results.get('final_line', ''),
                      step=results.get('preempted_at', results.get('final_step')))


def run_eval(mode: str, config, workdir: str, *, allow_config_change: bool = False):
  """``--mode=<mode>`` for the evaluation modes (errors reach ``main``'s one-line path). On a
  replicas run ``--config.replica`` picks one replica, and -1 evaluates each
  (``ssl_jax.evals.replicas``)."""
  import importlib
  from ssl_jax import config_lib
  from ssl_jax.evals import replicas
  if mode not in EVAL_MODES:
    raise app.UsageError(f'--mode={mode!r} is invalid; accepted: train, {", ".join(EVAL_MODES)}')
  if 'pretrained' not in config:
    raise config_lib.ConfigError(
        f'--mode={mode} needs an evaluation config with a `pretrained` field '
        '(configs/eval.py, eval_linear.py, eval_finetune.py or eval_knn.py), not a training '
        'config.')
  module = importlib.import_module(EVAL_MODES[mode])
  kwargs = {'allow_config_change': allow_config_change} if mode in ('linear', 'finetune') else {}
  return replicas.run(mode, module.run, config, workdir, **kwargs)


def cli():
  """The ``ssl-jax`` console script (``pip install -e .``): the same as ``python -m ssl_jax.main``."""
  _quiet_native_logs(sys.argv)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  cli()
