#!/usr/bin/env bash
# Runs the whole test suite. Sets up .venv first if the Quick start has not (same install), and, when run
# as root on Debian (CI), starts the project's single-node SLURM cluster so the SLURM tests run for real,
# and installs Debian's chromium for the browser test (tests/browser.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# Install when .venv lacks masklet, or lacks a package pyproject.toml now names (dependencies or the test
# extra): a .venv made before a dependency was added would otherwise fail or skip tests for want of it.
installed() {
  .venv/bin/python - <<'PY' 2>/dev/null
import importlib.metadata as md, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    md.version(re.match(r"[A-Za-z0-9_.-]+", req).group())
PY
}
if [ ! -x .venv/bin/masklet ] || ! installed; then
  bash jobs/install.sh
fi

# Debian's chromium, once, quietly; the apt log is shown only when the install fails. Stale or empty package
# lists are the usual cause, so a failed install is retried once after `apt-get update`.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  echo "jobs/test.sh: installing chromium for the browser test (once)" >&2
  local apt_log
  apt_log=$(mktemp)
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >"$apt_log" 2>&1 ||
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
      >>"$apt_log" 2>&1; then
    rm -f "$apt_log"
    return 0
  fi
  cat "$apt_log" >&2
  rm -f "$apt_log"
  echo "jobs/test.sh: apt-get install chromium failed (log above)" >&2
  return 1
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if bash jobs/slurm/cluster.sh up; then
    export MASKLET_SLURM=1
  elif [ "${CI:-}" = "true" ]; then
    echo "jobs/test.sh: the SLURM cluster did not start; CI needs it for the SLURM tests" >&2
    exit 1
  fi
  if ! ensure_chromium && [ "${CI:-}" = "true" ]; then
    echo "jobs/test.sh: CI needs chromium for the browser test" >&2
    exit 1
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
