# shellcheck shell=bash
# Shared by the slurm/*.sh batch scripts (sourced, not run). See slurm/README.md.
#
# A training job's life (pn_train_job):
#   1. pre-flight check of config, data, layout and checkpoint dir (fail before the long work);
#   2. train.exit_duration_minutes from the job's time left minus PN_EXIT_MARGIN;
#   3. one srun task per node running megatron_pn.cli.launch (torchrun, c10d rendezvous);
#   4. the first SIGUSR1/SIGTERM the batch shell gets (--signal=B:USR1@..., scancel --batch,
#      scancel, preemption) is forwarded to the step as SIGUSR1: the trainer saves and stops;
#   5. stopped by SIGUSR1 or by the time limit, and not finished: scontrol requeue; the
#      requeued job resumes from checkpoint.dir;
#   6. failed (a node killed, frozen or cut off: torchrun, srun --kill-on-bad-exit and the
#      workers' heartbeats end every rank in bounded time) after saving a newer checkpoint than
#      the one it started from: requeued too. A failure with no progress is not: a crash that
#      repeats would loop.

# -- settings (environment variables; every one has a default) --------------------------------
: "${PN_EXIT_MARGIN:=600}"      # s before the time limit at which training saves and exits
: "${PN_STOP_TIMEOUT:=270}"     # s workers get to save after a stop signal (< --signal lead 300)
: "${PN_MAX_REQUEUES:=100}"     # give up requeueing after this many restarts
: "${PN_CONTAINER:=}"           # container image for srun --container-image (pyxis), optional
: "${PN_CONTAINER_MOUNTS:=}"    # --container-mounts (default: the repository)
: "${PN_SRUN_ARGS:=}"           # extra srun arguments for every step
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core TP overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1

PN_STOPPED_BY=""  # the first stop signal the batch shell received
PN_START_STEP=0   # the newest complete checkpoint when this job (re)started
PN_STEP_PID=""    # the running srun, while there is one

pn_die() { echo "pn: error: $*" >&2; exit 1; }
pn_log() { echo "pn: $(date '+%F %T') $*"; }

pn_wants_help() { [[ ${1:-} == -h || ${1:-} == --help ]]; }

# The comment block at the top of a script, as its --help.
pn_usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"; }

