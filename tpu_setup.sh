#!/usr/bin/env bash
# tpu_setup.sh: Cloud TPU VMs and pod slices for dalle_jax, driven from your own machine through gcloud.
#
#   create -> copy -> install -> run -- dalle-jax ... -> logs -> stop -> delete
#
# A pod slice is several hosts ("workers"), and JAX's multi-controller model wants the same program started
# on each of them, so every remote step runs one shell line on all workers at once (gcloud's --worker=all).
# `./tpu_setup.sh --help` explains everything; `--dry-run` prints the commands instead of running them.
#
# Portable to bash 3.2 (macOS's /bin/bash), where many people run gcloud: no associative arrays, no ${x,,},
# and arrays that may be empty are never expanded bare under `set -u`.
set -euo pipefail

readonly LOG_DIR=dalle_jax_logs           # on every worker, under $HOME: one <UTC time>.log/.pid per run
readonly UPLOAD=dalle_jax_upload.tar.gz   # the copied tarball's name on every worker, under $HOME
readonly COMMANDS="create copy install run logs stop ssh delete"
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

usage() {
  cat <<'EOF'
Usage: ./tpu_setup.sh [--dry-run] <command> [flags] [-- CMD...]

Creates a Cloud TPU VM or pod slice, puts this checkout on every worker, installs it into a virtual
environment there and starts dalle-jax on all workers at once. Runs on your machine and needs the Google
Cloud CLI (gcloud), logged in (gcloud auth login), with a project (gcloud config set project P, or --project).

Commands, in the order you use them:
  create    create the TPU VM / slice; with --queued as a queued resource NAME-qr, then wait until it is ACTIVE
  copy      upload this checkout (without .git, runs/, venvs and caches) to ~/dalle_jax on every worker;
            a worker's ~/dalle_jax/runs is kept. With --pull URL: git clone URL there instead
  install   on every worker: a Python 3.11 venv ~/dalle_jax_venv (uv-managed unless --python), then
            pip install -r requirements.txt -e ".[tpu]" (exact pins), then a check that JAX sees the TPU:
            each worker prints its process index, local and global device count
  run       run -- CMD...: start CMD on every worker at the same moment, in ~/dalle_jax with the venv active,
            under setsid + nohup, output to ~/dalle_jax_logs/<UTC time>.log on each worker. Several words are
            quoted one by one; a single word is shell code ('a && b' runs both). --foreground streams instead
  logs      print the end of the newest log of every worker (or of --worker N); --follow keeps streaming
  stop      SIGTERM to the newest run's process group on every worker. dalle-jax trainers then save a
            checkpoint and exit (on a multi-host slice only once the program has called
            jax.distributed.initialize(), which runs JAX's preemption sync); the same command resumes
  ssh       an interactive shell on worker 0 (or --worker N); ssh -- CMD... runs CMD there instead
  delete    delete the TPU VM, without asking (--quiet); with --queued also its queued resource NAME-qr

Flags; each has an environment variable, and a flag given on the command line wins:
  --name NAME          TPU_NAME        TPU VM name: lowercase letters, digits, '-', at most 60 (every command)
  --zone ZONE          TPU_ZONE        every command, e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --type TYPE          TPU_TYPE        accelerator type, for create: v4-8, v4-32, v5litepod-8, v5p-128, v6e-8
                                       (--accelerator-type is the same flag)
  --version V          TPU_VERSION     TPU software (runtime) version, for create; default by family:
                                       v2, v3, v4: tpu-ubuntu2204-base   v5litepod (v5e): v2-alpha-tpuv5-lite
                                       v5p: v2-alpha-tpuv5               v6e: v2-alpha-tpuv6e
                                       (--runtime-version is the same flag)
  --project P          TPU_PROJECT     GCP project for every gcloud call (default: gcloud's configured project)
  --queued             QUEUED=1        create and delete through a queued resource NAME-qr: how large slices
                                       and spot capacity are usually granted
  --spot               SPOT=1          spot capacity: much cheaper, can be taken back at any moment
                                       (trainers save on SIGTERM; run the same command again to resume)
  --timeout SECONDS    TPU_TIMEOUT     how long create --queued waits for ACTIVE (default 3600;
                                       TPU_POLL seconds between checks, default 30)
  --pull URL           REPO_URL        copy: git clone URL on every worker instead of uploading this checkout
  --ref REF            REPO_REF        with --pull: the commit, tag or origin/<branch> to check out
                                       (default origin/HEAD, the remote's default branch)
  --remote-dir DIR     TPU_REMOTE_DIR  where the code lives on each worker, relative to home (default dalle_jax)
  --venv DIR           TPU_VENV        the venv on each worker, relative to home (default dalle_jax_venv)
  --python PY          TPU_PYTHON      install: make the venv with this Python (3.11 or newer) instead of
                                       fetching 3.11 with uv (TPU images' Ubuntu 22.04 ships 3.10)
  --worker N|all       TPU_WORKER      logs, stop, ssh: which worker (default: all for logs and stop, 0 for ssh)
  --foreground         FOREGROUND=1    run: stream every worker's output (still saved to the log) and wait
  --no-distributed     DISTRIBUTED=0   run: leave DALLE_JAX_DISTRIBUTED unset. By default run exports
                                       DALLE_JAX_DISTRIBUTED=1, so dalle-jax calls jax.distributed.initialize()
                                       and the workers of a pod slice find each other (harmless on one host)
  --follow             FOLLOW=1        logs: keep streaming (tail -F) until Ctrl-C
  --lines N            TPU_LOG_LINES   logs: how many lines (default 50)
  --dry-run            DRY_RUN=1       print every command, one per line, '+ ' and shell-quoted so it can be
                                       pasted, and run nothing: no network access, gcloud need not be installed
  -h, --help                           this text
Flags may come before or after the command, never after '--' (that belongs to CMD).

Multi-host JAX. A slice larger than one host (v4-16 and up, v5p-16 and up, v5litepod-16 and up) runs one
process per worker, and `run` starts the same command on all of them. The program calls
jax.distributed.initialize() once, before any other JAX work; on TPU VMs it takes no arguments: the
coordinator address, the process count and this process's id come from the TPU metadata, and
jax.device_count() then counts every device of the slice. So no coordinator variables are exported (see
docs/tpu.md for dalle-jax's status). `run` sets only JAX_PLATFORMS=tpu (fail loudly instead of falling back
to the host CPU when the TPU cannot be opened, e.g. while an earlier run still holds it: `stop` it first)
and PYTHONUNBUFFERED=1 (logs show progress as it happens). Add more with `run -- env NAME=VALUE dalle-jax ...`.
Every worker must see the same data and run paths: copy the data to each, or mount one bucket on all.

Slice names: v2, v3, v4 and v5p count TensorCores (2 per chip, 4 chips per host): v4-32 = 16 chips on 4
workers, v4-256 = 128 chips on 32 workers. v5litepod (v5e) and v6e count chips: v5litepod-8 = 8 chips, 1 worker.

Examples:
  # demo (or bench) on one v5e host: v5litepod-8, 8 chips, 1 worker, data parallel over 8 chips
  export TPU_NAME=dalle-demo TPU_ZONE=us-west4-a TPU_TYPE=v5litepod-8
  ./tpu_setup.sh create && ./tpu_setup.sh copy && ./tpu_setup.sh install
  ./tpu_setup.sh run -- 'dalle-jax train-dvae --run runs/demo --preset demo &&
    dalle-jax tokenizer train --data runs/demo/data --out runs/demo/tokenizer.json --vocab-size 512 \
      --text-len 24 && dalle-jax encode --run runs/demo &&
    dalle-jax train-prior --data runs/demo/tokens --out runs/demo --preset demo'
  ./tpu_setup.sh logs --follow
  ./tpu_setup.sh delete

  # the 1b preset on 16 chips / 4 workers, FSDP over all 16, bf16 compute with remat to fit activations:
  # v4-32 (32 GiB per chip) or v5p-32 (95 GiB; TPU_TYPE=v5p-32 TPU_ZONE=us-east5-a)
  export TPU_NAME=dalle-1b TPU_ZONE=us-central2-b TPU_TYPE=v4-32
  ./tpu_setup.sh create --queued && ./tpu_setup.sh copy && ./tpu_setup.sh install
  ./tpu_setup.sh run -- dalle-jax train-prior --preset 1b --data DATA --out RUN \
    --set mesh.ici_parallelism=1,16,1 --set prior.compute_dtype=bfloat16 --set prior.remat=full
  ./tpu_setup.sh logs --worker 0
  ./tpu_setup.sh delete --queued

  # paper_12b on 128 chips / 32 workers: v4-256 or v5p-256, FSDP over all 128 chips (d_model 3968 = 2^7 x 31
  # divides by 128; a 256-chip slice such as v4-512 needs a tensor axis, e.g. 2,64,2)
  dalle-jax info --preset paper_12b --devices 128 --set mesh.ici_parallelism=1,128,1   # per-chip state first
  ./tpu_setup.sh create --name dalle-12b --zone us-central2-b --type v4-256 --queued --spot --timeout 86400
  ./tpu_setup.sh copy --name dalle-12b --zone us-central2-b --pull https://github.com/OWNER/dalle_jax --ref v0.1
  ./tpu_setup.sh install --name dalle-12b --zone us-central2-b
  ./tpu_setup.sh run --name dalle-12b --zone us-central2-b -- dalle-jax train-prior --preset paper_12b \
    --data DATA --out RUN --set mesh.ici_parallelism=1,128,1
  ./tpu_setup.sh --dry-run delete --name dalle-12b --zone us-central2-b --queued   # look, then run it

Exit status: 0 done; 2 usage error (unknown command or flag, a missing or malformed value: the message names
it and its variable); anything else is the status of the command that failed.
EOF
}

# ------------------------------------------------------------------------------------------------------
# Messages and small helpers

usage_error() {
  echo "tpu_setup.sh: error: $*" >&2
  echo "see ./tpu_setup.sh --help" >&2
  exit 2
}

die() {
  echo "tpu_setup.sh: error: $*" >&2
  exit 1
}

warn() {
  echo "tpu_setup.sh: warning: $*" >&2
}

note() {
  echo "tpu_setup.sh: $*" >&2
}

is_true() {
  case ${1:-} in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    *) return 1 ;;
  esac
}

# shell_quote WORD: WORD as a shell reads it back as one word; plain words stay bare so output is readable.
shell_quote() {
  local word=$1 safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
    return
  fi
  # Inside single quotes nothing is special except the quote itself, written as '\''.
  local rest=$word quoted="'"
  while [[ $rest == *"'"* ]]; do
    quoted+="${rest%%\'*}'\\''"
    rest=${rest#*\'}
  done
  printf '%s' "$quoted$rest'"
}

# quote_words WORD...: the words shell-quoted and joined by spaces, i.e. a command line that can be pasted.
quote_words() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# user_code WORD...: the user's command as shell code. One word is taken as code already (like ssh does),
# so `run -- 'a && b'` works; several words are quoted one by one, so arguments with spaces survive.
user_code() {
  if (($# == 1)); then
    printf '%s' "$1"
  else
    quote_words "$@"
  fi
}

# remote_path DIR: DIR under the remote home, written so that the remote shell expands the tilde. Only
# validated names (no spaces, no quotes) reach here, so the result needs no quoting.
remote_path() {
  printf '%s/%s' '~' "$1"
}

# ------------------------------------------------------------------------------------------------------
# Running commands: everything that acts goes through these two, so --dry-run covers all of it.

# execute CMD...: print CMD ('+ ', quoted) and run it; in a dry run print it on stdout and run nothing.
execute() {
  if is_true "$DRY_RUN"; then
    echo "+ $(quote_words "$@")"
    return 0
  fi
  echo "+ $(quote_words "$@")" >&2
  "$@"
}

# gcloud_cmd ARGS...: one gcloud call, with --project appended when one was given.
gcloud_cmd() {
  local -a cmd=(gcloud "$@")
  if [[ -n $TPU_PROJECT ]]; then
    cmd+=(--project "$TPU_PROJECT")
  fi
  execute "${cmd[@]}"
}

# on_workers WORKER PART...: run one shell line, the parts joined by spaces, on a worker (a number) or on
# all of them. gcloud hands the line to the worker's login shell (bash on the TPU images).
on_workers() {
  local worker=$1
  shift
  gcloud_cmd compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" --worker="$worker" --command "$*"
}

# ------------------------------------------------------------------------------------------------------
# Settings: environment first, flags override (parse_args runs after these lines).

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_TYPE=${TPU_TYPE:-}
TPU_VERSION=${TPU_VERSION:-}
TPU_PROJECT=${TPU_PROJECT:-}
QUEUED=${QUEUED:-0}
SPOT=${SPOT:-0}
TPU_TIMEOUT=${TPU_TIMEOUT:-3600}
TPU_POLL=${TPU_POLL:-30}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-origin/HEAD}
TPU_REMOTE_DIR=${TPU_REMOTE_DIR:-dalle_jax}
TPU_VENV=${TPU_VENV:-dalle_jax_venv}
TPU_PYTHON=${TPU_PYTHON:-}
TPU_WORKER=${TPU_WORKER:-}
FOREGROUND=${FOREGROUND:-0}
DISTRIBUTED=${DISTRIBUTED:-1}
FOLLOW=${FOLLOW:-0}
TPU_LOG_LINES=${TPU_LOG_LINES:-50}
DRY_RUN=${DRY_RUN:-0}
COMMAND=""
USER_CMD=()
UPLOAD_TMP=""

# set_value FLAG VALUE: the variable behind a flag that takes a value.
set_value() {
  case $1 in
    --name) TPU_NAME=$2 ;;
    --zone) TPU_ZONE=$2 ;;
    --type | --accelerator-type) TPU_TYPE=$2 ;;
    --version | --runtime-version) TPU_VERSION=$2 ;;
    --project) TPU_PROJECT=$2 ;;
    --timeout) TPU_TIMEOUT=$2 ;;
    --pull) REPO_URL=$2 ;;
    --ref) REPO_REF=$2 ;;
    --remote-dir) TPU_REMOTE_DIR=$2 ;;
    --venv) TPU_VENV=$2 ;;
    --python) TPU_PYTHON=$2 ;;
    --worker) TPU_WORKER=$2 ;;
    --lines) TPU_LOG_LINES=$2 ;;
    *) return 1 ;;
  esac
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --foreground) FOREGROUND=1 ;;
      --no-distributed) DISTRIBUTED=0 ;;
      --follow) FOLLOW=1 ;;
      --)
        shift
        USER_CMD=("$@")
        return
        ;;
      --*=*)
        set_value "${1%%=*}" "${1#*=}" || usage_error "unknown flag ${1%%=*}"
        ;;
      -*)
        # A value flag: check that it is one before looking for its value, so typos are named as such.
        set_value "$1" "" || usage_error "unknown flag $1"
        (($# >= 2)) || usage_error "$1 needs a value"
        set_value "$1" "$2"
        shift
        ;;
      *)
        if [[ -n $COMMAND ]]; then
          usage_error "unexpected argument '$1' (the command for run or ssh goes after --)"
        fi
        COMMAND=$1
        ;;
    esac
    shift
  done
}

