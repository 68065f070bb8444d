#!/usr/bin/env bash
# Installs what the SLURM tests (tests/slurm) need, where it is missing: Debian's
# slurm-wlm (slurmctld, slurmd and the client commands) and libpmix-dev (its
# unversioned libpmix.so is what SLURM's mpi/pmix plugin loads for
# `srun --mpi=pmix`). Idempotent and quiet: does nothing when both are present.
# Needs root and apt-get; elsewhere it says so and exits 0 (the tests then skip,
# or fail under MPINEWTON_REQUIRE_SLURM=1). A failed installation is an error.
set -euo pipefail

pmix_lib=/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so
have_slurm() {
    command -v sbatch >/dev/null 2>&1 && \
        { command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; } && \
        { command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ]; }
}
have_pmix() {
    [ -e "$pmix_lib" ] || compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null
}

if have_slurm && have_pmix; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[slurm-setup] SLURM or PMIx missing and no root apt-get here: the SLURM tests will" \
         "skip (install slurm-wlm and libpmix-dev to run them)" >&2
    exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "[slurm-setup] installing slurm-wlm and libpmix-dev (apt-get)"
if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           slurm-wlm libpmix-dev; } >"$log" 2>&1; then
    echo "[slurm-setup] apt-get failed:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
if ! have_slurm || ! have_pmix; then
    echo "[slurm-setup] installed, but slurmctld/slurmd/sbatch or libpmix.so still missing" >&2
    exit 1
fi
# not `sbatch --version`: without a slurm.conf it looks for one in DNS and fails loudly
echo "[slurm-setup] ready: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo '?')"
