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
#     resource TPU_NAME with node TPU_NAME; one that is FAILED/SUSPENDED (preempted) is deleted
#     and requested again. Wait until it is ACTIVE and its node READY. A create that gcloud
#     refuses, or a request that ends FAILED, is an error (exit 1).
#  2. If the workers already run this workdir (an earlier launch), attach to its log and start
#     nothing; a different workdir running there is an error (exit 2).
#  3. Copy this checkout to ~/ssl_jax on every worker (its .venv is kept) and install it:
#     requirements.txt, then jax[tpu] pinned to the jax version that step installed
#     (pip install "jax[tpu]==$V" -f .../libtpu_releases.html, per JAX's install docs), so jax,
#     flax and orbax stay the versions requirements.txt selects and the tests ran with.
#  4. Start the trainer detached on every worker (setsid nohup; a lock file allows one run per
#     worker): a dropped ssh connection does not stop it. Log on each worker:
#     ~/ssl_jax_run/train.log (an earlier start's: ~/ssl_jax_run/train.<UTC time>.<pid>.log).
#  5. Stream worker 0's log (tail -F over ssh) until the run ends there. Exit 0: the run is done,
#     or only the stream was lost (the run goes on; rerun this command to re-attach). Exit 1:
#     the run failed, or stopped early (e.g. a preemption notice: rerun to resume).
#  --watch: stream the log in the background and poll the slice every TPU_POLL_S seconds; on
#     preemption (node PREEMPTED or gone, queued resource SUSPENDING/SUSPENDED) delete and
#     recreate the slice, reinstall and restart the run (it resumes); a run that stopped on a
#     healthy slice is restarted there (at most 3 times in a row). Exit 0 once the run is done;
#     exit 1 when it fails on a healthy slice (after TPU_GRACE_S, in case a preemption is about
#     to show) or the slice cannot be created.
#
# "Done": the trainer exited 0 AND its log holds the trainer's completion line
# "Outputs in WORKDIR:" (ssl_jax.train prints it on process 0 after the final checkpoint and the
# final evals). Exit code 0 alone is not enough: a preemption notice (SIGTERM) also exits 0. The
# detached wrapper records, on each worker, ~/ssl_jax_run/exit_code and ~/ssl_jax_run/outcome
# (done | exited: 0 without that line | failed).
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
#
# Env: TPU_SOFTWARE_VERSION (default tpu-ubuntu2204-base), TFDS_DATA_DIR (gs:// data dir),
# PREEMPTIBLE=1 (= --spot), TPU_PYTHON (the workers' Python for the venv, default python3;
# jax>=0.10 needs >= 3.11), TPU_SETUP (a command run on every worker before installing, e.g.
# 'sudo apt-get update -qq && sudo apt-get install -y -qq python3.11-venv'), TPU_POLL_S (60),
# TPU_GRACE_S (120).
set -euo pipefail
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# ----------------------------------------------------------------------------------------------
# Worker side: `bash ~/ssl_jax/launch/tpu_pod.sh _<step> ...`, run over ssh from the copied
# checkout. Run state lives in ~/ssl_jax_run: lock, pid, workdir, train.log, exit_code, outcome.
# ----------------------------------------------------------------------------------------------
w_die() { echo "tpu_pod[$(hostname)]: error: $*" >&2; exit 1; }

w_install() {  # TPU_PYTHON TPU_SETUP
  local py=${1:-python3} setup=${2:-} v after
  cd "$HOME/ssl_jax"
  if [ -n "$setup" ]; then
    echo "tpu_pod[$(hostname)]: TPU_SETUP: $setup"
    bash -c "$setup" || w_die "TPU_SETUP failed: $setup"
  fi
  command -v "$py" >/dev/null || w_die "$py (TPU_PYTHON) is not installed on this worker"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    w_die "$("$py" --version 2>&1) is too old: jax>=0.10 (requirements.txt) needs Python >= 3.11." \
          "Set TPU_PYTHON=python3.11 TPU_SETUP='sudo apt-get update -qq &&" \
          "sudo apt-get install -y -qq python3.11-venv', or a newer TPU_SOFTWARE_VERSION."
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  . .venv/bin/activate
  pip install -q -U pip
  pip install -q -r requirements.txt
  v=$(python -c 'import jax; print(jax.__version__)')
  # The TPU plugin of exactly this jax: `-U 'jax[tpu]'` would move jax (and break flax/orbax).
  pip install -q "jax[tpu]==$v" -f "$LIBTPU_FIND_LINKS"
  after=$(python -c 'import jax; print(jax.__version__)')
  [ "$after" = "$v" ] || w_die "installing jax[tpu]==$v changed jax to $after"
  echo "tpu_pod[$(hostname)]: installed jax $v with jax[tpu]==$v"
}

