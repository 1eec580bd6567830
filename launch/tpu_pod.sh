#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker runs the same command, detached; JAX finds its peers.
#
#   launch/tpu_pod.sh TPU_NAME ZONE ACCELERATOR_TYPE CONFIG[:ARG] gs://BUCKET/WORKDIR \
#       [--spot] [--watch] [trainer flags]
#   e.g. launch/tpu_pod.sh ssl-v4-32 us-central2-b v4-32 configs/byol.py:imagenet \
#            gs://my-bucket/byol_in1k --spot --watch --config.batch_size=4096
#
# The workdir must be a gs:// path every host can reach: process 0 writes metrics and the
# config, Orbax writes each checkpoint collectively, and every host restores it. A rerun with the
# same workdir resumes from the newest complete checkpoint (same batches, same RNG).
#
# Steps:
#  1. The slice. On demand: create TPU_NAME if absent. Spot (--spot or PREEMPTIBLE=1): a queued
#     resource TPU_NAME with node TPU_NAME; one that is FAILED/SUSPENDED (preempted), or ACTIVE
#     with its node gone, is deleted and requested again. Wait until it is ACTIVE and its node
#     READY. A create that gcloud refuses, or a request that ends FAILED, is an error (exit 1).
#  2. If the workers already run this workdir (an earlier launch), attach to its log and start
#     nothing; a different workdir running there is an error (exit 2).
#  3. Copy this checkout to ~/ssl_jax on every worker and install it into ~/ssl_jax/.venv. The
#     venv's Python (one line on each worker says which and why): an existing .venv whose python
#     is >= 3.11 (with pip) is kept and reused; else TPU_PYTHON if set (an error if it is missing
#     or < 3.11); else python3 if >= 3.11; else (the default image tpu-ubuntu2204-base has 3.10)
#     a uv-managed CPython 3.11: `python3 -m pip install --user -q uv` (no pip there: an error
#     naming `sudo apt-get install -y python3-pip`), `~/.local/bin/uv python install 3.11`,
#     `uv venv --seed --python 3.11 .venv` (seeded with pip). Then, with the venv's pip,
#     requirements.txt, then jax[tpu] pinned to the jax version that step installed
#     (pip install "jax[tpu]==$V" -f .../libtpu_releases.html, per JAX's install docs), so jax,
#     flax and orbax stay the versions requirements.txt selects and the tests ran with.
#  4. Start the trainer detached on every worker (setsid nohup; a lock file allows one run per
#     worker): a dropped ssh connection does not stop it. Log on each worker:
#     ~/ssl_jax_run/train.log (a restart within the same launch appends to it; an earlier
#     launch's: ~/ssl_jax_run/train.<UTC time>.<pid>.log). Each launch has an id LAUNCH_ID
#     (UTC time + 4 hex digits, chosen here once; a launch that attaches to a running run takes
#     that run's), given to the trainer as SSL_JAX_LAUNCH_ID. The detached wrapper copies the log
#     to WORKDIR/logs/LAUNCH_ID/<worker hostname>.log (gcloud storage cp) every TPU_LOG_SYNC_S
#     seconds, at once on SIGTERM, and when the trainer has exited, so the logs of a preempted
#     slice survive it (up to the last copy). A copy that fails is one warning line in the log.
#  5. Stream worker 0's log (tail -F over ssh) until the run ends there. Exit 0: the run is done,
#     or only the stream was lost (the run goes on; rerun this command to re-attach). Exit 1:
#     the run failed, stopped early (e.g. a preemption notice: rerun to resume), or its outcome
#     could not be read.
#  --watch: stream the log in the background and poll the slice every TPU_POLL_S seconds; on
#     preemption (node PREEMPTED or gone, queued resource SUSPENDING/SUSPENDED) delete and
#     recreate the slice, reinstall and restart the run (it resumes); a run that stopped on a
#     healthy slice is restarted there (at most 3 times in a row). Exit 0 once the run is done;
#     exit 1 when it fails on a healthy slice (after TPU_GRACE_S, in case a preemption is about
#     to show) or the slice cannot be created.
#
# "Done": once every worker's run has ended, WORKDIR/outcome.json (gcloud storage cat, parsed
# with python3 here) has "launch_id" equal to this launch's id and "status": "done". The trainer
# (process 0) writes it when a --mode=train run ends, one JSON object:
#   {"status": "done"|"stopped"|"failed", "exit_code": N, "final_line": "...", "step": N|null,
#    "launch_id": "<SSL_JAX_LAUNCH_ID>"|null, "time": "<UTC ISO time>"}
# done: trained to the end, final checkpoint and final evals written (exit 0); stopped: stopped
# early after checkpointing (SIGTERM / preemption notice, Ctrl-C; exit 0: rerun to resume);
# failed: an error (exit != 0). If the trainer dies without writing one for this start (killed
# -9, OOM, segfault, python missing), worker 0's wrapper writes {"status": "failed", the exit
# code, the log's last line as final_line, the launch id, "written_by": "launcher"}. Worker 0 =
# JAX process 0: $TPU_WORKER_ID where set, else the TPU VM metadata attribute agent-worker-number
# (as jax.distributed reads it). An outcome.json of another launch is ignored ("could not
# tell": exit 1). Exit code 0 alone says nothing: a preemption notice also exits 0. The wrapper
# also records, on each worker, ~/ssl_jax_run/exit_code and ~/ssl_jax_run/outcome (exited: 0 |
# failed), which only say whether the run there has ended.
# Stop a run: gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#     --command 'kill -TERM -- -$(cat ~/ssl_jax_run/pid)'    (checkpoints, then exits)
#
# Every gcloud call this script makes:
#   gcloud compute tpus queued-resources create TPU_NAME --zone ZONE --node-id TPU_NAME \
#       --accelerator-type TYPE --runtime-version VERSION --spot             (spot)
#   gcloud compute tpus queued-resources describe TPU_NAME --zone ZONE --format=value(state.state)
#   gcloud compute tpus queued-resources describe TPU_NAME --zone ZONE     (when it FAILED)
#   gcloud compute tpus queued-resources delete TPU_NAME --zone ZONE --force --quiet
#   gcloud compute tpus tpu-vm create TPU_NAME --zone ZONE --accelerator-type TYPE \
#       --version VERSION                                                  (on demand)
#   gcloud compute tpus tpu-vm describe TPU_NAME --zone ZONE --format=value(state)
#   gcloud compute tpus tpu-vm delete TPU_NAME --zone ZONE --quiet          (on demand, lost node)
#   gcloud compute tpus tpu-vm scp ARCHIVE TPU_NAME:ssl_jax.tgz --zone ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command ...
#       (run status, unpack + install, detached start)
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=0 --command ...   (log stream)
#   gcloud storage cat WORKDIR/outcome.json                                 (how the run ended)
# and on the workers (the TPU VM images have the gcloud CLI):
#   gcloud storage cp ~/ssl_jax_run/train.log WORKDIR/logs/LAUNCH_ID/HOSTNAME.log
#   gcloud storage cat WORKDIR/outcome.json; gcloud storage cp TMP WORKDIR/outcome.json (worker 0)
#
# Env: TPU_SOFTWARE_VERSION (default tpu-ubuntu2204-base), TFDS_DATA_DIR (gs:// data dir),
# PREEMPTIBLE=1 (= --spot), TPU_PYTHON (the workers' Python for the venv; jax>=0.10 needs
# >= 3.11: one that is older is an error. Unset: python3 if >= 3.11, else a uv-managed 3.11, see
# step 3), TPU_SETUP (a command run on every worker before installing, e.g.
# 'sudo apt-get update -qq && sudo apt-get install -y python3-pip'), TPU_POLL_S (60),
# TPU_GRACE_S (120), TPU_LOG_SYNC_S (60: seconds between the workers' log copies).
# This machine needs python3 (to read outcome.json). The trainer gets SSL_JAX_LAUNCH_ID.
set -euo pipefail
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# ----------------------------------------------------------------------------------------------
# Worker side: `bash ~/ssl_jax/launch/tpu_pod.sh _<step> ...`, run over ssh from the copied
# checkout. Run state lives in ~/ssl_jax_run: lock, pid, workdir, launch_id, train.log,
# exit_code, outcome.
# ----------------------------------------------------------------------------------------------
w_die() { echo "tpu_pod[$(hostname)]: error: $*" >&2; exit 1; }
w_py311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
w_venv_ok() { [ -x .venv/bin/python ] && [ -x .venv/bin/pip ] && w_py311 .venv/bin/python; }

