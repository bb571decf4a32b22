#!/usr/bin/env bash
# Lint and format checks with OpenMMLab's set of tools (settings: setup.cfg;
# versions: requirements/lint.txt, the same as .pre-commit-config.yaml).
#
#   bash tools/lint.sh          # check only: exit 1 if any tool objects
#   bash tools/lint.sh --fix    # apply isort, yapf and docformatter, then
#                               # check (flake8/codespell findings left to fix
#                               # by hand)
#
# Install the tools with: pip install -r requirements/lint.txt
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FIX=0
case "${1:-}" in
    --fix) FIX=1 ;;
    '') ;;
    *) echo "usage: bash tools/lint.sh [--fix]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python}
# Python sources checked (configs are checked by flake8/isort/yapf too, but
# docformatter leaves them alone: their docstrings are few and short).
PATHS=(mmdyn tools tests benchmarks configs setup.py docs/conf.py)
DOC_PATHS=(mmdyn tools tests benchmarks)

# (codespell's module is codespell_lib)
for module in flake8 isort yapf codespell_lib docformatter; do
    "$PYTHON" -m "$module" --version >/dev/null 2>&1 || {
        echo "lint: ${module%_lib} is not installed (pip install -r requirements/lint.txt)" >&2
        exit 2
    }
done

if [ "$FIX" = 1 ]; then
    echo "== isort (fix)"
    "$PYTHON" -m isort "${PATHS[@]}"
    echo "== yapf (fix)"
    "$PYTHON" -m yapf --in-place --recursive --parallel \
        --exclude 'mmdyn/.mim/*' --exclude 'docs/_build/*' "${PATHS[@]}"
    echo "== docformatter (fix)"
    "$PYTHON" -m docformatter --in-place --recursive --config setup.cfg \
        "${DOC_PATHS[@]}" --exclude .mim _build
    # docformatter exits 3 after changing files: not an error here.
fi

failed=()
run() {
    local name=$1; shift
    echo "== $name"
    "$@" || failed+=("$name")
}
run flake8 "$PYTHON" -m flake8 "${PATHS[@]}"
run isort "$PYTHON" -m isort --check-only --diff "${PATHS[@]}"
run yapf "$PYTHON" -m yapf --diff --recursive --parallel \
    --exclude 'mmdyn/.mim/*' --exclude 'docs/_build/*' "${PATHS[@]}"
run codespell "$PYTHON" -m codespell_lib mmdyn tools tests benchmarks configs docs \
    README.md CHANGELOG.md setup.py
run docformatter "$PYTHON" -m docformatter --check --recursive --config setup.cfg \
    "${DOC_PATHS[@]}" --exclude .mim _build

if [ ${#failed[@]} -gt 0 ]; then
    echo "lint: failed: ${failed[*]} (bash tools/lint.sh --fix applies isort, yapf and docformatter)" >&2
    exit 1
fi
echo "lint: clean"
