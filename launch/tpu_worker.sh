#!/usr/bin/env bash
# One TPU VM worker's side of launch/tpu_pod.py, copied next to the code as ~/jaxunlearn/<run>/worker.sh:
#   worker.sh start [--module=jaxunlearn.main] [--python=PY | --python-version=3.11] [--pip=SPEC]... [--env=K=V]...
#                   -- ARGS...
#   worker.sh status [--brief]
#   worker.sh stop [--signal=TERM]
# start: exports the --env variables (for the setup too: PIP_INDEX_URL, UV_DEFAULT_INDEX, UV_PYTHON_INSTALL_MIRROR),
# unpacks code.tar.gz into code/ (on this worker's own disk), builds or reuses this worker's environment (a pinned
# uv from the package index; the image's Python when it is >= 3.11, else another Python >= 3.11 on the image, else
# one that uv downloads; requirements.txt + the package's tpu extra; kept in ~/jaxunlearn/envs/ and reused while
# those do not change), then starts `python -m MODULE ARGS` in code/, detached (its own session, nohup: a dropped
# ssh does not stop it), writing logs/worker-<id>.log, worker-<id>.pid and, when it ends, worker-<id>.exit.
# status --brief: one line `JAXUNLEARN_STATUS worker=<id> state=running|finished|killed|none [exit=<status>]`.
# The worker id is the TPU VM's agent-worker-number (metadata server), or $JAXUNLEARN_WORKER_ID when set.
set -euo pipefail

UV_VERSION=0.13.10 # pinned: installed with `python3 -m pip install --user uv==...` from the package index

run_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$run_dir")
code=$run_dir/code