w_install() {  # TPU_PYTHON (empty: not set) TPU_SETUP
  local want=${1:-} setup=${2:-} host v after uv="$HOME/.local/bin/uv"
  host=$(hostname)
  cd "$HOME/ssl_jax"
  if [ -n "$setup" ]; then
    echo "tpu_pod[$host]: TPU_SETUP: $setup"
    bash -c "$setup" || w_die "TPU_SETUP failed: $setup"
  fi
  if [ -n "$want" ]; then  # an explicit TPU_PYTHON must do
    command -v "$want" >/dev/null || w_die "$want (TPU_PYTHON) is not installed on this worker"
    w_py311 "$want" ||
      w_die "TPU_PYTHON=$want is $("$want" --version 2>&1), too old: jax>=0.10 (requirements.txt)" \
            "needs Python >= 3.11. Unset TPU_PYTHON (a uv-managed Python 3.11 is then installed)," \
            "or set TPU_PYTHON=python3.11 TPU_SETUP='sudo apt-get update -qq &&" \
            "sudo apt-get install -y -qq python3.11-venv'."
  fi
  if [ -e .venv ] && ! w_venv_ok; then
    echo "tpu_pod[$host]: removing ~/ssl_jax/.venv ($(.venv/bin/python --version 2>&1 ||
          echo 'no python')): not a Python >= 3.11 venv with pip"
    rm -rf .venv
  fi
  # The venv's interpreter, one line saying which and why.
  if [ -d .venv ]; then
    echo "tpu_pod[$host]: Python: reusing ~/ssl_jax/.venv ($(.venv/bin/python --version 2>&1))"
  elif [ -n "$want" ]; then
    echo "tpu_pod[$host]: Python: $want ($("$want" --version 2>&1)), from TPU_PYTHON"
    "$want" -m venv .venv
  elif command -v python3 >/dev/null && w_py311 python3; then
    echo "tpu_pod[$host]: Python: python3 ($(python3 --version 2>&1), >= 3.11)"
    python3 -m venv .venv
  else
    command -v python3 >/dev/null ||
      w_die "python3 is not installed on this worker; set TPU_PYTHON to a Python >= 3.11"
    echo "tpu_pod[$host]: Python: a uv-managed Python 3.11 (python3 is" \
         "$(python3 --version 2>&1), < 3.11, and TPU_PYTHON is not set)"
    python3 -m pip --version >/dev/null 2>&1 ||
      w_die "python3 ($(python3 --version 2>&1)) has no pip, needed to install uv: set" \
            "TPU_SETUP='sudo apt-get update -qq && sudo apt-get install -y python3-pip'" \
            "(or TPU_PYTHON to a Python >= 3.11)"
    python3 -m pip install --user -q uv || w_die "pip install --user uv failed (messages above)"
    "$uv" python install 3.11 || w_die "uv python install 3.11 failed (messages above)"
    # --seed: pip in the venv, so both kinds of venv are installed into (and reused) alike.
    "$uv" venv --seed --python 3.11 .venv || w_die "uv venv --python 3.11 failed (messages above)"
  fi
  set +u; . .venv/bin/activate; set -u
  pip install -q -U pip
  pip install -q -r requirements.txt
  v=$(python -c 'import jax; print(jax.__version__)')
  # The TPU plugin of exactly this jax: `-U 'jax[tpu]'` would move jax (and break flax/orbax).
  pip install -q "jax[tpu]==$v" -f "$LIBTPU_FIND_LINKS"
  after=$(python -c 'import jax; print(jax.__version__)')
  [ "$after" = "$v" ] || w_die "installing jax[tpu]==$v changed jax to $after"
  echo "tpu_pod[$host]: installed jax $v with jax[tpu]==$v"
}

