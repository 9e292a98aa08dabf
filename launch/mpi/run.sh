#!/usr/bin/env bash
# KaSA fine-tuning under mpirun: one MPI process per rank; DeepSpeed discovers rank, world size, local rank and the
# rendezvous address through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True) in launch/train.py).
#
#   bash launch/mpi/run.sh -np 16 --hostfile launch/mpi/hostfile.example -- \
#       --config configs/llama3_70b_kasa.yaml --ds_config ds_configs/zero3_bf16.json
#
# Arguments before "--" go to mpirun, those after it to launch/train.py. Needs mpi4py in the training environment
# (pip install -e .[mpi]); MASTER_PORT (default 29500) must be free on the first host.
set -euo pipefail
cd "$(dirname "$0")/../.."
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PYTHON=${PYTHON:-python3}
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)  # Open MPI refuses root without it (containers run as root)
# -x: the environment every rank needs (those set here); --bind-to none: torch places its threads
for var in PATH PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV DS_ACCELERATOR OMP_NUM_THREADS MASTER_PORT HF_HOME \
           NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG KASA_DS_STOP_FILE; do
  [ -n "${!var:-}" ] && extra+=(-x "$var")
done
exec mpirun "${extra[@]}" --bind-to none "${mpi_args[@]}" "$PYTHON" launch/train.py "$@"
