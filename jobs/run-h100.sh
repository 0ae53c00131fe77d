#!/usr/bin/env bash
# Submit a manifest as a SLURM job array with the cluster profile configs/clusters/h100.yaml.
# Usage: jobs/run-h100.sh MANIFEST OUT [--config CONFIG.yaml] [--wait] [key.sub=value ...]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MANIFEST OUT [--config CONFIG.yaml] [--wait] [key.sub=value ...]" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/.venv/bin/masklet" run --profile h100 --manifest "$1" --out "$2" "${@:3}"
