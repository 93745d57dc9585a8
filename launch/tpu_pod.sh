#!/usr/bin/env bash
# Run jaxunlearn on every worker of a Cloud TPU VM slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [main flags, e.g. --workdir=/mnt/shared/run --config.optim.lr=1e-5]
# Assumes the repo is checked out at the same path on every worker (e.g. on a shared disk) and that the
# workdir is on a filesystem all workers share.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
repo=${JAXUNLEARN_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
flags=$(printf ' %q' "$@")
setup="cd $repo && { [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . 'jax[tpu]==0.10.2'; }; }"
run=".venv/bin/python -m jaxunlearn.main --config=$config --config.distributed=True$flags"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$setup && $run"
