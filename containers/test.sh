#!/usr/bin/env bash
# Run every model's entrypoint tests in that model's own virtual environment
# (made by containers/venv.sh; made here when missing).   containers/test.sh [MODEL...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd -P)"
root="$(cd "$here/.." && pwd)"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    for dir in "$here"/*/; do
        [ -f "$dir/test_entrypoint.py" ] && models+=("$(basename "$dir")")
    done
fi
status=0
for model in "${models[@]}"; do
    venv="$root/.venvs/$model"
    [ -x "$venv/bin/python" ] || bash "$here/venv.sh" "$model" "$venv" >/dev/null
    echo "== $model"
    (cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "containers/$model") || status=1
done
exit $status