# The repository, the Python to run and the PATH for pn-* commands.
pn_init() {
    PN_PYTHON=${PN_PYTHON:-}
    if [[ -z $PN_PYTHON ]]; then
        if [[ -x $PN_REPO/.venv/bin/python && -z $PN_CONTAINER ]]; then
            PN_PYTHON=$PN_REPO/.venv/bin/python
        else
            PN_PYTHON=python3
        fi
    fi
    if [[ $PN_PYTHON == */* ]]; then  # its environment's pn-* commands first
        PATH="$(dirname "$PN_PYTHON"):$PATH"
        export PATH
    fi
    cd "$PN_REPO" || pn_die "cannot enter PN_REPO=$PN_REPO"
    PN_SRUN_FLAGS=()
    if [[ -n $PN_CONTAINER ]]; then
        PN_SRUN_FLAGS+=(--container-image="$PN_CONTAINER" --container-workdir="$PN_REPO"
                        --container-mounts="${PN_CONTAINER_MOUNTS:-$PN_REPO:$PN_REPO}")
    fi
    # shellcheck disable=SC2206  # PN_SRUN_ARGS is a list of words on purpose
    PN_SRUN_FLAGS+=($PN_SRUN_ARGS)
    pn_trap_stop_signals
    pn_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}" \
        "on ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-$(hostname)};" \
        "repo $PN_REPO; python $PN_PYTHON"
}

# -- signals ----------------------------------------------------------------------------------

pn_trap_stop_signals() {
    trap 'pn_on_stop_signal USR1' USR1
    trap 'pn_on_stop_signal TERM' TERM
}

# Forward only the first signal: a second one would interrupt torchrun's graceful shutdown.
pn_on_stop_signal() {
    [[ -n $PN_STOPPED_BY ]] && return
    PN_STOPPED_BY=$1
    pn_log "SIG$1 received: asking training to save a checkpoint and stop"
    [[ -n $PN_STEP_PID ]] && kill -USR1 "$PN_STEP_PID" 2>/dev/null
    return 0
}

# Run the command "$@" (an executable, so that $! is its pid) in the background and wait for
# it: bash runs traps only between commands, and `wait` is the command a trapped signal
# interrupts. Returns the command's exit status.
pn_run_step() {
    "$@" &
    PN_STEP_PID=$!
    local rc
    while :; do
        wait "$PN_STEP_PID"
        rc=$?
        # >128 with the step still alive: a trapped signal interrupted wait; keep waiting.
        (( rc > 128 )) && kill -0 "$PN_STEP_PID" 2>/dev/null && continue
        break
    done
    PN_STEP_PID=""
    return "$rc"
}

# -- steps ------------------------------------------------------------------------------------

# PN_CMD: "$@" as one srun task per node, holding all of the node's CPUs (and the GPUs the
# job requested per node).
pn_per_node() {
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    PN_CMD=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
            --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 --label
            "${PN_SRUN_FLAGS[@]}" "$@")
}

# A command run once: in the batch shell, or through srun when it needs the container.
pn_run_once() {
    if (( ${#PN_SRUN_FLAGS[@]} )); then
        srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
            "${PN_SRUN_FLAGS[@]}" "$@"
    else
        "$@"
    fi
}

# Training processes per node without GPUs: the tasks the job asked for on its first node
# (SLURM_TASKS_PER_NODE looks like "2(x3),1").
pn_cpu_procs() {
    local tasks=${SLURM_TASKS_PER_NODE:-1}
    echo "${tasks%%[(,]*}"
}

# Seconds until the job's time limit; fails when there is none.
pn_seconds_left() {
    if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then
        echo $(( SLURM_JOB_END_TIME - $(date +%s) ))
        return 0
    fi
    local left
    left=$(squeue -h -j "${SLURM_JOB_ID:?}" -o %L 2>/dev/null) || return 1
    pn_duration_seconds "$left"
}

# SLURM's [days-][hours:]minutes:seconds as seconds; fails on UNLIMITED, NOT_SET, INVALID.
pn_duration_seconds() {
    [[ $1 =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1
    local m=("${BASH_REMATCH[@]}")
    echo $(( 10#${m[2]:-0} * 86400 + 10#${m[4]:-0} * 3600 + 10#${m[5]} * 60 + 10#${m[6]} ))
}

# train.exit_duration_minutes for this job: stop PN_EXIT_MARGIN s before the time limit (half
# of the time left when that is shorter than twice the margin). Empty without a time limit.
pn_exit_minutes() {
    local left
    left=$(pn_seconds_left) || return 0
    local stop=$(( left > 2 * PN_EXIT_MARGIN ? left - PN_EXIT_MARGIN : left / 2 ))
    awk -v s="$stop" 'BEGIN { printf "%.2f\n", s / 60 }'
}

pn_near_time_limit() {
    local left
    left=$(pn_seconds_left) || return 1
    (( left <= PN_EXIT_MARGIN ))
}

# -- a training job ---------------------------------------------------------------------------

# pn_train_job CONFIG.yaml... [key=value ...]: pre-flight, train on all nodes, requeue if stopped.
pn_train_job() {
    local cpu_procs nodes=${SLURM_JOB_NUM_NODES:-1}
    cpu_procs=$(pn_cpu_procs)
    pn_log "pre-flight: $*"
    pn_run_once "$PN_PYTHON" -m megatron_pn.cli.preflight --nodes "$nodes" --cpu-procs "$cpu_procs" \
        --require-checkpoint-dir "$@" || pn_die "pre-flight check failed: nothing was started"
    read -r PN_START_STEP _ < <(pn_checkpoint_step "$@") || pn_die "cannot read checkpoint.dir"
    local limit=() minutes rc=0
    minutes=$(pn_exit_minutes)
    if [[ -n $minutes ]]; then
        limit=("train.exit_duration_minutes=$minutes")
        pn_log "training saves and stops by itself after $minutes minutes (time limit)"
    fi
    if [[ -z $PN_STOPPED_BY ]]; then
        # The job's own overrides come after ours: a user's train.exit_duration_minutes wins.
        pn_per_node "$PN_PYTHON" -m megatron_pn.cli.launch train --cpu-procs "$cpu_procs" \
            --stop-timeout "$PN_STOP_TIMEOUT" "$1" "${limit[@]}" "${@:2}"
        pn_run_step "${PN_CMD[@]}"
        rc=$?
        pn_log "training step ended with exit code $rc"
    else
        pn_log "stop signal before training started: not started"
    fi
    pn_requeue_if_stopped "$rc" "$@"
}

# "STEP STEPS": the run's newest complete checkpoint (0: none) and its train.steps.
pn_checkpoint_step() { pn_run_once "$PN_PYTHON" -m megatron_pn.cli.launch checkpoint-step "$@"; }

# Why training stopped before its end, when that may call for a requeue: SIGUSR1 (to this
# shell, or to the step only: the launcher then exits 128 + 10), the time limit
# (train.exit_duration_minutes), or a failure (requeued only after progress).
pn_stop_reason() {
    local rc=$1
    if [[ $PN_STOPPED_BY == USR1 ]]; then
        echo "SIGUSR1"
    elif [[ -n $PN_STOPPED_BY ]]; then
        return 0  # SIGTERM (forwarded to the step as SIGUSR1): see pn_requeue_if_stopped
    elif (( rc == 128 + 10 )); then
        echo "SIGUSR1 to the training step"
    elif (( rc == 0 )); then
        pn_near_time_limit && echo "the time limit"
    else
        echo "failure"  # 143 too: srun --kill-on-bad-exit's SIGTERM after another node failed
    fi
    return 0
}

# Requeue a run that a SIGUSR1, the time limit, or a failure after progress stopped before
# its end, and end the job there; else return the training's exit status. SIGTERM saves a
# checkpoint but requeues nothing: it comes from scancel (SLURM then refuses to start the job
# again), the hard time limit, or a preemption or `scontrol requeue`, after which SLURM
# requeues the job itself.
pn_requeue_if_stopped() {
    local rc=$1 reason step steps
    shift
    reason=$(pn_stop_reason "$rc")
    if [[ -z $reason ]]; then
        if [[ -n $PN_STOPPED_BY ]]; then
            pn_log "stopped by SIGTERM: not requeued here (SLURM requeues a job it preempts or" \
                "that scontrol requeue ends; after scancel, resubmit to resume)"
        elif (( rc == 0 )); then
            pn_log "done"
        fi
        return "$rc"
    fi
    if ! read -r step steps < <(pn_checkpoint_step "$@") || [[ -z $steps ]]; then
        pn_log "cannot read the checkpoint of the run: not requeued"
        return 1
    fi
    if (( step >= steps )); then
        pn_log "stopped by $reason after training finished (step $step): done"
        return 0
    fi
    if [[ $reason == failure ]]; then
        if (( step <= PN_START_STEP )); then
            pn_log "training failed (exit code $rc) with no checkpoint newer than step" \
                "$PN_START_STEP, where this job started: not requeued (resubmit to resume)"
            return "$rc"
        fi
        reason="a failure (exit code $rc) after progress (checkpoint step $PN_START_STEP -> $step)"
    fi
    local restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= PN_MAX_REQUEUES )); then
        pn_log "stopped by $reason, but already restarted $restarts times (PN_MAX_REQUEUES):" \
            "not requeued; resubmit to resume from the checkpoint"
        return 1
    fi
    pn_log "stopped by $reason with a checkpoint at step $step: requeueing job" \
        "$SLURM_JOB_ID (restart $(( restarts + 1 ))); it resumes from there"
    scontrol requeue "$SLURM_JOB_ID" || pn_die "scontrol requeue failed: resubmit to resume"
    exit 0
}

# -- data and specialization stages -----------------------------------------------------------

# pn_stage NAME DONE CMD...: run CMD once unless DONE exists. The tools write their outputs
# atomically (or DONE is written last), so an existing DONE means a finished stage: a requeued
# job skips what it already did.
pn_stage() {
    local name=$1 done=$2
    shift 2
    if [[ -e $done ]]; then
        pn_log "$name: done already ($done), skipped"
        return 0
    fi
    if (( ! ${#PN_SRUN_FLAGS[@]} )) && ! command -v "$1" >/dev/null; then
        pn_die "$name: command '$1' not found; install this repository's environment" \
            "(pip install -e .) or set PN_PYTHON to a Python that has it"
    fi
    pn_log "$name: $*"
    pn_run_once "$@" || pn_die "$name failed (exit code $?)"
}
