"""The training driver, ``python -m mpinewton.train``: the one package that sees the whole flow.

Design section 2: the HDF5 shard of this rank, the TensorFlow local sums, the
MPI reduction, the numpy solvers, and the run directory that rank 0 writes.

- :mod:`.__main__`: the command line, the launch check, exit codes (0 done,
  2 bad input, 75 checkpointed on a signal).
- :mod:`.session`: threads, data, model, start weights, the checkpoint to resume from.
- :mod:`.loop`: the solvers' loop with the driver's hooks (batch, broadcast,
  metrics, signals, checkpoints) and the summary.
- :mod:`.rundir`: every file of the run directory (contract in its docstring).
- :mod:`.lock`: one job per run directory, safe on NFS and Lustre.

Nothing is imported here, so that ``python -m mpinewton.train`` loads
TensorFlow only after the thread pools are chosen.
"""
