#!/usr/bin/env bash
# mpirun with the flags this project's scripts need everywhere: run as root where
# the machine is a container, and allow more ranks than cores (tests use 3 on 2).
set -euo pipefail
flags=(--oversubscribe)
if [ "$(id -u)" = "0" ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Open MPI 5's launcher keeps its session files in $TMPDIR/ompi.<its pid>, and a
# launcher killed with SIGKILL leaves them there. A later launcher that draws the same
# pid (pids wrap at /proc/sys/kernel/pid_max, 32768 on many machines) finds them and
# stops with "The PMIx server's listener thread failed to start". mpirun takes this
# shell's pid below (exec), so a directory under that name is a dead job's: remove it.
stale="${TMPDIR:-/tmp}/ompi.$$"
if [ -d "$stale" ] && [ -O "$stale" ]; then
    rm -rf -- "$stale"
fi
exec mpirun "${flags[@]}" "$@"