# ------------------------------------------------------------------------------------------------------
# Validation. Usage errors exit 2 and name the flag and its variable.

require() {
  local missing="" pair variable
  for pair in "$@"; do  # each "FLAG:VARIABLE"
    variable=${pair#*:}
    if [[ -z ${!variable} ]]; then
      missing+="${missing:+, }${pair%%:*} (or ${pair#*:})"
    fi
  done
  [[ -z $missing ]] || usage_error "$COMMAND needs $missing"
}

check_name() {
  local valid='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  if ! [[ $TPU_NAME =~ $valid ]] || ((${#TPU_NAME} > 60)); then
    usage_error "--name '$TPU_NAME' (TPU_NAME): use lowercase letters, digits and '-', start with a letter," \
      "end with a letter or digit, at most 60 characters (the queued resource adds -qr)"
  fi
}

check_zone() {
  local zone_like='^[a-z]+-[a-z]+[0-9]+-[a-z]$'
  [[ $TPU_ZONE =~ $zone_like ]] || warn "--zone '$TPU_ZONE' does not look like a zone such as us-central2-b"
}

# check_remote_dir FLAG VARIABLE VALUE: a plain path under home. copy empties the code directory, so home
# itself, absolute paths and '..' are refused; safe characters only, because the paths go unquoted into
# remote shell lines (to let the tilde expand there).
check_remote_dir() {
  local plain='^[A-Za-z0-9_][A-Za-z0-9_./-]*$'
  if ! [[ $3 =~ $plain ]] || [[ /$3/ == */../* || /$3/ == */./* ]]; then
    usage_error "$1 '$3' ($2): a directory under the remote home, e.g. dalle_jax (letters, digits, _ . - /; no '..')"
  fi
}

check_number() {
  local digits='^[0-9]+$'
  [[ $3 =~ $digits ]] || usage_error "$1 '$3' ($2) must be a whole number"
}

check_worker() {
  local digits='^[0-9]+$'
  [[ $TPU_WORKER == all || $TPU_WORKER =~ $digits ]] ||
    usage_error "--worker '$TPU_WORKER' (TPU_WORKER): a number or 'all'"
}

# default_version FAMILY: the runtime version that family's documentation recommends for JAX.
default_version() {
  case $1 in
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# check_type: TYPE must be FAMILY-SIZE. Unknown families only warn (new generations appear before this
# script knows them), but then the runtime version has to be given.
check_type() {
  local shape='^([a-z0-9]+)-([0-9]+)$' family
  [[ $TPU_TYPE =~ $shape ]] || usage_error "--type '$TPU_TYPE' (TPU_TYPE) is not FAMILY-SIZE such as v4-8," \
    "v5litepod-16, v5p-128 or v6e-8"
  family=${BASH_REMATCH[1]}
  case $family in
    v2 | v3 | v4 | v5litepod | v5p | v6e) ;;
    v5e)
      warn "gcloud names v5e slices v5litepod-N (e.g. v5litepod-${BASH_REMATCH[2]}); passing '$TPU_TYPE' on unchanged"
      ;;
    *)
      warn "unknown TPU family '$family' in '$TPU_TYPE' (known: v2 v3 v4 v5litepod v5p v6e); passing it on unchanged"
      ;;
  esac
  if [[ -z $TPU_VERSION ]]; then
    TPU_VERSION=$(default_version "$family") ||
      usage_error "no default runtime version for '$family': pass --version (or TPU_VERSION)"
    note "runtime version $TPU_VERSION (the default for $family; --version to change)"
  fi
}

validate() {
  case " $COMMANDS " in
    *" $COMMAND "*) ;;
    *) usage_error "unknown command '$COMMAND' (commands: $COMMANDS)" ;;
  esac
  if [[ $COMMAND == create ]]; then
    require --name:TPU_NAME --zone:TPU_ZONE --type:TPU_TYPE
    check_type
    check_number --timeout TPU_TIMEOUT "$TPU_TIMEOUT"
    check_number TPU_POLL TPU_POLL "$TPU_POLL"
  else
    require --name:TPU_NAME --zone:TPU_ZONE
  fi
  check_name
  check_zone
  check_remote_dir --remote-dir TPU_REMOTE_DIR "$TPU_REMOTE_DIR"
  check_remote_dir --venv TPU_VENV "$TPU_VENV"
  check_number --lines TPU_LOG_LINES "$TPU_LOG_LINES"
  [[ -z $TPU_WORKER ]] || check_worker
  if [[ $COMMAND == run && ${#USER_CMD[@]} -eq 0 ]]; then
    usage_error "run needs the command to start after --, e.g. run -- dalle-jax train-prior ..."
  fi
  if [[ ${#USER_CMD[@]} -gt 0 && $COMMAND != run && $COMMAND != ssh ]]; then
    usage_error "$COMMAND takes no command after -- (only run and ssh do)"
  fi
}

# ------------------------------------------------------------------------------------------------------
# Commands

queued_resource() {
  printf '%s-qr' "$TPU_NAME"
}

cmd_create() {
  local -a spot=()
  if is_true "$SPOT"; then
    spot=(--spot)
  fi
  if ! is_true "$QUEUED"; then
    gcloud_cmd compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" --accelerator-type "$TPU_TYPE" \
      --version "$TPU_VERSION" ${spot[@]+"${spot[@]}"}
  else
    gcloud_cmd compute tpus queued-resources create "$(queued_resource)" --node-id "$TPU_NAME" \
      --zone "$TPU_ZONE" --accelerator-type "$TPU_TYPE" --runtime-version "$TPU_VERSION" ${spot[@]+"${spot[@]}"}
    wait_until_active
  fi
  note "next: ./tpu_setup.sh copy, then ./tpu_setup.sh install (same --name/--zone)"
}

# A queued resource is granted when capacity frees up, which can take minutes or days; poll its state.
wait_until_active() {
  local -a describe=(compute tpus queued-resources describe "$(queued_resource)" --zone "$TPU_ZONE"
    "--format=value(state.state)")
  if is_true "$DRY_RUN"; then
    gcloud_cmd "${describe[@]}"
    note "dry run: would repeat that every ${TPU_POLL} s until the state is ACTIVE, for at most ${TPU_TIMEOUT} s"
    return 0
  fi
  local deadline=$((SECONDS + TPU_TIMEOUT)) state
  while true; do
    # A failed describe (a network blip) is not the end of a days-long wait: report it and poll again.
    state=$(gcloud_cmd "${describe[@]}") || state="unknown (describe failed)"
    case $state in
      ACTIVE)
        note "$(queued_resource) is ACTIVE"
        return 0
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "$(queued_resource) is $state; see: gcloud compute tpus queued-resources describe" \
          "$(queued_resource) --zone $TPU_ZONE"
        ;;
    esac
    if ((SECONDS >= deadline)); then
      die "$(queued_resource) still '$state' after ${TPU_TIMEOUT} s; it stays queued: wait again with" \
        "gcloud compute tpus queued-resources describe, or ./tpu_setup.sh delete --queued"
    fi
    note "$(queued_resource) is '$state'; checking again in ${TPU_POLL} s"
    sleep "$TPU_POLL"
  done
}

cmd_copy() {
  local dir
  dir=$(remote_path "$TPU_REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    # Every worker clones for itself (no upload from a slow laptop link); --ref pins them to one commit.
    on_workers all "set -e; if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin;" \
    "else git clone --quiet $(shell_quote "$REPO_URL") $dir; fi;" \
    "git -C $dir checkout --quiet --detach $(shell_quote "$REPO_REF");" \
    "echo \"\$(hostname): $dir at \$(git -C $dir rev-parse --short HEAD)\""
    return
  fi
  [[ -f $SCRIPT_DIR/setup.cfg ]] || die "$SCRIPT_DIR is not a dalle_jax checkout (no setup.cfg)"
  # One tarball instead of scp --recurse: a single transfer per worker, and the exclusions are exact. tar
  # (not git archive) so that uncommitted edits travel too. COPYFILE_DISABLE keeps macOS's tar from adding
  # ._ resource-fork files.
  export COPYFILE_DISABLE=1
  if is_true "$DRY_RUN"; then
    UPLOAD_TMP="${TMPDIR:-/tmp}/dalle_jax_upload.XXXXXX"
  else
    UPLOAD_TMP=$(mktemp "${TMPDIR:-/tmp}/dalle_jax_upload.XXXXXX")
    trap 'rm -f "$UPLOAD_TMP"' EXIT
  fi
  execute tar --exclude=./.git --exclude=./runs --exclude=./.venv --exclude=./venv --exclude=./build \
    --exclude=./dist --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
    -czf "$UPLOAD_TMP" -C "$SCRIPT_DIR" .
  gcloud_cmd compute tpus tpu-vm scp "$UPLOAD_TMP" "$TPU_NAME:$UPLOAD" --zone "$TPU_ZONE" --worker=all
  # Empty the old tree first so files deleted here do not linger there, but keep runs/: on the workers it
  # holds checkpoints and datasets that exist nowhere else.
  on_workers all "set -e; mkdir -p $dir; find $dir -mindepth 1 -maxdepth 1 ! -name runs -exec rm -rf {} +;" \
    "tar -xzf ~/$UPLOAD -C $dir; rm -f ~/$UPLOAD; echo \"\$(hostname): $dir updated\""
}

cmd_install() {
  local dir venv make_venv check
  dir=$(remote_path "$TPU_REMOTE_DIR")
  venv=$(remote_path "$TPU_VENV")
  if [[ -n $TPU_PYTHON ]]; then
    make_venv="$(shell_quote "$TPU_PYTHON") -m venv $venv"
  else
    # The TPU images' Ubuntu 22.04 has Python 3.10 and dalle_jax needs 3.11: uv fetches a standalone 3.11.
    # --seed puts pip into the venv. --break-system-packages only for images whose Python refuses --user
    # installs (PEP 668); it still installs into ~/.local alone.
    make_venv="{ python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv ||"
    make_venv+=" python3 -m pip install --user --quiet --break-system-packages uv; };"
    make_venv+=" python3 -m uv venv --seed --python 3.11 $venv"
  fi
  check='import jax; print(f"worker {jax.process_index()}: {jax.local_device_count()} local of'
  check+=' {jax.device_count()} devices ({jax.devices()[0].platform})")'
  # All workers at once: a multi-host TPU runtime starts only when every host of the slice opens it.
  on_workers all "set -e; cd $dir || { echo \"\$(hostname): no $dir: run tpu_setup.sh copy first\" >&2; exit 1; };" \
    "if [ ! -x $venv/bin/python ]; then $make_venv; fi;" \
    "$venv/bin/python -m pip install --quiet --upgrade pip;" \
    "$venv/bin/python -m pip install --quiet -r requirements.txt -e '.[tpu]';" \
    "JAX_PLATFORMS=tpu $venv/bin/python -c $(shell_quote "$check")"
}

cmd_run() {
  local dir venv logs stamp code prelude
  dir=$(remote_path "$TPU_REMOTE_DIR")
  venv=$(remote_path "$TPU_VENV")
  logs=$(remote_path "$LOG_DIR")
  # One name for all workers, taken here, so every worker's log of this run has the same name.
  stamp=$(date -u +%Y%m%d-%H%M%S)
  code=$(shell_quote "$(user_code "${USER_CMD[@]}")")
  prelude="set -e; mkdir -p $logs; cd $dir;"
  prelude+=" [ -f $venv/bin/activate ] ||"
  prelude+=" { echo \"\$(hostname): no venv $venv: run tpu_setup.sh install first\" >&2; exit 1; };"
  prelude+=" . $venv/bin/activate; export JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1;"
  if is_true "$DISTRIBUTED"; then
    prelude+=" export DALLE_JAX_DISTRIBUTED=1;"
  fi
  if is_true "$FOREGROUND"; then
    on_workers all "$prelude set -o pipefail; bash -c $code < /dev/null 2>&1 | tee $logs/$stamp.log"
  else
    # setsid: the run gets its own process group, which `stop` signals as a whole; nohup and the
    # redirections let it outlive the ssh session. The pid file is how `stop` finds it.
    on_workers all "$prelude setsid nohup bash -c $code > $logs/$stamp.log 2>&1 < /dev/null &" \
    "echo \$! > $logs/$stamp.pid; echo \"\$(hostname): started pid \$(cat $logs/$stamp.pid), log $logs/$stamp.log\""
    note "started on every worker; follow with: ./tpu_setup.sh logs --follow (same --name/--zone)"
  fi
}

cmd_logs() {
  local logs tail_flags
  logs=$(remote_path "$LOG_DIR")
  tail_flags="-n $TPU_LOG_LINES"
  if is_true "$FOLLOW"; then
    tail_flags+=" -F"
  fi
  on_workers "${TPU_WORKER:-all}" "f=\$(ls -1t $logs/*.log 2>/dev/null | head -n 1);" \
    "if [ -z \"\$f\" ]; then echo \"\$(hostname): no logs in $logs\" >&2; exit 1; fi;" \
    "echo \"== \$(hostname): \$f\"; tail $tail_flags \"\$f\""
}

cmd_stop() {
  local logs
  logs=$(remote_path "$LOG_DIR")
  on_workers "${TPU_WORKER:-all}" "f=\$(ls -1t $logs/*.pid 2>/dev/null | head -n 1);" \
    "if [ -z \"\$f\" ]; then echo \"\$(hostname): no run started by tpu_setup.sh\" >&2; exit 1; fi;" \
    "pid=\$(cat \"\$f\");" \
    "if kill -TERM -- \"-\$pid\" 2>/dev/null; then echo \"\$(hostname): sent SIGTERM to process group \$pid (\$f)\";" \
    "else echo \"\$(hostname): process group \$pid has already ended\"; fi"
}

cmd_ssh() {
  local worker=${TPU_WORKER:-0}
  if ((${#USER_CMD[@]} > 0)); then
    on_workers "$worker" "$(user_code "${USER_CMD[@]}")"
  else
    [[ $worker != all ]] || usage_error "an interactive ssh goes to one worker: --worker N"
    gcloud_cmd compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" --worker="$worker"
  fi
}

cmd_delete() {
  if ! is_true "$QUEUED"; then
    gcloud_cmd compute tpus tpu-vm delete "$TPU_NAME" --zone "$TPU_ZONE" --quiet
    return
  fi
  # A queued resource can only be deleted once its node is gone. The node may never have been created
  # (still waiting for capacity), so its deletion may fail without that stopping the second step.
  gcloud_cmd compute tpus tpu-vm delete "$TPU_NAME" --zone "$TPU_ZONE" --quiet ||
    warn "deleting the node $TPU_NAME failed (it may never have been created); deleting the queued resource anyway"
  gcloud_cmd compute tpus queued-resources delete "$(queued_resource)" --zone "$TPU_ZONE" --quiet
}

main() {
  parse_args "$@"
  if [[ -z $COMMAND ]]; then
    usage
    exit 0
  fi
  validate
  if ! is_true "$DRY_RUN" && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)," \
      "or look first with --dry-run"
  fi
  "cmd_$COMMAND"
}

main "$@"
