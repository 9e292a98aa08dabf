"""Graceful stop on preemption: checkpoint at the next step boundary, exit with a code the launcher requeues on.

Two ways to ask a run to stop, so it works under any launcher:
- a signal to the training processes (SIGUSR1 from ``#SBATCH --signal=USR1@T``, SIGTERM when SLURM preempts or
  the time limit nears); the handler only sets a flag;
- a stop file (``KASA_DS_STOP_FILE``, on a filesystem every node sees), which launch/slurm/train.sbatch touches when
  its batch shell gets the signal — the way to reach ranks behind a per-node launcher such as torchrun.

Ranks agree at every step boundary with one all-reduce (MAX) of a one-element tensor, so all of them stop after the
same step, write the same checkpoint and leave with :data:`PREEMPTED_EXIT`. Evaluation and sample generation ask
too, per batch and per generated token (:meth:`StopRequest.check`), so a stop never waits for a long evaluation.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" — launch/slurm/train.sbatch requeues the job on it
STOP_FILE_ENV = "KASA_DS_STOP_FILE"


class Interrupted(Exception):
    """A stop request honoured inside evaluation or generation (every rank raises it at the same batch or token)."""


class StopRequest:
    """Latches SIGUSR1/SIGTERM (or the stop file); :meth:`agreed` is the collective decision to stop."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.reason: str | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop. Collective: call it on all ranks, once per step."""
        if self.reason is None and self.stop_file and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file}"
        flag = torch.tensor([0.0 if self.reason is None else 1.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.reason is None:
            self.reason = "another rank's request"
        return flag.item() > 0

    def check(self, device: torch.device) -> None:
        """Raise :class:`Interrupted` on every rank when a stop was asked (collective, like :meth:`agreed`)."""
        if self.agreed(device):
            raise Interrupted(self.reason)