w_start() {  # WORKDIR CONFIG TFDS_DATA_DIR [trainer flags]
  local d="$HOME/ssl_jax_run" other
  mkdir -p "$d"
  if ! flock -n "$d/lock" true; then
    other=$(cat "$d/workdir" 2>/dev/null || echo '?')
    [ "$other" = "$1" ] || w_die "another run ($other) is running here"
    echo "tpu_pod[$(hostname)]: $1 is already running here; not starting a second copy"
    return 0
  fi
  [ ! -f "$d/train.log" ] || mv "$d/train.log" "$d/train.$(date -u +%Y%m%dT%H%M%SZ).$$.log"
  rm -f "$d/pid" "$d/exit_code" "$d/outcome"
  printf '%s\n' "$1" > "$d/workdir"
  # A new session (setsid): no controlling terminal, so nothing of the ssh session reaches it.
  setsid nohup bash "$HOME/ssl_jax/launch/tpu_pod.sh" _run "$@" </dev/null >"$d/train.log" 2>&1 &
  for _ in $(seq 100); do
    if [ -s "$d/pid" ] || [ -f "$d/exit_code" ]; then break; fi
    sleep 0.1
  done
  [ -s "$d/pid" ] || w_die "the run did not start; $d/train.log ends: $(tail -n 5 "$d/train.log")"
  echo "tpu_pod[$(hostname)]: started (process group $(cat "$d/pid")); log: $d/train.log"
}

w_run() {  # WORKDIR CONFIG TFDS_DATA_DIR [trainer flags]; the detached wrapper
  local d="$HOME/ssl_jax_run" workdir=$1 config=$2 tfds=$3 rc outcome term=0
  shift 3
  exec 9>>"$d/lock"  # held (with the trainer, which inherits it) for the whole run
  flock -n 9 || { echo "tpu_pod[$(hostname)]: another run holds $d/lock; not starting"; exit 75; }
  echo $$ > "$d/pid"  # = its process group (setsid): kill -TERM -- -PID stops the run
  trap 'term=1' TERM  # SIGTERM reaches the trainer too; record the outcome after it exits
  [ -z "$tfds" ] || export TFDS_DATA_DIR="$tfds"
  export PYTHONUNBUFFERED=1
  echo "tpu_pod[$(hostname)]: $(date -u): python -m ssl_jax.main --config=$config" \
       "--workdir=$workdir --distributed=yes $*"
  if ! { cd "$HOME/ssl_jax" && . .venv/bin/activate; }; then
    echo failed > "$d/outcome"; echo 1 > "$d/exit_code"
    echo "tpu_pod[$(hostname)]: error: cannot activate ~/ssl_jax/.venv"; exit 1
  fi
  set +e
  python -m ssl_jax.main --config="$config" --workdir="$workdir" --distributed=yes "$@"
  rc=$?
  set -e
  outcome=failed
  if [ "$rc" = 0 ]; then
    outcome=exited
    if grep -qF "Outputs in $workdir:" "$d/train.log"; then outcome="done"; fi
  fi
  echo "$outcome" > "$d/outcome"
  echo "$rc" > "$d/exit_code"  # written last: the run has ended
  echo "tpu_pod[$(hostname)]: trainer exit code $rc: $outcome$([ "$term" = 0 ] || echo ' (SIGTERM)')"
}

w_status() {  # one line: tpu_pod_status HOST STATE OUTCOME WORKDIR (tab-separated)
  local d="$HOME/ssl_jax_run" state=none
  [ ! -f "$d/workdir" ] || state=exited
  if [ -f "$d/lock" ] && ! flock -n "$d/lock" true; then state=running; fi
  printf 'tpu_pod_status\t%s\t%s\t%s\t%s\n' "$(hostname)" "$state" \
    "$(cat "$d/outcome" 2>/dev/null || echo -)" "$(cat "$d/workdir" 2>/dev/null || echo -)"
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
        echo unknown), $(cat "$d/outcome" 2>/dev/null || echo 'no outcome recorded')"
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
POLL_S=${TPU_POLL_S:-60}; GRACE_S=${TPU_GRACE_S:-120}
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
G="gcloud compute tpus tpu-vm"; QR="gcloud compute tpus queued-resources"
# shellcheck disable=SC2088  # expanded by the workers' shell
SCRIPT='~/ssl_jax/launch/tpu_pod.sh'
SETSID=$(command -v setsid || true)  # the background log stream in its own group (to stop it)

