"""The processes of one run under MPI: who this rank is, the few collectives training needs,
and stopping every rank together (docs/distributed.md).

    world = detect_world()          # World(rank=0, size=1) unless launched by mpiexec / srun
    rows = world.allgather(obj)     # [obj of rank 0, obj of rank 1, ...]: always rank order
    g = world.allgather_rows(a)     # (size * n, P) host array: rank r's n rows at r*n .. r*n+n-1
    world.abort("one line", code)   # print on this rank, then MPI_Abort: every rank stops

MPI is used only when a launcher started the process (its environment says so, see
:data:`LAUNCHER_ENV`); then mpi4py must be importable, else :class:`MPIUnavailable` (a
ValueError: one line, exit 2) says how to install it. A single process never imports mpi4py.

Determinism: nothing here reduces with ``MPI.SUM``, whose order MPI leaves open. Gradients
travel by ``Allgather`` and every rank sums the rows itself in rank order (refmtp.training.step),
so the result is the bits of a single process accumulating the same microbatches in order.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np  # host buffers for MPI (mpi4py sends numpy arrays without copies)

from refmtp.backends import backend_of

INSTALL_HINT = 'pip install "refmtp[mpi]"'
# Set by the MPI launchers for every process they start: MPICH/Intel hydra (PMI_*), Open MPI,
# PMIx (srun --mpi=pmix, prterun), MVAPICH.
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class MPIUnavailable(ValueError):
    """A parallel run was asked for but mpi4py (or an MPI library) is missing."""


def launched_by_mpi(environ=None) -> bool:
    """True when an MPI launcher started this process (and it is not a 1-rank launch)."""
    env = os.environ if environ is None else environ
    if not any(k in env for k in LAUNCHER_ENV):
        return False
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if k in env:
            return env[k].strip() != "1"
    return True  # PMIx announces no size: ask MPI


def import_mpi(why: str):
    """``mpi4py.MPI``, or MPIUnavailable naming ``why`` and the install command."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # mpi4py absent, or its MPI library cannot be loaded
        raise MPIUnavailable(f"{why} needs mpi4py and an MPI library ({exc}): install them "
                             f"with {INSTALL_HINT}") from None
    return MPI


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size``; ``comm`` is MPI.COMM_WORLD or None."""

    rank: int = 0
    size: int = 1
    comm: Any = None
    _stderr_fd: int | None = None  # the real stderr of a silenced rank, for abort's line

    @property
    def writes(self) -> bool:
        """Rank 0 writes every file and prints; the other ranks only compute."""
        return self.rank == 0

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (small, pickled), in rank order."""
        if self.comm is None:
            return [obj]
        return self.comm.allgather(obj)

    def bcast(self, obj):
        """Rank 0's ``obj`` (pickled) on every rank."""
        if self.comm is None:
            return obj
        return self.comm.bcast(obj, root=0)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return any(self.allgather(bool(flag)))

    def allgather_rows(self, rows: np.ndarray) -> np.ndarray:
        """rows (n, P) of every rank -> (size * n, P), rank r's rows at ``r*n .. r*n + n - 1``.

        Every rank must give the same shape and dtype (the step checks it with the metadata)."""
        rows = np.ascontiguousarray(rows)
        if self.comm is None:
            return rows
        out = np.empty((self.size * rows.shape[0],) + rows.shape[1:], dtype=rows.dtype)
        self.comm.Allgather(rows, out)
        return out

    def silence(self) -> None:
        """Send this rank's stdout and stderr to /dev/null (rank 0 speaks for the run); the
        real stderr is kept for :meth:`abort`."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._stderr_fd = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)

    def abort(self, line: str, code: int = 1) -> None:
        """Print ``line`` (one line, this rank's) and stop every rank of the run (MPI_Abort)."""
        text = f"refmtp: rank {self.rank} of {self.size}: {line}; stopping every rank\n"
        fd = self._stderr_fd if self._stderr_fd is not None else 2
        try:
            sys.stdout.flush()
            os.write(fd, text.encode("utf-8", "replace"))
        except OSError:
            pass
        if self.comm is not None:
            self.comm.Abort(int(code) or 1)
        os._exit(int(code) or 1)  # pragma: no cover - Abort does not return


SINGLE = World()


def detect_world(environ=None) -> World:
    """The World of this process: MPI.COMM_WORLD when a launcher started it, else one rank."""
    if not launched_by_mpi(environ):
        return World()
    MPI = import_mpi("running under mpiexec / srun")
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return World()
    return World(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm)


def flatten(grads: dict, names: list) -> np.ndarray:
    """The gradients ``names`` (in that order) as one host 1-D array (their common dtype)."""
    parts = [np.ravel(backend_of(grads[n]).to_numpy(grads[n])) for n in names]
    return np.concatenate(parts) if parts else np.zeros((0,))


def unflatten(flat: np.ndarray, like: dict, names: list, bk) -> dict:
    """Inverse of :func:`flatten`: arrays of ``like[name]``'s shape and dtype on backend ``bk``."""
    out, at = {}, 0
    for n in names:
        shape = tuple(like[n].shape)
        size = int(np.prod(shape)) if shape else 1
        out[n] = bk.asarray(flat[at:at + size].reshape(shape), dtype=str(like[n].dtype))
        at += size
    return out