w_start() {  # WORKDIR LAUNCH_ID LOG_SYNC_S CONFIG TFDS_DATA_DIR [trainer flags]
  local d="$HOME/ssl_jax_run" other
  mkdir -p "$d"
  if ! flock -n "$d/lock" true; then
    other=$(cat "$d/workdir" 2>/dev/null || echo '?')
    [ "$other" = "$1" ] || w_die "another run ($other) is running here"
    echo "tpu_pod[$(hostname)]: $1 is already running here; not starting a second copy"
    return 0
  fi
  # A restart within the same launch appends (its log copy in the bucket then holds every start);
  # an earlier launch's log is moved aside.
  if [ -f "$d/train.log" ] && [ "$(cat "$d/launch_id" 2>/dev/null)" != "$2" ]; then
    mv "$d/train.log" "$d/train.$(date -u +%Y%m%dT%H%M%SZ).$$.log"
  fi
  rm -f "$d/pid" "$d/exit_code" "$d/outcome"
  printf '%s\n' "$1" > "$d/workdir"
  printf '%s\n' "$2" > "$d/launch_id"
  # A new session (setsid): no controlling terminal, so nothing of the ssh session reaches it.
  setsid nohup bash "$HOME/ssl_jax/launch/tpu_pod.sh" _run "$@" </dev/null >>"$d/train.log" 2>&1 &
  for _ in $(seq 100); do
    if [ -s "$d/pid" ] || [ -f "$d/exit_code" ]; then break; fi
    sleep 0.1
  done
  [ -s "$d/pid" ] || w_die "the run did not start; $d/train.log ends: $(tail -n 5 "$d/train.log")"
  echo "tpu_pod[$(hostname)]: started (process group $(cat "$d/pid")); log: $d/train.log"
}

# This worker's number, 0 for JAX process 0: $TPU_WORKER_ID where set, else the TPU VM metadata
# attribute agent-worker-number (what jax.distributed reads on a TPU VM; gcloud's --worker=N
# counts the same way). Empty if neither answers.
w_worker_id() {
  local id=${TPU_WORKER_ID:-}
  [ -n "$id" ] || id=$(curl -sf -m 10 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/agent-worker-number" \
    2>/dev/null || true)
  case "$id" in ''|*[!0-9]*) echo '';; *) echo "$id";; esac
}

w_copy_log() {  # LOG DEST: one try; a failure is one warning line (in the log) and nothing else
  local err
  if ! err=$(gcloud storage cp "$1" "$2" 2>&1 >/dev/null); then
    echo "tpu_pod[$(hostname)]: warning: could not copy the log to $2: $(tail -n 1 <<<"$err")"
  fi
}

# The wrapper's log copier: LOG to DEST every SYNC_S seconds, and at once on SIGTERM (a
# preemption notice: the VM may be gone before the trainer has exited; the run's process group
# gets it, this included; it kills a copy under way: one warning line, then a copy at once).
# Stdin: a pipe from the wrapper, never written: its EOF (the wrapper closed it, or died) ends
# this, after the copy under way. The timer is a background `read -t` of that pipe, so `wait`
# returns at once on the EOF, the timeout or a SIGTERM. Not signals for the stop: bash's `wait`
# drops the second of two trapped signals that arrive together (SIGTERM, then the wrapper's stop
# signal when the trainer exits at once): the copier went on and the wrapper waited for it
# forever. The trap only sets a flag: one that ran w_copy_log could interrupt the loop's own,
# and bash running a function from a trap there corrupts its variable scopes ("pop_var_context:
# head of shell_variables not a function context", then w_run's locals gone).
w_copier() {  # LOG DEST SYNC_S
  local now=0 rp rc
  exec 9>&-  # not holding the run's lock
  trap 'now=1' TERM
  while :; do
    if [ "$now" = 0 ]; then
      read -r -t "$3" _ <&0 2>/dev/null & rp=$!
      rc=0; wait "$rp" || rc=$?  # 1: EOF; > 128: the timeout, or SIGTERM
      kill "$rp" 2>/dev/null || true
      [ "$rc" != 1 ] || break
    fi
    now=0
    w_copy_log "$1" "$2"
  done
}

