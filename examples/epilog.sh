#!/bin/bash
#
# Job epilog (run as root on each compute node after a job ends): waits for
# every copy on the node (root sees all operations), at most
# NNF_DM_EPILOG_TIMEOUT seconds (default 600) each, reports the copies that
# failed or did not finish, and removes the completed ones.
#
# It always exits 0: a failed copy is the job's problem, not the node's, and
# a failing epilog would take the node out of service. The report goes to
# stderr, which the WLM logs.
# NNF_DM_MOUNT points at the control filesystem (default /run/nnf-dm).

set -u

mnt=${NNF_DM_MOUNT:-/run/nnf-dm}
limit=${NNF_DM_EPILOG_TIMEOUT:-600}

# The value of $2 in the key=value lines of $1.
field() {
    local line
    while IFS= read -r line; do
        case $line in "$2="*) echo "${line#*=}"; return ;; esac
    done <<< "$1"
}

for dir in "$mnt"/*/; do
    [ -d "$dir" ] || continue          # no operations: the glob stays as is
    dir=${dir%/}
    name=${dir##*/}
    # `wait` blocks until the copy completes; `timeout` bounds that (a
    # blocked read ends within a second of the signal).
    status=$(timeout "$limit" cat "$dir/wait" 2>/dev/null)
    rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "epilog: $name still $(cat "$dir/state" 2>/dev/null) after ${limit}s; left in place" >&2
        continue
    elif [ "$rc" -ne 0 ]; then
        continue                       # removed meanwhile, or unreadable
    fi
    result=$(field "$status" status)
    if [ "$result" != success ]; then
        echo "epilog: $name $result: $(field "$status" message)" >&2
    fi
    rmdir "$dir"
done
exit 0
