#!/bin/sh
# Engine vs cp -a vs xcp on three trees; prints a markdown table.
# BENCH_DIR picks the filesystem to test (default /var/tmp); XCP the xcp
# binary (default: xcp on PATH; `cargo install xcp`).
set -eu
cd "$(dirname "$0")/.."
xcp=${XCP:-xcp}
command -v "$xcp" >/dev/null || { echo "xcp not installed (cargo install xcp, or set XCP)" >&2; exit 1; }
dir=${BENCH_DIR:-/var/tmp}
echo "nproc: $(nproc)"
echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
echo "filesystem: $(df -T "$dir" | awk 'NR==2 {print $2}') ($dir)"
echo "kernel: $(uname -r)"
echo "cp: $(cp --version | head -1); xcp: $("$xcp" --version)"
echo
exec cargo bench -p copy-engine --bench tree