# Worker 0, after the trainer exited: if WORKDIR/outcome.json is not one the trainer wrote for
# this start (this launch id, and not the file that was there before it started), write a
# failed one: the trainer died without writing it (killed, OOM, segfault, python missing).
w_outcome() {  # WORKDIR LAUNCH_ID EXIT_CODE BEFORE(outcome.json at the start) PYTHON(or empty)
  local workdir=$1 launch_id=$2 rc=$3 before=$4 py=$5 now last tmp verdict d="$HOME/ssl_jax_run"
  now=$(gcloud storage cat "$workdir/outcome.json" 2>/dev/null || true)
  last=$(grep -v -e '^tpu_pod\[' -e '^[[:space:]]*$' "$d/train.log" | tail -n 1 || true)
  tmp=$(mktemp)
  if [ -n "$py" ]; then
    verdict=$(printf '%s' "$now" | "$py" -c '
import datetime, json, sys
before, launch_id, rc, last, tmp = sys.argv[1:6]
now = sys.stdin.read()
try:
  o = json.loads(now)
except ValueError:
  o = None
if isinstance(o, dict) and o.get("launch_id") == launch_id and now != before:
  print("trainer %s" % o.get("status"))
  sys.exit()
with open(tmp, "w") as f:
  json.dump({"status": "failed", "exit_code": int(rc), "final_line": last, "step": None,
             "launch_id": launch_id,
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "written_by": "launcher"}, f)
print("write")
' "$before" "$launch_id" "$rc" "$last" "$tmp" 2>&1) || verdict="error $verdict"
  elif [ -n "$now" ] && [ "$now" != "$before" ] &&
       grep -Eq "\"launch_id\"[[:space:]]*:[[:space:]]*\"$launch_id\"" <<<"$now"; then
    verdict="trainer ? (no python3 here to read it)"
  else  # no python3 at all: the JSON by hand
    last=$(printf '%s' "$last" | tr -d '\000-\010\013-\037' | tr '\t' ' ')
    last=${last//\\/\\\\}; last=${last//\"/\\\"}
    printf '{"status": "failed", "exit_code": %d, "final_line": "%s", "step": null, "launch_id": "%s", "time": "%s", "written_by": "launcher"}\n' \
      "$rc" "$last" "$launch_id" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" > "$tmp"
    verdict='write'
  fi
  case "$verdict" in
    trainer*) echo "tpu_pod[$(hostname)]: $workdir/outcome.json (the trainer's): status ${verdict#trainer }";;
    write)
      if gcloud storage cp "$tmp" "$workdir/outcome.json" >/dev/null 2>&1; then
        echo "tpu_pod[$(hostname)]: the trainer wrote no outcome.json for this start;" \
             "wrote $workdir/outcome.json: status failed, exit code $rc"
      else
        echo "tpu_pod[$(hostname)]: warning: could not write $workdir/outcome.json" \
             "(status failed, exit code $rc)"
      fi;;
    *) echo "tpu_pod[$(hostname)]: warning: could not check $workdir/outcome.json: ${verdict#error }";;
  esac
  rm -f "$tmp"
}

w_run() {  # WORKDIR LAUNCH_ID LOG_SYNC_S CONFIG TFDS_DATA_DIR [trainer flags]; the detached wrapper
  local d="$HOME/ssl_jax_run" workdir=$1 launch_id=$2 sync_s=$3 config=$4 tfds=$5
  local rc=1 outcome term=0 wid py before='' dest sync_pid
  shift 5
  exec 9>>"$d/lock"  # held (with the trainer, which inherits it) for the whole run
  flock -n 9 || { echo "tpu_pod[$(hostname)]: another run holds $d/lock; not starting"; exit 75; }
  echo $$ > "$d/pid"  # = its process group (setsid): kill -TERM -- -PID stops the run
  trap 'term=1' TERM  # SIGTERM reaches the trainer too; record the outcome after it exits
  [ -z "$tfds" ] || export TFDS_DATA_DIR="$tfds"
  export PYTHONUNBUFFERED=1 SSL_JAX_LAUNCH_ID="$launch_id"
  dest="$workdir/logs/$launch_id/$(hostname).log"
  wid=$(w_worker_id)
  py=$(command -v python3 || true)  # the system's, for outcome.json (the venv's may be broken)
  echo "tpu_pod[$(hostname)]: $(date -u): worker ${wid:-?}, launch $launch_id:" \
       "python -m ssl_jax.main --config=$config --workdir=$workdir --distributed=yes $*"
  echo "tpu_pod[$(hostname)]: copying this log to $dest every ${sync_s}s, on SIGTERM and at the end"
  [ -n "$wid" ] || echo "tpu_pod[$(hostname)]: warning: this worker's number is unknown" \
                        "(TPU_WORKER_ID, metadata agent-worker-number): it writes no outcome.json"
  # The log copier (w_copier), reading a pipe whose write end only this wrapper holds (fd 8;
  # not the trainer's): it ends when the wrapper closes it, or dies.
  exec 8> >(w_copier "$d/train.log" "$dest" "$sync_s")
  sync_pid=$!
  if [ "$wid" = 0 ]; then before=$(gcloud storage cat "$workdir/outcome.json" 2>/dev/null || true); fi
  if { cd "$HOME/ssl_jax" && set +u && . .venv/bin/activate && set -u; }; then
    set +e
    python -m ssl_jax.main --config="$config" --workdir="$workdir" --distributed=yes "$@" 8>&-
    rc=$?
    set -e
  else
    set -u
    echo "tpu_pod[$(hostname)]: error: cannot activate ~/ssl_jax/.venv"
  fi
  exec 8>&-  # the copier ends (after a copy under way), then the last copy below
  wait "$sync_pid" 2>/dev/null || true
  outcome=failed
  [ "$rc" != 0 ] || outcome=exited
  echo "tpu_pod[$(hostname)]: trainer exit code $rc$([ "$term" = 0 ] || echo ' (SIGTERM)')"
  if [ "$wid" = 0 ]; then w_outcome "$workdir" "$launch_id" "$rc" "$before" "$py"; fi
  w_copy_log "$d/train.log" "$dest"
  echo "$outcome" > "$d/outcome"
  echo "$rc" > "$d/exit_code"  # written last: the run has ended
}

