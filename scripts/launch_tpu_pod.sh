#!/usr/bin/env bash
# Launch deepspec_jax training on every host of a multi-host Cloud TPU pod.
#
# A pod slice is several TPU VMs ("workers"); JAX needs the same program started on
# each of them. This script runs one identical command on all workers through
# `gcloud compute tpus tpu-vm ssh --worker=all`; the trainer, started with --multihost,
# calls jax.distributed.initialize(), which finds the coordinator and the process ids
# from the TPU metadata by itself. Run `--help` for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE --config FILE [options] [-- TRAINER_FLAGS...]

Runs on every worker of a TPU pod slice, in parallel:
    cd WORKDIR && PYTHON -m deepspec_jax.train --config=FILE --multihost TRAINER_FLAGS...

Required (flag or environment variable):
  --tpu NAME        TPU VM / pod slice name                     [TPU_NAME]
  --zone ZONE       its zone, e.g. us-central2-b                [TPU_ZONE or ZONE]
  --config FILE     config file, relative to WORKDIR, e.g.
                    configs/dspark/dspark_qwen3_4b.py           [CONFIG]

Options:
  --project ID      GCP project (default: gcloud's configured)  [TPU_PROJECT]
  --workdir DIR     deepspec_jax checkout present on every worker
                    (default: ~/deepspec_jax)                   [TPU_WORKDIR]
  --python PATH     interpreter on the workers, relative to WORKDIR or absolute
                    (default: .venv/bin/python)                 [TPU_PYTHON]
  --setup           run `bash scripts/setup.sh` on every worker first (venv + install)
  --env KEY=VALUE   export a variable on every worker before the run (repeatable),
                    e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true
  --log FILE        run detached (nohup), so the run survives this ssh session; each
                    worker writes FILE.<hostname> (relative to WORKDIR) and its process
                    id to FILE.<hostname>.pid
  --stop            with --log FILE: stop the detached run instead of starting one
  --worker LIST     workers to use: all (default), or e.g. 0 / 1,3 / 0-3
  --internal_ip     connect through internal IPs (launching from a VM in the same VPC)
  --dry_run         print the gcloud command and the per-worker command; run nothing
  -h, --help        this text

Everything after `--` goes to the trainer verbatim, e.g.
  -- --config.train.lr=3e-4 --config.output_dir=gs://BUCKET/runs/dspark_qwen3_4b

Notes:
  * Every worker needs the same checkout, target weights and token store (a shared
    disk or a bucket). Multi-host orbax checkpoints need an output_dir that all workers
    see (gs://... or a shared filesystem).
  * Foreground runs stop when this ssh session ends (Ctrl-C); use --log for long runs.

Example:
  scripts/launch_tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a --setup \
      --config configs/dspark/dspark_qwen3_4b.py --log train.log \
      -- --config.target.path=/mnt/models/Qwen3-4B --config.output_dir=gs://b/runs/q4b
EOF
}

die() {
  echo "launch_tpu_pod.sh: $*" >&2
  echo "Run scripts/launch_tpu_pod.sh --help for usage." >&2
  exit 2
}

tpu=${TPU_NAME:-}
zone=${TPU_ZONE:-${ZONE:-}}
project=${TPU_PROJECT:-}
config=${CONFIG:-}
workdir=${TPU_WORKDIR:-"~/deepspec_jax"}
python_bin=${TPU_PYTHON:-.venv/bin/python}
worker=all
setup=0
stop=0
dry_run=0
internal_ip=0
log=""
envs=()
extra=()

need_value() {  # $1 = flag, $2 = number of remaining args
  [ "$2" -ge 2 ] || die "$1 needs a value."
}

while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) need_value "$1" $#; tpu=$2; shift 2 ;;
    --tpu=*) tpu=${1#*=}; shift ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --zone=*) zone=${1#*=}; shift ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --python) need_value "$1" $#; python_bin=$2; shift 2 ;;
    --python=*) python_bin=${1#*=}; shift ;;
    --env) need_value "$1" $#; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --log) need_value "$1" $#; log=$2; shift 2 ;;
    --log=*) log=${1#*=}; shift ;;
    --worker) need_value "$1" $#; worker=$2; shift 2 ;;
    --worker=*) worker=${1#*=}; shift ;;
    --setup) setup=1; shift ;;
    --stop) stop=1; shift ;;
    --internal_ip|--internal-ip) internal_ip=1; shift ;;
    --dry_run|--dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (trainer flags go after '--')." ;;
  esac
done

[ -n "$tpu" ] || die "no TPU name: pass --tpu NAME or set TPU_NAME."
[ -n "$zone" ] || die "no zone: pass --zone ZONE or set TPU_ZONE."
if [ "$stop" = 1 ]; then
  [ -n "$log" ] || die "--stop needs the --log FILE the run was started with."
else
  [ -n "$config" ] || die "no config: pass --config configs/<arch>/<file>.py or set CONFIG."
  case "$config" in *.py) ;; *) die "--config '$config' is not a .py config file." ;; esac
fi
for kv in ${envs[@]+"${envs[@]}"}; do
  case "$kv" in
    [A-Za-z_]*=*) key=${kv%%=*}
      [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$kv': '$key' is not a variable name." ;;
    *) die "--env '$kv' is not KEY=VALUE." ;;
  esac
done

# Quote a path for the remote shell, keeping a leading ~/ unquoted so it expands there.
# shellcheck disable=SC2088  # the ~ is meant literally: the remote shell expands it
remote_path() {
  case "$1" in
    "~") printf '~' ;;
    "~/"*) printf '~/%q' "${1#\~/}" ;;
    *) printf '%q' "$1" ;;
  esac
}

# The command every worker runs (its login shell: bash on TPU VMs). `set -e` and `;`
# rather than `&&` chains, so that a trailing `&` backgrounds only the trainer.
remote="set -e; cd $(remote_path "$workdir")"
if [ "$stop" = 1 ]; then
  pidfile="$(printf '%q' "$log").\$(hostname).pid"
  remote+="; if [ -f $pidfile ]; then kill \$(cat $pidfile); echo \"\$(hostname): stopped\"; "
  remote+="else echo \"\$(hostname): no $pidfile\"; fi"
else
  for kv in ${envs[@]+"${envs[@]}"}; do
    remote+="; export ${kv%%=*}=$(printf '%q' "${kv#*=}")"
  done
  if [ "$setup" = 1 ]; then remote+="; bash scripts/setup.sh"; fi
  trainer_args=(-m deepspec_jax.train "--config=$config" --multihost ${extra[@]+"${extra[@]}"})
  cmd="$(remote_path "$python_bin") $(printf '%q ' "${trainer_args[@]}")"
  cmd=${cmd% }
  if [ -n "$log" ]; then
    logfile="$(printf '%q' "$log").\$(hostname)"
    remote+="; nohup $cmd > $logfile 2>&1 < /dev/null & echo \$! > $logfile.pid"
    remote+="; echo \"\$(hostname): started, log $logfile\""
  else
    remote+="; $cmd"
  fi
fi

gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker")
[ -n "$project" ] && gcloud_cmd+=("--project=$project")
[ "$internal_ip" = 1 ] && gcloud_cmd+=(--internal-ip)
gcloud_cmd+=("--command=$remote")

if [ "$dry_run" = 1 ]; then
  echo "# on each worker ($worker) of $tpu:"
  echo "$remote"
  echo "# launched with:"
  printf '%q ' "${gcloud_cmd[@]}"
  echo
  exit 0
fi

command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud SDK (or use --dry_run)."
exec "${gcloud_cmd[@]}"
