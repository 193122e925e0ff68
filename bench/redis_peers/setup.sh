#!/usr/bin/env bash
# Creates one venv per Redis peer under .bench-venvs/ (git-ignored), each from its pinned
# requirements/<peer>.txt: the peers cannot share one (arq >= 0.26 pins redis<6, saq redis<8).
#
#     bench/redis_peers/setup.sh [peer ...]        # default: all of them
#     PYTHON=python3.11 bench/redis_peers/setup.sh # the interpreter the venvs are made from
#
# A venv whose requirements file is unchanged is kept; bench/test_bench_redis.py runs this
# script itself when a venv is missing or stale.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venvs="${BENCH_VENVS:-$root/.bench-venvs}"
python="${PYTHON:-python3}"
peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
    peers=(rq arq saq dramatiq huey)
fi
mkdir -p "$venvs"
for peer in "${peers[@]}"; do
    requirements="$here/requirements/$peer.txt"
    if [ ! -f "$requirements" ]; then
        echo "setup.sh: no pinned requirements for '$peer' ($requirements)" >&2
        exit 2
    fi
    venv="$venvs/$peer"
    if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/.requirements.txt"; then
        continue
    fi
    echo "setup.sh: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/.requirements.txt"
done
