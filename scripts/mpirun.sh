#!/usr/bin/env bash
# mpirun with the flags this project's scripts need everywhere: run as root where
# the machine is a container, and allow more ranks than cores (tests use 3 on 2).
set -euo pipefail
flags=(--oversubscribe)
if [ "$(id -u)" = "0" ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec mpirun "${flags[@]}" "$@"