w_status() {  # one line: tpu_pod_status HOST STATE OUTCOME WORKDIR LAUNCH_ID (tab-separated)
  local d="$HOME/ssl_jax_run" state=none
  [ ! -f "$d/workdir" ] || state=exited
  if [ -f "$d/lock" ] && ! flock -n "$d/lock" true; then state=running; fi
  printf 'tpu_pod_status\t%s\t%s\t%s\t%s\t%s\n' "$(hostname)" "$state" \
    "$(cat "$d/outcome" 2>/dev/null || echo -)" "$(cat "$d/workdir" 2>/dev/null || echo -)" \
    "$(cat "$d/launch_id" 2>/dev/null || echo -)"
}

w_logs() {  # follow this worker's log until its run ends
  local d="$HOME/ssl_jax_run" pid
  [ -f "$d/train.log" ] || w_die "no run log here ($d/train.log)"
  pid=$(cat "$d/pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ ! -f "$d/exit_code" ] && kill -0 "$pid" 2>/dev/null; then
    exec tail -n 100 -s 0.5 -F --pid="$pid" "$d/train.log"
  fi
  tail -n 100 "$d/train.log"
  echo "tpu_pod[$(hostname)]: the run here has ended: exit code $(cat "$d/exit_code" 2>/dev/null ||
        echo unknown) ($(cat "$d/outcome" 2>/dev/null || echo 'no outcome recorded'))"
}

case "${1:-}" in
  _install) shift; w_install "$@"; exit;;
  _start) shift; w_start "$@"; exit;;
  _run) shift; w_run "$@"; exit;;
  _status) w_status; exit;;
  _logs) w_logs; exit;;
  _*) echo "tpu_pod: unknown worker step $1" >&2; exit 2;;
esac

# ----------------------------------------------------------------------------------------------
# Launcher side.
# ----------------------------------------------------------------------------------------------
USAGE="usage: launch/tpu_pod.sh TPU_NAME ZONE ACCELERATOR_TYPE CONFIG[:ARG] gs://BUCKET/WORKDIR [--spot] [--watch] [trainer flags]"
[ $# -ge 5 ] || { echo "$USAGE" >&2; exit 2; }
TPU_NAME=$1; ZONE=$2; TYPE=$3; CONFIG=$4; WORKDIR=$5; shift 5
case "$WORKDIR" in gs://*) ;; *) echo "WORKDIR must be a gs:// path reachable by every host, got '$WORKDIR'" >&2; exit 2;; esac
SPOT=0; WATCH=0; TRAIN_ARGS=()
case "${PREEMPTIBLE:-}" in ''|0|false|no) ;; *) SPOT=1;; esac
for a in "$@"; do
  case "$a" in --spot) SPOT=1;; --watch) WATCH=1;; *) TRAIN_ARGS+=("$a");; esac
done
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
POLL_S=${TPU_POLL_S:-60}; GRACE_S=${TPU_GRACE_S:-120}; LOG_SYNC_S=${TPU_LOG_SYNC_S:-60}
case "$LOG_SYNC_S" in ''|*[!0-9.]*|*.*.*) LOG_SYNC_S=bad;; esac
case "$LOG_SYNC_S" in *[1-9]*) ;; *) echo "TPU_LOG_SYNC_S must be a number of seconds > 0, got '${TPU_LOG_SYNC_S:-}'" >&2; exit 2;; esac
command -v python3 >/dev/null || { echo "tpu_pod: python3 is needed on this machine (to read WORKDIR/outcome.json)" >&2; exit 2; }
# This launch's id: the workers' log folder WORKDIR/logs/LAUNCH_ID/ and the trainer's
# SSL_JAX_LAUNCH_ID, so that only this launch's WORKDIR/outcome.json is taken as its outcome.
LAUNCH_ID=$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
G="gcloud compute tpus tpu-vm"; QR="gcloud compute tpus queued-resources"
# shellcheck disable=SC2088  # expanded by the workers' shell
SCRIPT='~/ssl_jax/launch/tpu_pod.sh'
SETSID=$(command -v setsid || true)  # the background log stream in its own group (to stop it)

