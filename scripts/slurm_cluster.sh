#!/usr/bin/env bash
# slurm_cluster.sh - a real two-node SLURM cluster on this one machine, for bigbatch's tests.
#
#   bash scripts/slurm_cluster.sh install   # Debian 12 packages, as root (~10 s)
#   bash scripts/slurm_cluster.sh up        # munged + slurmctld + one slurmd per node (~1 s)
#   bash scripts/slurm_cluster.sh down      # cancel jobs, stop daemons, undo /etc changes (~4 s)
#   bash scripts/slurm_cluster.sh status
#   bash scripts/slurm_cluster.sh selftest  # srun and sbatch smoke tests
#
# Needs root (daemons, /etc/hosts) and UTS namespaces (`unshare --uts`) for distinct node
# host names. State lives in $BIGBATCH_SLURM_DIR (default /tmp/bigbatch-slurm): a private munged
# (own key and socket; /etc/munge and /run/munge are untouched), slurm.conf, spool, logs, pids.
# Node i is `slurmd -N node<i>` in its own UTS namespace with NodeAddr 127.0.0.<i+1> (all of
# 127.0.0.0/8 is loopback already), port BASE+i. Partition "debug" (default) is preempted by
# partition "high" (PreemptMode=REQUEUE).
#
# Outside $BIGBATCH_SLURM_DIR, both undone by `down`:
#   /etc/slurm/slurm.conf -> symlink to our slurm.conf (BIGBATCH_SLURM_LINK_ETC=1, default;
#       otherwise export SLURM_CONF yourself); a real file there is kept aside and restored.
#   /etc/hosts: "127.0.0.X nodeY  # bigbatch-slurm" lines (BIGBATCH_SLURM_HOSTS=1, default), so
#       that MASTER_ADDR=nodeY resolves (gloo otherwise loops on "cannot retrieve IPv6 address").
# Adapted from the measured recipe in shared/recipes/slurm-ci.sh.
set -euo pipefail