say() { echo "tpu_pod: $*"; }
fail() { local code=$1; shift; echo "tpu_pod: error: $*" >&2; exit "$code"; }
q() { printf '%q ' "$@"; }  # quote for the workers' shell
on_workers() { $G ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"; }

# READY, ABSENT, ERROR:<gcloud message>, or the queued resource's / node's state.
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
    if grep -qiE 'not.?found' <<<"$out"; then echo ABSENT; else echo "ERROR:${out//$'\n'/ }"; fi
    return 0
  fi
  echo "${out:-UNKNOWN}"
}
is_lost() { case "$1" in ABSENT|PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED) return 0;; esac; return 1; }

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

# Aggregate the workers' run state into RUN_STATE: running | busy (another workdir) | done |
# failed | stopped | none; RUN_DETAIL: hosts / the other workdir. Returns 1 if ssh failed.
run_status() {
  local out tag host state outcome wd n=0 running=0 done=0 exited=0 failed='' other=''
  RUN_STATE=unknown; RUN_DETAIL=''
  out=$(on_workers all "if [ -f $SCRIPT ]; then bash $SCRIPT _status; else printf 'tpu_pod_status\t%s\tnone\t-\t-\n' \"\$(hostname)\"; fi") || return 1
  while IFS=$'\t' read -r tag host state outcome wd; do
    [ "$tag" = tpu_pod_status ] || continue
    n=$((n + 1))
    if [ "$state" = running ]; then
      if [ "$wd" = "$WORKDIR" ]; then running=$((running + 1)); else other=$wd; fi
    elif [ "$state" = exited ] && [ "$wd" = "$WORKDIR" ]; then
      case "$outcome" in done) done=$((done + 1));; failed) failed="$failed $host";; *) exited=$((exited + 1));; esac
    fi
  done <<<"$out"
  [ "$n" -gt 0 ] || return 1
  if [ -n "$other" ]; then RUN_STATE=busy; RUN_DETAIL=$other
  elif [ "$running" -gt 0 ]; then RUN_STATE=running
  elif [ "$done" -gt 0 ]; then
    RUN_STATE="done"
    [ -z "$failed" ] || say "warning: the run is done but the trainer failed on$failed"
  elif [ -n "$failed" ]; then RUN_STATE=failed; RUN_DETAIL=$failed
  elif [ "$exited" -gt 0 ]; then RUN_STATE=stopped
  else RUN_STATE=none
  fi
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
  on_workers all "set -e; mkdir -p ~/ssl_jax; find ~/ssl_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; tar -C ~/ssl_jax -xzf ~/ssl_jax.tgz; bash $SCRIPT _install $(q "${TPU_PYTHON:-python3}" "${TPU_SETUP:-}")" ||
    { say "installing on $TPU_NAME failed (messages above)"; return 1; }
}

start_run() {
  say "starting the run detached on every worker: $CONFIG -> $WORKDIR"
  on_workers all "bash $SCRIPT _start $(q "$WORKDIR" "$CONFIG" "${TFDS_DATA_DIR:-}" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})" ||
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
      done) stop_stream; say "the run is done ($WORKDIR)"; exit 0;;
      failed)
        say "the trainer failed on$RUN_DETAIL; checking the slice again in ${GRACE_S}s"
        sleep "$GRACE_S"
        s=$(slice_state)
        if [ "$s" = READY ]; then
          stop_stream
          fail 1 "the run failed on$RUN_DETAIL with $TPU_NAME healthy (log above; ~/ssl_jax_run/train.log on each worker)"
        fi;;
      stopped)
        stops=$((stops + 1))
        [ "$stops" -le 3 ] || fail 1 "the run stopped $stops times in a row without finishing on a healthy slice; see ~/ssl_jax_run/train.log"
        say "the run stopped before finishing (exit 0 without the trainer's completion line: a preemption notice?); restarting it on $TPU_NAME"
        stop_stream
        watch_step start_run && start_stream;;
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
    running) ATTACH=1; say "$WORKDIR is already running on $TPU_NAME: attaching to its log (starting nothing)";;
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
  done) say "the run is done ($WORKDIR)"; exit 0;;
  running) say "the log stream ended (ssh exit $rc) but the run goes on, detached, on $TPU_NAME" \
               "(log: ~/ssl_jax_run/train.log on each worker); run the same command again to re-attach"
           exit 0;;
  failed) fail 1 "the run failed on$RUN_DETAIL (log above; ~/ssl_jax_run/train.log on each worker)";;
  stopped) fail 1 "the run stopped before finishing (a preemption notice?); run the same command again to resume";;
  *) fail 1 "could not tell how the run ended (log stream: ssh exit $rc; run state: $RUN_STATE); run the same command again to re-attach or resume";;
esac
