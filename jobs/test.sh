#!/usr/bin/env bash
# Runs the whole test suite. Sets up .venv first if the Quick start has not (same install), and, when run
# as root on Debian (CI), starts the project's single-node SLURM cluster so the SLURM tests run for real.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/masklet ]; then
  bash jobs/install.sh
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if bash jobs/slurm/cluster.sh up; then
    export MASKLET_SLURM=1
  elif [ "${CI:-}" = "true" ]; then
    echo "jobs/test.sh: the SLURM cluster did not start; CI needs it for the SLURM tests" >&2
    exit 1
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
