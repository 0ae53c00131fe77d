#!/usr/bin/env bash
# Starts and stops a real single-node SLURM cluster on this machine (munged, MariaDB, slurmdbd, slurmctld,
# slurmd) with fake GPUs named like real sites' whole-GPU and MIG types, so the SLURM executor and the
# cluster profiles can be tried and tested without a cluster. Used by CI; see jobs/slurm/README.md.
#
#   jobs/slurm/cluster.sh up       install what is missing, start everything, prove a job runs; no-op if up
#   jobs/slurm/cluster.sh down     stop every daemon by its pid file; no-op if down
#   jobs/slurm/cluster.sh status   one line per daemon and sinfo; exit 0 only when all are running
#
# Everything a run writes lives under MASKLET_SLURM_DIR (default /tmp/masklet-slurm), and `up` on a stopped
# cluster wipes it first, so a previous run's jobs, drained node or database never leak into the next.
# Outside it: the Debian packages, /etc/munge/munge.key and the symlink /etc/slurm/slurm.conf (client
# commands such as sbatch and submitit's sacct find the cluster through it, with no environment needed).
set -euo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

STATE_DIR=$(realpath -m "${MASKLET_SLURM_DIR:-/tmp/masklet-slurm}")
CLUSTER_NAME=masklet
NODE=$(hostname -s)
# The node advertises more CPUs than the machine has (SlurmdParameters=config_overrides) so that profiles
# asking for several CPUs per task can be scheduled; memory must stay below what the machine really has.
NODE_CPUS=${MASKLET_SLURM_CPUS:-8}
NODE_MEM_MB=${MASKLET_SLURM_MEM_MB:-16000}
# type:count, named like real sites' GPUs (whole A100/H100) and MIG slices (1g.10gb, 1g.12gb, 3g.40gb).
GPU_TYPES=(a100:2 h100:1 1g.10gb:2 1g.12gb:1 3g.40gb:1)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server mariadb-client)
MARKER=.masklet-slurm-state
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key

ETC=$STATE_DIR/etc
RUN=$STATE_DIR/run
LOG=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge   # owned by munge: munged runs as munge and writes its socket, pid and log here
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DB_DIR=$STATE_DIR/db         # owned by mysql
DB_SOCKET=$DB_DIR/mysqld.sock

# name:pidfile:process name (/proc/PID/comm), in start order; stopped in reverse.
DAEMONS=(
  "munged:$MUNGE_DIR/munged.pid:munged"
  "mariadbd:$DB_DIR/mariadbd.pid:mariadbd"
  "slurmdbd:$RUN/slurmdbd.pid:slurmdbd"
  "slurmctld:$RUN/slurmctld.pid:slurmctld"
  "slurmd:$RUN/slurmd.pid:slurmd"
)

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

# die, showing the end of the log that explains why.
die_with_log() {
  local log=$1
  shift
  echo "cluster.sh: $*" >&2
  if [[ -f $log ]]; then
    echo "--- last lines of $log ---" >&2
    tail -n 25 "$log" >&2
  fi
  exit 1
}

# Whether a process exists and has not exited. An exited daemon can linger as a zombie for seconds until
# PID 1 reaps it (this sandbox's init reaps about every 2 s); it holds no ports or files, so it counts as gone.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# The pid a daemon's pid file names, if that process is alive and is that daemon (pids get reused).
running_pid() {
  local pidfile=$1 comm=$2 pid
  [[ -f $pidfile ]] || return 1
  pid=$(tr -dc 0-9 <"$pidfile")
  [[ -n $pid ]] && alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
  echo "$pid"
}

all_running() {
  local entry name pidfile comm
  for entry in "${DAEMONS[@]}"; do
    IFS=: read -r name pidfile comm <<<"$entry"
    running_pid "$pidfile" "$comm" >/dev/null || return 1
  done
}

