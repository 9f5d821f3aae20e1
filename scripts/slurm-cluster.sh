#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting, for the tests and for trying the slurm backend.
#
#   bash scripts/slurm-cluster.sh start    # install (apt), configure and start; idempotent
#   bash scripts/slurm-cluster.sh stop     # stop every daemon this script started, by its pid file
#   bash scripts/slurm-cluster.sh status   # which daemons run, and sinfo
#
# Debian 12 as root, with or without systemd: the daemons are started directly (apt's policy-rc.d may
# forbid service starts inside containers). Daemons: munged, mariadbd + slurmdbd (so that `sacct`
# works: submitit and `sweeper status` read job states from it), slurmctld, slurmd.
#
# Partitions: `debug` (default, preemptible, GraceTime=30) and `high`; a job in `high` preempts a job
# in `debug`, which first receives its --signal (submitit: USR2) and is then requeued.
#
# Environment: SLURM_CGROUP=1 enforces memory limits with cgroups (a job over --mem ends
# OUT_OF_MEMORY); default 0 (plain process tracking, works in any container).
set -euo pipefail

CGROUP=${SLURM_CGROUP:-0}
CLUSTER=sweeper
NODE=localhost
ETC=/etc/slurm
RUN=/run/slurm
LOGS=/var/log/slurm
SPOOL=/var/spool/slurm
DB_SOCKET=/run/mysqld/mysqld.sock
DB_PIDFILE=/run/mysqld/mysqld.pid
MUNGE_PIDFILE=/run/munge/munged.pid
PIDFILES=("$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" "$DB_PIDFILE" "$MUNGE_PIDFILE")
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { printf 'slurm-cluster: %s\n' "$*" >&2; }

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait up to $1 tenths of a second for the command in "$@" (after $1) to succeed.
wait_for() {
  local tries=$1; shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

stop_one() {
  local pidfile=$1 pid
  if running "$pidfile"; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    wait_for 150 bash -c "! kill -0 $pid" || { log "pid $pid ignored SIGTERM; killing"; kill -9 "$pid" || true; }
    log "stopped $(basename "$pidfile" .pid) (pid $pid)"
  fi
  rm -f "$pidfile"
}

cmd_stop() {
  local pf
  for pf in "${PIDFILES[@]}"; do stop_one "$pf"; done
}

cmd_status() {
  local pf rc=0
  for pf in "${PIDFILES[@]}"; do
    if running "$pf"; then echo "$(basename "$pf" .pid): running (pid $(cat "$pf"))"
    else echo "$(basename "$pf" .pid): stopped"; rc=1; fi
  done
  command -v sinfo >/dev/null && sinfo 2>/dev/null || true
  return $rc
}

install_packages() {
  dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1 && return 0
  log "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  running "$MUNGE_PIDFILE" || runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PIDFILE"
  wait_for 100 test -S /run/munge/munge.socket.2 || { log "munged did not start"; exit 1; }
  munge -n | unmunge >/dev/null
}

start_database() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld /var/log/mysql
  if ! running "$DB_PIDFILE"; then
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="$DB_PIDFILE" --socket="$DB_SOCKET" \
      --bind-address=127.0.0.1 --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
  fi
  wait_for 300 mysqladmin --socket="$DB_SOCKET" ping || { log "mariadbd did not start"; exit 1; }
  mysql --socket="$DB_SOCKET" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_slurmdbd_conf() {
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
EOF
  chown slurm:slurm "$ETC/slurmdbd.conf"
  chmod 0600 "$ETC/slurmdbd.conf"
}

start_slurmdbd() {
  write_slurmdbd_conf
  running "$RUN/slurmdbd.pid" || /usr/sbin/slurmdbd
  wait_for 200 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || { log "slurmdbd did not listen"; exit 1; }
}

# The slurm.conf text on stdout.
slurm_conf() {
  local cpus mem_mb tracking
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10 / 1024 ))
  if [ "$CGROUP" = 1 ]; then
    tracking="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024"
  else
    tracking="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectTypeParameters=CR_Core"
  fi
  cat <<EOF
# Written by scripts/slurm-cluster.sh; rewritten (and the daemons restarted) when it changes.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# a requeued job may restart only once its old credential expired (default 120 s)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
$tracking
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# schedule at once instead of every 60 s: a trivial job completes about 1 s after sbatch
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
ReturnToService=2
MinJobAge=300
KillWait=10
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# send the job's --signal (submitit: USR2) on preemption, so it can checkpoint within GraceTime
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_slurm() {
  local conf changed=0
  conf=$(slurm_conf)
  if [ ! -f "$ETC/slurm.conf" ] || [ "$(cat "$ETC/slurm.conf")" != "$conf" ]; then
    printf '%s\n' "$conf" >"$ETC/slurm.conf.tmp"
    mv "$ETC/slurm.conf.tmp" "$ETC/slurm.conf"
    changed=1
  fi
  if [ "$CGROUP" = 1 ]; then
    printf 'CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\n' >"$ETC/cgroup.conf"
  else
    rm -f "$ETC/cgroup.conf"
  fi
  if [ "$changed" = 1 ]; then
    stop_one "$RUN/slurmd.pid"
    stop_one "$RUN/slurmctld.pid"
  fi
  # -i: start even if the saved state is from an incompatible configuration
  running "$RUN/slurmctld.pid" || /usr/sbin/slurmctld -i
  running "$RUN/slurmd.pid" || /usr/sbin/slurmd -N "$NODE"
}

node_ready() {
  case "$(sinfo -h -N -o %t 2>/dev/null | head -1)" in idle* | mix* | alloc*) return 0 ;; *) return 1 ;; esac
}

wait_ready() {
  if ! wait_for 300 node_ready; then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    wait_for 100 node_ready || { log "node $NODE not ready: $(sinfo -h -N -o '%t %E')"; exit 1; }
  fi
  sacctmgr -n -P show cluster format=Cluster | grep -qx "$CLUSTER" \
    || { log "cluster $CLUSTER is not registered with slurmdbd"; exit 1; }
}

cmd_start() {
  [ "$(id -u)" = 0 ] || { log "must run as root (installs packages and starts daemons)"; exit 1; }
  install_packages
  # before any daemon starts: slurmdbd cannot write its pid file otherwise
  install -d -o slurm -g slurm -m 0755 "$RUN" "$LOGS" "$SPOOL" "$SPOOL/ctld" "$SPOOL/d"
  start_munge
  start_database
  start_slurmdbd
  start_slurm
  wait_ready
  sinfo
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