say() { echo "tpu_pod: $*"; }
fail() { local code=$1; shift; echo "tpu_pod: error: $*" >&2; exit "$code"; }
q() { printf '%q ' "$@"; }  # quote for the workers' shell
on_workers() { $G ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"; }

# READY, ABSENT (nothing there: create it), NODE_ABSENT (spot: the queued resource is there but
# its node is not: delete the queued resource, then create it), ERROR:<gcloud message>, or the
# queued resource's / node's state. Spot: two reads, the queued resource's then its node's; a
# preemption between them shows as ACTIVE then node not found, while the queued resource remains
# (SUSPENDED): ABSENT there would make the next create fail with ALREADY_EXISTS.
slice_state() {
  local out
  if [ "$SPOT" = 1 ]; then
    if ! out=$($QR describe "$TPU_NAME" --zone "$ZONE" --format='value(state.state)' 2>&1); then
      if grep -qiE 'not.?found' <<<"$out"; then echo ABSENT; else echo "ERROR:${out//$'\n'/ }"; fi
      return 0
    fi
    [ "$out" = ACTIVE ] || { echo "${out:-UNKNOWN}"; return 0; }
  fi
  if ! out=$($G describe "$TPU_NAME" --zone "$ZONE" --format='value(state)' 2>&1); then
    if ! grep -qiE 'not.?found' <<<"$out"; then echo "ERROR:${out//$'\n'/ }"
    elif [ "$SPOT" = 1 ]; then echo NODE_ABSENT
    else echo ABSENT
    fi
    return 0
  fi
  echo "${out:-UNKNOWN}"
}
is_lost() {
  case "$1" in ABSENT|NODE_ABSENT|PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED) return 0;; esac
  return 1
}

create_slice() {
  if [ "$SPOT" = 1 ]; then
    say "requesting spot slice $TPU_NAME ($TYPE) in $ZONE (queued resource)"
    $QR create "$TPU_NAME" --zone "$ZONE" --node-id "$TPU_NAME" --accelerator-type "$TYPE" \
        --runtime-version "$VERSION" --spot ||
      fail 1 "gcloud could not create the queued resource $TPU_NAME (message above)"
  else
    say "creating TPU slice $TPU_NAME ($TYPE) in $ZONE"
    $G create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" ||
      fail 1 "gcloud could not create the TPU slice $TPU_NAME (message above)"
  fi
}

delete_slice() {
  say "deleting $TPU_NAME"
  if [ "$SPOT" = 1 ]; then
    $QR delete "$TPU_NAME" --zone "$ZONE" --force --quiet || fail 1 "could not delete the queued resource $TPU_NAME"
  else
    $G delete "$TPU_NAME" --zone "$ZONE" --quiet || fail 1 "could not delete the TPU slice $TPU_NAME"
  fi
}

# Wait for READY. 0: ready; 1: lost while waiting (preempted/deleted). FAILED: error, exit 1.
wait_ready() {
  local s last=''
  while :; do
    s=$(slice_state)
    [ "$s" = "$last" ] || say "$TPU_NAME: ${s}"
    last=$s
    case "$s" in
      READY) return 0;;
      FAILED)
        if [ "$SPOT" = 1 ]; then $QR describe "$TPU_NAME" --zone "$ZONE" >&2 || true; fi
        fail 1 "creating $TPU_NAME failed: the queued resource is FAILED (description above)";;
    esac
    if is_lost "$s"; then return 1; fi
    sleep "$POLL_S"
  done
}

# Make the slice READY, (re)creating it when absent, preempted or failed. CREATED=1 if it did.
# $1: its state if just read.
ensure_slice() {
  local s=${1:-}
  CREATED=0
  [ -n "$s" ] || s=$(slice_state)
  case "$s" in
    READY) return 0;;
    ERROR:*) fail 1 "cannot read the state of $TPU_NAME: ${s#ERROR:}";;
  esac
  while :; do
    if is_lost "$s"; then
      [ "$s" = ABSENT ] || { say "$TPU_NAME is $s: recreating it"; delete_slice; }
      create_slice
      CREATED=1
    fi
    if wait_ready; then return 0; fi
    [ "$WATCH" = 1 ] || fail 1 "$TPU_NAME was lost before it became ready; run the same command again"
    s=$(slice_state)
  done
}