any_running() {
  local entry name pidfile comm
  for entry in "${DAEMONS[@]}"; do
    IFS=: read -r name pidfile comm <<<"$entry"
    if running_pid "$pidfile" "$comm" >/dev/null; then return 0; fi
  done
  return 1
}

# Start a daemon with stdin/stdout/stderr on /dev/null/its log and every other fd closed, in its own session:
# daemons inherit open fds, so a caller piping our output (`cluster.sh up | tee`) would otherwise never see
# its pipe close, and a CI step would hang.
spawn() {
  local log=$1
  shift
  (
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid "$@" </dev/null >>"$log" 2>&1
  ) &
}

# wait_for SECONDS LOG DESCRIPTION COMMAND...: poll COMMAND every 0.2 s; die with LOG's tail on timeout.
wait_for() {
  local seconds=$1 log=$2 what=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die_with_log "$log" "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

install_packages() {
  local missing=0 bin
  for bin in munged mungekey mariadbd mariadb-install-db mariadb slurmctld slurmd slurmdbd sbatch sacctmgr; do
    command -v "$bin" >/dev/null || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null || die "slurm/munge/mariadb are missing and there is no apt-get to install them"
  echo "cluster.sh: installing ${PACKAGES[*]} (once)" >&2
  local apt_log
  apt_log=$(mktemp)
  # policy-rc.d exit 101 keeps the packages' postinst from starting system-wide daemons we would then have
  # to stop (Docker-style images already have one; create it only for the install if they do not).
  local own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local ok=1
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$apt_log" 2>&1; then
    # Usually stale or empty package lists: refresh once and retry.
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${PACKAGES[@]}"; } >>"$apt_log" 2>&1; then
      ok=0
    fi
  fi
  ((own_policy)) && rm -f /usr/sbin/policy-rc.d
  ((ok)) || die_with_log "$apt_log" "apt-get install ${PACKAGES[*]} failed"
  rm -f "$apt_log"
}

ensure_munge_key() {
  [[ -s $MUNGE_KEY ]] && return 0
  mkdir -p "$(dirname "$MUNGE_KEY")"
  mungekey --create --keyfile="$MUNGE_KEY" >/dev/null
  chown munge:munge "$MUNGE_KEY"
  chmod 400 "$MUNGE_KEY"
}

# Wipe and recreate the state dir, refusing to delete a directory this script did not create.
fresh_state_dir() {
  if [[ -e $STATE_DIR ]]; then
    if [[ ! -e $STATE_DIR/$MARKER ]] && [[ -n $(ls -A "$STATE_DIR") ]]; then
      die "$STATE_DIR is not empty and was not made by cluster.sh; set MASKLET_SLURM_DIR to a new directory"
    fi
    rm -rf "$STATE_DIR"
  fi
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE_DIR/dev" "$STATE_DIR/ctld" "$STATE_DIR/spool" "$MUNGE_DIR" "$DB_DIR"
  chmod 755 "$STATE_DIR"
  touch "$STATE_DIR/$MARKER"
  chown munge:munge "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  chown mysql:mysql "$DB_DIR"
}

gres_string() {
  local entry out=""
  for entry in "${GPU_TYPES[@]}"; do out+="${out:+,}gpu:$entry"; done
  echo "$out"
}

write_configs() {
  local db_password=$1
  # gres.conf: slurmd drops GPUs without File= and refuses a regular file, so each fake GPU is a character
  # device (a copy of /dev/null's numbers) under the state dir.
  local gres_conf=$ETC/gres.conf index=0 entry type count i
  echo "AutoDetect=off" >"$gres_conf"
  for entry in "${GPU_TYPES[@]}"; do
    IFS=: read -r type count <<<"$entry"
    for ((i = 0; i < count; i++)); do
      mknod -m 666 "$STATE_DIR/dev/nvidia$index" c 1 3
      echo "NodeName=$NODE Name=gpu Type=$type File=$STATE_DIR/dev/nvidia$index" >>"$gres_conf"
      index=$((index + 1))
    done
  done

  cat >"$ETC/slurm.conf" <<EOF
# Written by jobs/slurm/cluster.sh; rewritten on every fresh \`up\`.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (default 120, minimum 5): a requeued job may not start again before its credential expires.
AuthInfo=cred_expire=5,socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No systemd and no cgroups here: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
DefMemPerCPU=1000
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
# Without these, jobs wait for a 3 s scheduler tick and requeued jobs for up to a minute of backfill.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# submitit reads job states through sacct, which needs slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$NODE_CPUS Sockets=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM_MB Gres=$(gres_string) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF

  # slurmdbd refuses a config readable by others (it holds the DB password).
  install -m 600 /dev/null "$ETC/slurmdbd.conf"
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$db_password
EOF
}

# One cluster per machine: the daemons' ports and /etc/slurm/slurm.conf are shared by every state dir.
refuse_if_another_cluster_is_up() {
  [[ -L $SYSTEM_CONF ]] || return 0
  local other_dir
  other_dir=$(dirname "$(dirname "$(readlink "$SYSTEM_CONF")")")
  [[ $other_dir != "$STATE_DIR" ]] || return 0
  if running_pid "$other_dir/run/slurmctld.pid" slurmctld >/dev/null; then
    die "another cluster is up with state in $other_dir; stop it first: MASKLET_SLURM_DIR=$other_dir $0 down"
  fi
}

# Client commands (sbatch, sacct, submitit) read /etc/slurm/slurm.conf; point it at this state dir.
link_system_conf() {
  if [[ -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
    mv "$SYSTEM_CONF" "$SYSTEM_CONF.before-masklet"
    echo "cluster.sh: moved the existing $SYSTEM_CONF to $SYSTEM_CONF.before-masklet" >&2
  fi
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  ln -sfn "$ETC/slurm.conf" "$SYSTEM_CONF"
}

start_munge() {
  spawn "$LOG/munged.out" runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  wait_for 20 "$MUNGE_DIR/munged.log" "munged" \
    bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'"
}

start_mariadb() {
  local db_password=$1
  local out=$LOG/mariadb-install.out
  mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$out" 2>&1 </dev/null || die_with_log "$out" "mariadb-install-db failed"
  # No TCP: the database is reached through its own socket only, so it cannot clash with a system MariaDB.
  spawn "$LOG/mariadbd.out" mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" --socket="$DB_SOCKET" \
    --pid-file="$DB_DIR/mariadbd.pid" --log-error="$DB_DIR/mariadbd.log" --skip-networking \
    --innodb-buffer-pool-size=1024M --innodb-lock-wait-timeout=900 --innodb-log-file-size=64M
  wait_for 60 "$DB_DIR/mariadbd.log" "mariadbd" mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
  mariadb --no-defaults --socket="$DB_SOCKET" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
  export SLURM_CONF=$ETC/slurm.conf
  # slurmdbd's MariaDB client connects to "localhost" through the socket MYSQL_UNIX_PORT names.
  MYSQL_UNIX_PORT=$DB_SOCKET spawn "$LOG/slurmdbd.out" slurmdbd
  wait_for 30 "$LOG/slurmdbd.log" "slurmdbd" sacctmgr -n list cluster
  # Register the cluster before slurmctld starts, so slurmctld's first connection to slurmdbd is accepted.
  sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  spawn "$LOG/slurmctld.out" slurmctld
  wait_for 30 "$LOG/slurmctld.log" "slurmctld" scontrol ping
  spawn "$LOG/slurmd.out" slurmd
  wait_for 30 "$LOG/slurmd.log" "node $NODE to become idle" node_is_idle
}

node_is_idle() {
  [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1) == idle ]]
}

# Prove the whole path works: a GPU job is scheduled, runs, and reaches the accounting database (submitit
# reads job states from sacct; without accounting every state is UNKNOWN).
smoke_test() {
  local job_id state deadline
  # shellcheck disable=SC2016  # $CUDA_VISIBLE_DEVICES is for the job's shell to expand
  job_id=$(timeout 60 sbatch --wait --parsable -p gpu --gres=gpu:1 -o /dev/null -e /dev/null -J masklet-smoke \
    --wrap 'test -n "$CUDA_VISIBLE_DEVICES"') || die_with_log "$LOG/slurmd.log" "the smoke-test job did not complete"
  deadline=$((SECONDS + 20))
  while :; do
    state=$(sacct -n -X -P -j "$job_id" -o State 2>/dev/null | head -n 1)
    [[ $state == COMPLETED ]] && return 0
    ((SECONDS < deadline)) || die_with_log "$LOG/slurmdbd.log" "sacct shows job $job_id as '${state:-nothing}', not COMPLETED"
    sleep 0.2
  done
}

summary() {
  local parts
  parts=$(sinfo -h -o '%P' | paste -sd, -)
  echo "slurm up: cluster=$CLUSTER_NAME node=$NODE cpus=$NODE_CPUS mem=${NODE_MEM_MB}MB partitions=$parts" \
    "gres=$(gres_string) state=$STATE_DIR$*"
}

cmd_up() {
  ((EUID == 0)) || die "run as root (it installs packages and starts daemons as root)"
  local t0
  t0=$(date +%s.%N)
  if all_running && SLURM_CONF=$ETC/slurm.conf scontrol ping >/dev/null 2>&1; then
    summary " (already up)"
    return 0
  fi
  refuse_if_another_cluster_is_up
  # Partly up (a daemon died) or down: start clean.
  any_running && cmd_down >/dev/null
  install_packages
  ensure_munge_key
  fresh_state_dir
  local db_password
  db_password=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
  write_configs "$db_password"
  link_system_conf
  start_munge
  start_mariadb "$db_password"
  start_slurm
  smoke_test
  summary " (started in $(awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }')s)"
}

# TERM, then KILL after 15 s; waits until the process is gone so a following `up` can bind the same ports.
stop_daemon() {
  local name=$1 pidfile=$2 comm=$3 pid i
  pid=$(running_pid "$pidfile" "$comm") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    echo "cluster.sh: $name (pid $pid) ignored TERM for 15s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "stopped $name (pid $pid)"
}

cmd_down() {
  export SLURM_CONF=$ETC/slurm.conf
  # Cancel jobs first: with proctrack/linuxproc their slurmstepd processes outlive slurmd.
  local ctld_pid
  if ctld_pid=$(running_pid "$RUN/slurmctld.pid" slurmctld) && [[ -n $ctld_pid ]]; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086  # one argument per job id
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do
        [[ -z $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
        sleep 0.1
      done
    fi
  fi
  local idx name pidfile comm
  for ((idx = ${#DAEMONS[@]} - 1; idx >= 0; idx--)); do
    IFS=: read -r name pidfile comm <<<"${DAEMONS[idx]}"
    stop_daemon "$name" "$pidfile" "$comm"
  done
  echo "slurm down: state=$STATE_DIR"
}

cmd_status() {
  local entry name pidfile comm pid ok=0
  echo "state dir: $STATE_DIR"
  for entry in "${DAEMONS[@]}"; do
    IFS=: read -r name pidfile comm <<<"$entry"
    if pid=$(running_pid "$pidfile" "$comm"); then
      printf '%-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-10s stopped\n' "$name"
      ok=1
    fi
  done
  if ((ok == 0)); then
    SLURM_CONF=$ETC/slurm.conf sinfo -o '%P %a %D %t %c %m %G' || ok=1
  fi
  return "$ok"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
  echo "usage: $0 up|down|status   (state dir: \$MASKLET_SLURM_DIR, default /tmp/masklet-slurm)" >&2
  exit 2
  ;;
esac
