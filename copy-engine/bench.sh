#!/bin/sh
# Engine vs cp -a vs rsync -a on three trees; prints a markdown table.
# BENCH_DIR picks the filesystem to test (default /var/tmp).
set -eu
cd "$(dirname "$0")/.."
command -v rsync >/dev/null || { echo "rsync not installed (apt-get install -y rsync)" >&2; exit 1; }
dir=${BENCH_DIR:-/var/tmp}
echo "nproc: $(nproc)"
echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
echo "filesystem: $(df -T "$dir" | awk 'NR==2 {print $2}') ($dir)"
echo "kernel: $(uname -r)"
echo "cp: $(cp --version | head -1); rsync: $(rsync --version | head -1)"
echo
exec cargo bench -p copy-engine --bench tree
