#!/usr/bin/env bash
# Reruns every theory-vs-experiment result and regenerates figures/ and validation/REPORT.md.
# The commands are those of validation/commands.txt (the report quotes that file verbatim).
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1
rm -f validation/coord/*.json validation/coord/*.md
bash -euo pipefail validation/commands.txt
