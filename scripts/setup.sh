#!/usr/bin/env bash
# Set up everything on a fresh machine, idempotently: .venv at the repository root holding
# torch (a CPU build unless one is already there: GPU users install their CUDA torch first)
# and this project with its demo and test extras, plus the Debian tools some features need.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools: git-lfs (publishing to git remotes), espeak-ng (spoken test clips), postgresql (the tests of
# scripts/search.py workers sharing a PostgreSQL study start a throwaway server; Debian keeps its programs off PATH).
missing=()
command -v git-lfs >/dev/null 2>&1 || missing+=(git-lfs)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: could not install ${missing[*]}; the features and tests that need them will be skipped" >&2
  else
    echo "setup: ${missing[*]} not found (install them for git publishing, spoken-clip and PostgreSQL tests)" >&2
  fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # torch first: the pinned version is the CPU build on these machines; any other request
  # would pull a multi-GB CUDA build. An existing torch (e.g. a CUDA one) is kept.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[demo,test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