worker_id() {
  if [[ -n ${JAXUNLEARN_WORKER_ID:-} ]]; then
    echo "$JAXUNLEARN_WORKER_ID"
  elif curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number; then
    echo
  elif [[ $(hostname) =~ -w-([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    echo 0
  fi
}

id=$(worker_id | tr -d '[:space:]')
log=$run_dir/logs/worker-$id.log
pidfile=$run_dir/worker-$id.pid
exitfile=$run_dir/worker-$id.exit

say() { echo "[worker $id $(date -u +%H:%M:%S)] $*"; }
die() {
  say "error: $*" >&2
  exit 1
}
running() { [[ -s $pidfile && ! -f $exitfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

unpack() {
  rm -rf "$code.new"
  mkdir -p "$code.new"
  tar -xzf "$run_dir/code.tar.gz" -C "$code.new"
  rm -rf "$code"
  mv "$code.new" "$code"
  say "code unpacked into $code"
}

uv_ok() { [[ $(uv --version 2>/dev/null) == "uv $UV_VERSION"* ]]; }

# uv $UV_VERSION in ~/.local/bin, from the package index (PIP_INDEX_URL when set): nothing else is fetched.
ensure_uv() {
  export PATH="$HOME/.local/bin:$PATH"
  uv_ok && return
  say "installing uv $UV_VERSION: python3 -m pip install --user uv==$UV_VERSION (index: ${PIP_INDEX_URL:-PyPI})"
  python3 -m pip install --user --quiet "uv==$UV_VERSION" ||
    python3 -m pip install --user --quiet --break-system-packages "uv==$UV_VERSION" ||
    die "uv $UV_VERSION could not be installed with python3 -m pip: no pip on the image, or no route to the" \
      "package index (private network: Cloud NAT or a mirror, --index-url; see launch/README.md)"
  uv_ok || die "uv $UV_VERSION was installed, but uv is $(command -v uv) ($(uv --version 2>&1))"
}

# Sets $base to a Python >= 3.11 already on this worker (the image's python3 first) and $base_version, or clears
# them.
find_python() {
  local candidate
  base="" base_version=""
  for candidate in python3 python3.14 python3.13 python3.12 python3.11; do
    command -v "$candidate" >/dev/null || continue
    if base_version=$("$candidate" -c 'import sys
print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null); then
      base=$(command -v "$candidate")
      return
    fi
  done
  base_version=""
}

# Sets $py to this worker's environment for (requirements.txt, pyproject.toml, base Python, extra specs), building
# it once: the pinned requirements plus the package's `tpu` extra (jax[tpu], storage clients), not the package
# itself (the run imports it from code/). The base Python: the image's own when it is >= 3.11 (or another >= 3.11
# on the image; no download: UV_PYTHON_DOWNLOADS=never), else CPython $version that uv downloads.
build_env() {
  local version=$1 key env request
  shift
  ensure_uv
  find_python
  if [[ -n $base ]]; then
    say "base Python: $base ($base_version, on the image)"
    request=$base
    export UV_PYTHON_DOWNLOADS=never
  else
    say "no Python >= 3.11 on this image (python3: $(python3 -V 2>&1 || echo none)): uv downloads CPython $version" \
      "from ${UV_PYTHON_INSTALL_MIRROR:-GitHub (python-build-standalone)}."
    say "  This needs internet access to ${UV_PYTHON_INSTALL_MIRROR:-github.com (a recent uv may try the Astral mirror" \
      "releases.astral.sh first)}. To avoid it: an image with Python >= 3.11, --python=PATH (a Python >= 3.11 on" \
      "every worker), or --env=UV_PYTHON_INSTALL_MIRROR=URL."
    request=$version base_version=$version
    export UV_PYTHON_DOWNLOADS=${UV_PYTHON_DOWNLOADS:-automatic}
  fi
  key=$({ cat "$code/requirements.txt" "$code/pyproject.toml"; printf '%s\n' "$request" "$@"; } | sha256sum)
  key=${key:0:16}
  env=$root/envs/py$base_version-$key
  mkdir -p "$root/envs"
  (
    flock 9 # one build at a time on this worker; other workers build on their own disks
    if [[ -f $env/.complete ]]; then
      say "reusing $env"
    else
      say "building $env (uv $UV_VERSION, Python $base_version, requirements.txt + the tpu extra $*): minutes," \
        "once per worker"
      rm -rf "$env"
      uv venv --quiet --python "$request" "$env"
      uv pip install --quiet --python "$env/bin/python" -r "$code/requirements.txt" -r "$code/pyproject.toml" \
        --extra tpu "$@"
      touch "$env/.complete"
    fi
  ) 9>"$env.lock"
  py=$env/bin/python
}

check_python() {
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is $("$py" -V 2>&1), not >= 3.11"
  (cd "$code" && PYTHONPATH=$code "$py" -c 'import sys, jaxunlearn
print("python", sys.version.split()[0], "at", sys.executable, "| jaxunlearn from", jaxunlearn.__file__)')
}

start_detached() {
  rm -f "$pidfile" "$exitfile"
  say "starting in $code: $py -m $*"
  cd "$code"
  # The process group's leader writes its pid, runs the command and records its exit status; `stop` signals the
  # whole group. The trap keeps the leader alive until the command has finished its own signal handling.
  # shellcheck disable=SC2016
  PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}" nohup setsid bash -c '
    echo $$ > "$1"; exitfile=$2; shift 2
    trap : TERM INT
    status=0; "$@" || status=$?
    echo "$status" > "$exitfile"' worker "$pidfile" "$exitfile" "$py" -m "$@" >>"$log" 2>&1 </dev/null &
  for _ in $(seq 100); do
    [[ -s $pidfile ]] && break
    sleep 0.1
  done
  [[ -s $pidfile ]] || die "the command did not start; see $log"
  say "started: pid $(cat "$pidfile"), log $log"
}

cmd_start() {
  local module=jaxunlearn.main python="" version=3.11 pips=() envs=()
  while (($#)); do
    case $1 in
      --module=*) module=${1#*=} ;;
      --python=*) python=${1#*=} ;;
      --python-version=*) version=${1#*=} ;;
      --pip=*) pips+=("${1#*=}") ;;
      --env=*) envs+=("${1#*=}") ;;
      --) shift && break ;;
      *) die "unknown option $1" ;;
    esac
    shift
  done
  running && die "run $(basename "$run_dir") is already running here (pid $(cat "$pidfile")); stop it first"
  mkdir -p "$run_dir/logs"
  exec > >(tee -a "$log") 2>&1 # this setup's output goes to the ssh session and the log
  say "run $(basename "$run_dir") on $(hostname)"
  for kv in ${envs[@]+"${envs[@]}"}; do export "${kv?}"; done
  unpack
  if [[ -n $python ]]; then
    py=$python
  else
    build_env "$version" ${pips[@]+"${pips[@]}"}
  fi
  check_python
  ln -sfn "$(basename "$run_dir")" "$root/latest"
  start_detached "$module" "$@"
}

cmd_status() {
  if [[ ${1:-} == --brief ]]; then
    if running; then
      echo "JAXUNLEARN_STATUS worker=$id state=running"
    elif [[ -f $exitfile ]]; then
      echo "JAXUNLEARN_STATUS worker=$id state=finished exit=$(cat "$exitfile")"
    elif [[ -f $pidfile ]]; then
      echo "JAXUNLEARN_STATUS worker=$id state=killed"
    else
      echo "JAXUNLEARN_STATUS worker=$id state=none"
    fi
    return
  fi
  if running; then
    echo "worker $id: running (pid $(cat "$pidfile"))"
  elif [[ -f $exitfile ]]; then
    echo "worker $id: finished, exit status $(cat "$exitfile")"
  elif [[ -f $pidfile ]]; then
    echo "worker $id: ended without an exit status (killed)"
  else
    echo "worker $id: not started"
  fi
  if [[ -f $log ]]; then tail -n 3 "$log" | sed 's/^/    /'; fi
}

cmd_stop() {
  local signal=TERM
  case ${1:-} in --signal=*) signal=${1#*=} ;; "") ;; *) die "unknown option $1" ;; esac
  if ! running; then
    echo "worker $id: not running"
    return
  fi
  kill -s "$signal" -- "-$(cat "$pidfile")"
  echo "worker $id: sent SIG$signal to process group $(cat "$pidfile")"
}

case ${1:-} in
  start | status | stop)
    command=$1
    shift
    "cmd_$command" "$@"
    ;;
  *)
    echo "usage: $0 start|status|stop [options] (see the comment at the top)" >&2
    exit 2
    ;;
esac