# Aggregate the workers' run state into RUN_STATE: running | busy (another workdir) | ended (every
# worker's run of this workdir has ended: read outcome.json) | none; RUN_DETAIL: the other
# workdir; FAILED_ON: hosts whose trainer exited != 0; RUN_LAUNCH_ID: the launch id of this
# workdir's run on the workers. Returns 1 if ssh failed.
run_status() {
  local out tag host state outcome wd lid n=0 running=0 ended=0 other=''
  RUN_STATE=unknown; RUN_DETAIL=''; FAILED_ON=''; RUN_LAUNCH_ID=''
  out=$(on_workers all "if [ -f $SCRIPT ]; then bash $SCRIPT _status; else printf 'tpu_pod_status\t%s\tnone\t-\t-\t-\n' \"\$(hostname)\"; fi") || return 1
  while IFS=$'\t' read -r tag host state outcome wd lid; do
    [ "$tag" = tpu_pod_status ] || continue
    n=$((n + 1))
    if [ "$state" = running ]; then
      if [ "$wd" = "$WORKDIR" ]; then running=$((running + 1)); RUN_LAUNCH_ID=${lid:--}; else other=$wd; fi
    elif [ "$state" = exited ] && [ "$wd" = "$WORKDIR" ]; then
      ended=$((ended + 1))
      [ "$outcome" != failed ] || FAILED_ON="$FAILED_ON $host"
    fi
  done <<<"$out"
  [ "$n" -gt 0 ] || return 1
  if [ -n "$other" ]; then RUN_STATE=busy; RUN_DETAIL=$other
  elif [ "$running" -gt 0 ]; then RUN_STATE=running
  elif [ "$ended" -gt 0 ]; then RUN_STATE=ended
  else RUN_STATE=none
  fi
}

# How the run ended, from WORKDIR/outcome.json (written by the trainer, process 0, or by worker
# 0's wrapper when the trainer died without writing it), taken only when its launch_id is this
# launch's. OUTCOME: done | stopped | failed | unknown; OUTCOME_DETAIL: one line about it.
read_outcome() {
  local raw err
  err=$(mktemp)
  OUTCOME=unknown
  if ! raw=$(gcloud storage cat "$WORKDIR/outcome.json" 2>"$err"); then
    OUTCOME_DETAIL="no $WORKDIR/outcome.json ($(tail -n 1 "$err"))"
    rm -f "$err"; return 0
  fi
  rm -f "$err"
  IFS=$'\t' read -r OUTCOME OUTCOME_DETAIL < <(printf '%s' "$raw" | python3 -c '
import json, sys
launch_id, path = sys.argv[1:3]
def line(s):
  return " ".join(str(s).split())
try:
  o = json.loads(sys.stdin.buffer.read().decode("utf-8", "replace"))
except ValueError as e:
  o = e
if not isinstance(o, dict):
  print("unknown\t%s is not a JSON object (%s)" % (path, line(o)))
elif o.get("launch_id") != launch_id:
  print("unknown\t%s is from launch %s, not this one (%s): ignored" % (path, o.get("launch_id"), launch_id))
elif o.get("status") not in ("done", "stopped", "failed"):
  print("unknown\t%s has status %r" % (path, o.get("status")))
else:
  print("%s\toutcome.json: %s, exit code %s%s: %s" % (
      o["status"], o["status"], o.get("exit_code"),
      " (written by worker 0: the trainer died without writing it)"
      if o.get("written_by") == "launcher" else "", line(o.get("final_line"))))
' "$LAUNCH_ID" "$WORKDIR/outcome.json") || true
  [ -n "${OUTCOME:-}" ] || { OUTCOME=unknown; OUTCOME_DETAIL="could not read $WORKDIR/outcome.json"; }
}

copy_and_install() {
  local tmp
  tmp=$(mktemp -d)
  tar -C "$REPO_DIR" --exclude=.git --exclude=.venv --exclude=.ci_venv --exclude=__pycache__ \
      -czf "$tmp/ssl_jax.tgz" .
  say "copying this checkout to every worker of $TPU_NAME"
  if ! $G scp "$tmp/ssl_jax.tgz" "$TPU_NAME":ssl_jax.tgz --zone "$ZONE" --worker=all; then
    rm -rf "$tmp"; say "copying the checkout to $TPU_NAME failed"; return 1
  fi
  rm -rf "$tmp"
  say "installing on every worker (jax[tpu] pinned to the installed jax)"
  on_workers all "set -e; mkdir -p ~/ssl_jax; find ~/ssl_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; tar -C ~/ssl_jax -xzf ~/ssl_jax.tgz; bash $SCRIPT _install $(q "${TPU_PYTHON:-}" "${TPU_SETUP:-}")" ||
    { say "installing on $TPU_NAME failed (messages above)"; return 1; }
}

start_run() {
  say "starting the run detached on every worker: $CONFIG -> $WORKDIR (launch $LAUNCH_ID;" \
      "logs: $WORKDIR/logs/$LAUNCH_ID/)"
  on_workers all "bash $SCRIPT _start $(q "$WORKDIR" "$LAUNCH_ID" "$LOG_SYNC_S" "$CONFIG" "${TFDS_DATA_DIR:-}" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})" ||
    { say "starting the run on $TPU_NAME failed (messages above)"; return 1; }
}

# In --watch: a step that failed because the slice went away is retried on the next poll.
watch_step() {
  local s
  "$@" && return 0
  s=$(slice_state)
  is_lost "$s" || fail 1 "$* failed with $TPU_NAME $s"
  say "$TPU_NAME is $s: trying again"
  return 1
}

STREAM_PID=
start_stream() {
  $SETSID $G ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "bash $SCRIPT _logs" &
  STREAM_PID=$!
}
stream_alive() { [ -n "$STREAM_PID" ] && kill -0 "$STREAM_PID" 2>/dev/null; }
reconnect_stream() {  # if the stream was cut (ssh failed); not if it ended with worker 0's run
  local rc=0
  if [ -z "$STREAM_PID" ] || stream_alive; then return 0; fi
  wait "$STREAM_PID" || rc=$?
  STREAM_PID=
  if [ "$rc" != 0 ]; then say "the log stream was cut (ssh exit $rc); reconnecting"; start_stream; fi
}
done_warning() {
  [ -z "$FAILED_ON" ] || say "warning: the run is done but the trainer exited non-zero on$FAILED_ON"
}
stop_stream() {
  if stream_alive; then kill -- -"$STREAM_PID" 2>/dev/null || kill "$STREAM_PID" 2>/dev/null || true; fi
  [ -z "$STREAM_PID" ] || wait "$STREAM_PID" 2>/dev/null || true
  STREAM_PID=
}
trap stop_stream EXIT

watch_loop() {
  local s last='' stops=0
  start_stream
  while :; do
    sleep "$POLL_S"
    s=$(slice_state)
    if is_lost "$s"; then
      say "$TPU_NAME is $s (preempted): recreating it and restarting the run (it resumes from the newest checkpoint)"
      stop_stream
      ensure_slice "$s"
      watch_step copy_and_install && watch_step start_run && start_stream
      stops=0; last=''
      continue
    fi
    if [ "$s" != READY ]; then
      [ "$s" = "$last" ] || say "$TPU_NAME: $s (waiting)"
      last=$s
      continue
    fi
    last=$s
    run_status || { say "could not read the run state over ssh; retrying"; continue; }
    case "$RUN_STATE" in
      running) reconnect_stream;;
      ended)
        read_outcome
        case "$OUTCOME" in
          done) stop_stream; done_warning; say "the run is done ($WORKDIR): $OUTCOME_DETAIL"; exit 0;;
          stopped)
            stops=$((stops + 1))
            [ "$stops" -le 3 ] || fail 1 "the run stopped $stops times in a row without finishing on a healthy slice; see $WORKDIR/logs/$LAUNCH_ID/"
            say "the run stopped before finishing ($WORKDIR): $OUTCOME_DETAIL; restarting it on $TPU_NAME"
            stop_stream
            watch_step start_run && start_stream;;
          *)
            say "the run failed ($WORKDIR): $OUTCOME_DETAIL; checking the slice again in ${GRACE_S}s"
            sleep "$GRACE_S"
            s=$(slice_state)
            if [ "$s" = READY ]; then
              stop_stream
              fail 1 "the run failed with $TPU_NAME healthy ($WORKDIR): $OUTCOME_DETAIL (logs: $WORKDIR/logs/$LAUNCH_ID/)"
            fi;;
        esac;;
      none)
        say "no run on the workers; installing and starting it"
        stop_stream
        watch_step copy_and_install && watch_step start_run && start_stream;;
      busy) fail 2 "$TPU_NAME is running another run ($RUN_DETAIL)";;
    esac
  done
}