DIR=${BIGBATCH_SLURM_DIR:-/tmp/bigbatch-slurm}
NODES=${BIGBATCH_SLURM_NODES:-2}               # number of emulated nodes
CPUS=${BIGBATCH_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # CPUs per node (may exceed real cores); nproc would count OMP_NUM_THREADS
MEM=${BIGBATCH_SLURM_MEM:-2048}                 # RealMemory (MB) per node
CTLD_PORT=${BIGBATCH_SLURM_CTLD_PORT:-6817}
SLURMD_PORT_BASE=${BIGBATCH_SLURM_SLURMD_PORT_BASE:-17000}  # node i listens on BASE+i
MIN_JOB_AGE=${BIGBATCH_SLURM_MIN_JOB_AGE:-5}
LINK_ETC=${BIGBATCH_SLURM_LINK_ETC:-1}
ADD_HOSTS=${BIGBATCH_SLURM_HOSTS:-1}
CONF=$DIR/slurm.conf
HOSTS_TAG="# bigbatch-slurm"

log() { echo "[slurm_cluster $(date +%T)] $*" >&2; }

wait_for() {  # wait_for <seconds> <cmd...>
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then return 1; fi
    sleep 0.2
  done
}

do_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: 12 packages instead of ~45.
  # libpmix2 is only needed for `srun --mpi=pmix`.
  apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge libpmix2 >/dev/null
  # Debian's mpi_pmix_v4.so dlopen()s <libdir>/pmix2/lib/libpmix.so, the
  # unversioned name that only libpmix-dev ships (libpmix-dev pulls in 12 more
  # packages, autoconf etc.). Without it slurmd logs "can not load PMIx
  # library" and `srun --mpi=pmix` says "Invalid MPI type 'pmix'".
  local d
  for d in /usr/lib/*/pmix2/lib; do
    [ -e "$d/libpmix.so" ] || ln -s libpmix.so.2 "$d/libpmix.so"
  done
  # The postinsts can't start the daemons (no systemd; policy-rc.d says no);
  # that's fine, `up` starts them.
  slurmd -V
}

write_conf() {
  rm -rf "$DIR"/{state,spool,log,run,tmp}
  mkdir -p "$DIR"/{state,spool,log,run,tmp}
  for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/node$i" "$DIR/tmp/node$i"; done
  {
    cat <<EOF
ClusterName=bigbatch
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
# No cgroups: works without systemd and without a writable cgroupfs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
# Trust the CPUs/RealMemory written below instead of the hardware; lets
# several nodes share the same 2 real cores.
SlurmdParameters=config_overrides
ReturnToService=2
# sbatch --wait sleeps 2 s, then 8 s, then 32 s between polls unless
# MinJobAge < 6; with MinJobAge=5 it polls every 2 s, but finished jobs then
# vanish from squeue/scontrol ~5-10 s after they end (no sacct: no slurmdbd).
MinJobAge=$MIN_JOB_AGE
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
# Per-node TmpFS: srun --mpi=pmix puts spmix_appdir_<uid>_<job>.<step> under
# TmpFS; with one shared /tmp the two emulated nodes collide ("File exists").
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=node$i NodeHostname=node$i NodeAddr=127.0.0.$((i + 1)) Port=$((SLURMD_PORT_BASE + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    done
    # A job in "high" preempts jobs of "debug": they get SIGTERM, KillWait, then
    # are requeued (SLURM_RESTART_COUNT+1). A requeued job is held ~120 s
    # (Reason=BeginTime) unless you run: scontrol update JobId=<id> StartTime=now
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE"
    echo "PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"
  } >"$CONF"
}

start_munge() {
  mkdir -p -m 0755 "$DIR/munge"   # socket dir must be 0755 (munged checks)
  [ -s "$DIR/munge/munge.key" ] || { mungekey -c -k "$DIR/munge/munge.key" -b 1024; chmod 0600 "$DIR/munge/munge.key"; }
  munged --socket="$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" \
    --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munged.seed"          # root is fine, daemonizes
  wait_for 10 sh -c "munge -S '$DIR/munge/munge.sock' -n | unmunge -S '$DIR/munge/munge.sock'" \
    || { log "munged did not come up"; cat "$DIR/munge/munged.log" >&2; return 1; }
}

unhosts() {  # drop our /etc/hosts lines; rewrite in place (Docker bind-mounts /etc/hosts, so no sed -i/rename)
  local kept
  grep -q -- "$HOSTS_TAG\$" /etc/hosts 2>/dev/null || return 0
  kept=$(grep -v -- "$HOSTS_TAG\$" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

have_uts_ns() { unshare --uts true 2>/dev/null; }

need_root() {
  [ "$(id -u)" = 0 ] || { log "needs root (daemons, /etc/hosts); running as $(id -un)"; exit 1; }
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || {
    log "slurmctld/slurmd/munged not installed: run 'bash $0 install' (as root, Debian 12)"; exit 1; }
}

do_up() {
  need_root
  if [ -e "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already up"; return 0
  fi
  write_conf
  export SLURM_CONF=$CONF
  if [ "$LINK_ETC" = 1 ]; then
    mkdir -p /etc/slurm
    if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
      mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.bigbatch-bak
    fi
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  fi
  if [ "$ADD_HOSTS" = 1 ]; then
    unhosts
    for i in $(seq 1 "$NODES"); do echo "127.0.0.$((i + 1)) node$i $HOSTS_TAG" >>/etc/hosts; done
  fi
  start_munge
  slurmctld -f "$CONF"              # daemonizes, writes pid file
  wait_for 20 scontrol ping || { log "slurmctld not responding"; tail -30 "$DIR/log/slurmctld.log" >&2; return 1; }
  local uts=0; have_uts_ns && uts=1 || log "no UTS namespaces (unshare --uts failed): all nodes share hostname $(hostname)"
  for i in $(seq 1 "$NODES"); do
    if [ $uts = 1 ]; then
      unshare --uts sh -c "hostname node$i && exec slurmd -f '$CONF' -N node$i"
    else
      slurmd -f "$CONF" -N "node$i"
    fi
  done
  if ! wait_for 30 sh -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" -eq $NODES ]"; then
    log "nodes not idle:"; sinfo -N >&2; tail -20 "$DIR"/log/slurmd-*.log >&2; return 1
  fi
  sinfo -N
  log "up. export SLURM_CONF=$CONF"
}

kill_pidfiles() {  # TERM every pid in the given pid files at once, wait <=10 s, then KILL
  local f pids=()
  for f in "$@"; do [ -s "$f" ] && pids+=("$(cat "$f")"); done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break; sleep 0.2
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$@"
}

do_down() {
  export SLURM_CONF=$CONF
  if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null || true)
    [ -z "$jobs" ] || scancel --full --quiet $jobs || true
    wait_for 20 sh -c '[ -z "$(squeue -h -t R,CG,PD)" ]' || log "jobs still listed after scancel"
  fi
  # slurmstepd processes (job steps) exit with their jobs (hence scancel first).
  kill_pidfiles "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"  # slurmctld also ends its slurmscriptd child
  kill_pidfiles "$DIR/munge/munged.pid"
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
    if [ -e /etc/slurm/slurm.conf.bigbatch-bak ]; then mv /etc/slurm/slurm.conf.bigbatch-bak /etc/slurm/slurm.conf; fi
  fi
  unhosts
  [ "${BIGBATCH_SLURM_KEEP:-0}" = 1 ] || rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/tmp"
  log "down"
}

do_status() {
  export SLURM_CONF=$CONF
  scontrol ping || true; sinfo -N || true; squeue || true
}

do_selftest() {
  export SLURM_CONF=$CONF
  set -x
  srun -N"$NODES" -n$((2 * NODES)) -l hostname | sort
  srun -n2 -l bash -c 'echo rank=$SLURM_PROCID node=$SLURMD_NODENAME'
  cat >"$DIR/selftest.sbatch" <<'EOF'
#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=00:02:00
srun bash -c 'echo SLURM_PROCID=$SLURM_PROCID host=$(hostname)'
EOF
  sbatch --wait -o "$DIR/selftest.out" "$DIR/selftest.sbatch"
  cat "$DIR/selftest.out"
  set +x
}

case "${1:-}" in
  install) do_install ;;
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  selftest) do_selftest ;;
  *) echo "usage: $0 install|up|down|status|selftest" >&2; exit 2 ;;
esac
