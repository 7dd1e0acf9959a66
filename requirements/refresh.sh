#!/usr/bin/env bash
# Rewrite requirements/lock.txt: the exact versions README command 2 and CI install.
#
# Installs torch and the `all` and `test` extras into a new virtualenv WITHOUT the lock (so pip resolves
# today's releases inside pyproject.toml's ranges), runs the test suite there unless --no-test is given, and
# only when it passes writes that environment's versions to requirements/lock.txt. Review the diff and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
run_tests=1
[ "${1:-}" = "--no-test" ] && run_tests=0
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
pip="$work/venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
"$pip" install -q torch==2.13.0
"$pip" install -q -e ".[all,test]"
if [ "$run_tests" = 1 ]; then
    "$work/venv/bin/python" -m pytest -q -n 2 --dist loadfile
fi
{
    echo "# The versions the test suite passed with; written by requirements/refresh.sh on $(date -u +%F)."
    echo "# Used as a constraints file (pip install -c requirements/lock.txt ...): it pins what gets installed"
    echo "# without adding anything. The local build tag of torch (+cpu, +cu130) is dropped so that any build"
    echo "# of the pinned version satisfies it."
    "$pip" freeze --exclude-editable --all | grep -v -i -E '^(fpedit|pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)"
