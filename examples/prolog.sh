#!/bin/bash
#
# Job prolog (run as root on each compute node before a job starts):
#  1. checks that the nnf-dm agent answers, and fails (so the WLM holds the
#     node) when it does not;
#  2. removes the completed operations that a previous job of the same user
#     left behind, so they do not count against the user's limit. Copies still
#     running are left alone: they may belong to the user's other jobs.
#
# The user is $SLURM_JOB_USER (Slurm) or the first argument.
# NNF_DM_MOUNT points at the control filesystem (default /run/nnf-dm).

set -u

mnt=${NNF_DM_MOUNT:-/run/nnf-dm}
user=${SLURM_JOB_USER:-${1:-}}

# `version` is served by the agent itself: an answer means it is up.
if ! cat "$mnt/version" > /dev/null 2>&1; then
    echo "prolog: the nnf-dm agent does not answer at $mnt" >&2
    exit 1
fi

[ -n "$user" ] || exit 0

for dir in "$mnt"/*/; do
    [ -d "$dir" ] || continue          # no operations: the glob stays as is
    dir=${dir%/}
    # Each operation's directory is owned by the user who asked for it.
    [ "$(stat -c %U "$dir" 2>/dev/null)" = "$user" ] || continue
    state=$(cat "$dir/state" 2>/dev/null) || continue
    if [ "$state" = completed ]; then
        rmdir "$dir" && echo "prolog: removed ${dir##*/}, left by a previous job of $user"
    fi
done
exit 0
