#!/usr/bin/env bash
# Create the virtual environment of one model's entrypoint tests, with the same
# packages its image installs:   containers/venv.sh MODEL [VENV_DIR]
#   1. torch (TORCH_SPEC, default torch==2.13.0)
#   2. containers/MODEL/requirements.txt            (pinned runtime dependencies)
#   3. containers/MODEL/requirements-nodeps.txt     (the model's own package, installed
#      without its declared dependencies, whose pins conflict; step 2 lists what it uses)
#   4. containers/MODEL/requirements-test.txt       (test-only packages the parity tests
#      need to run the authors' own inference; never installed in the image)
set -euo pipefail
model="${1:?usage: containers/venv.sh MODEL [VENV_DIR]}"
here="$(cd "$(dirname "$0")" && pwd -P)"  # -P: src/czb/containers is a link
dir="$here/$model"
venv="${2:-$here/../.venvs/$model}"
[ -d "$dir" ] || { echo "no such model folder: $dir" >&2; exit 2; }
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
[ -f "$dir/requirements.txt" ] && "${pip[@]}" -r "$dir/requirements.txt"
[ -f "$dir/requirements-nodeps.txt" ] && "${pip[@]}" --no-deps -r "$dir/requirements-nodeps.txt"
[ -f "$dir/requirements-test.txt" ] && "${pip[@]}" -r "$dir/requirements-test.txt"
"${pip[@]}" pytest
echo "$venv"
