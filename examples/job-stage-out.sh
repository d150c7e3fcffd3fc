#!/bin/bash
#SBATCH --job-name=stage-out-example
#
# A batch job that stages its results out through the nnf-dm control files,
# with the shell's `echo` and `cat` only (no nnf-dm command needed):
#
#   sbatch job-stage-out.sh [RESULTS [DESTINATION]]
#
# RESULTS defaults to $DW_JOB_scratch/results (the job's Rabbit file system)
# or ./results; DESTINATION to /lus/global/$USER/results.<job id>.
# NNF_DM_MOUNT points at the control filesystem (default /run/nnf-dm).

set -u

mnt=${NNF_DM_MOUNT:-/run/nnf-dm}
job=${SLURM_JOB_ID:-${FLUX_JOB_ID:-${PBS_JOBID:-$$}}}
results=${1:-${DW_JOB_scratch:-$PWD}/results}
destination=${2:-/lus/global/$USER/results.$job}

# ... the job's real work goes here, writing into "$results" ...

# Names allow [A-Za-z0-9._-] only: PBS ids such as 123.server[4] need tidying.
name="stage-out-${job//[^A-Za-z0-9._-]/-}"

# The last line of `errors` says why the agent refused our request.
last_error() {
    local line last=""
    while IFS= read -r line; do last=$line; done < "$mnt/errors"
    echo "$last"
}

# One echo is one write(2): the request is checked and the copy created
# before echo returns. Quotes let the paths hold spaces.
if ! echo "name=$name source=\"$results\" destination=\"$destination\"" > "$mnt/request"; then
    echo "stage-out: request refused: $(last_error)" >&2
    exit 1
fi

# `wait` blocks until the copy completed, then reads like `status`.
if ! status=$(cat "$mnt/$name/wait"); then
    echo "stage-out: cannot wait for $name" >&2
    exit 1
fi

case $'\n'$status$'\n' in
*$'\n'status=success$'\n'*)
    echo "stage-out: $results copied to $destination"
    # Done: remove the record (a failed one is kept for a look at its status).
    rmdir "$mnt/$name"
    ;;
*)
    echo "stage-out: $name did not succeed; its status:" >&2
    echo "$status" >&2
    exit 1
    ;;
esac