ensure_slice
ATTACH=0
if [ "$CREATED" = 0 ]; then
  run_status || fail 1 "could not read the run state on the workers of $TPU_NAME over ssh"
  case "$RUN_STATE" in
    running)
      ATTACH=1
      # Its outcome.json carries the launch id it was started with: adopt it.
      [ "$RUN_LAUNCH_ID" = - ] || LAUNCH_ID=$RUN_LAUNCH_ID
      say "$WORKDIR is already running on $TPU_NAME (launch $LAUNCH_ID): attaching to its log (starting nothing)";;
    busy) fail 2 "$TPU_NAME is running another run ($RUN_DETAIL); stop it first (see the header of $0)";;
  esac
fi
if [ "$ATTACH" = 0 ]; then
  copy_and_install || exit 1
  start_run || exit 1
fi
if [ "$WATCH" = 1 ]; then watch_loop; fi

rc=0
$G ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "bash $SCRIPT _logs" || rc=$?
run_status || RUN_STATE=unknown
if [ "$rc" = 0 ]; then  # the run ended on worker 0: let the other workers finish too
  [ "$RUN_STATE" != running ] || say "waiting for the other workers to finish"
  while [ "$RUN_STATE" = running ]; do
    sleep "$POLL_S"
    run_status || RUN_STATE=unknown
  done
fi
case "$RUN_STATE" in
  running) say "the log stream ended (ssh exit $rc) but the run goes on, detached, on $TPU_NAME" \
               "(log: ~/ssl_jax_run/train.log on each worker); run the same command again to re-attach"
           exit 0;;
  ended)
    read_outcome
    case "$OUTCOME" in
      done) done_warning; say "the run is done ($WORKDIR): $OUTCOME_DETAIL"; exit 0;;
      stopped) fail 1 "the run stopped before finishing ($WORKDIR): $OUTCOME_DETAIL; run the same command again to resume";;
      failed) fail 1 "the run failed ($WORKDIR): $OUTCOME_DETAIL (logs: $WORKDIR/logs/$LAUNCH_ID/)";;
      *) fail 1 "could not tell how the run ended: $OUTCOME_DETAIL (logs: $WORKDIR/logs/$LAUNCH_ID/)";;
    esac;;
  *) fail 1 "could not tell how the run ended (log stream: ssh exit $rc; run state: $RUN_STATE); run the same command again to re-attach or resume";;
esac
