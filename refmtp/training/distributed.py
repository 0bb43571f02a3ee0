"""The processes of one run under MPI: who this rank is, the few exchanges training needs,
and stopping every rank together (docs/distributed.md).

    world = detect_world()          # World(rank=0, size=1) unless launched by mpiexec / srun
    rows = world.allgather(obj)     # [obj of rank 0, obj of rank 1, ...]: always rank order
    g = world.allgather_rows(a)     # (size * n, P) host array: rank r's n rows at r*n .. r*n+n-1
    out, got = world.alltoallv(rows, counts, "the dispatch")   # expert parallelism's exchange
    world.abort("one line", code)   # print on this rank, then MPI_Abort: every rank stops

MPI is used only when a launcher started the process (its environment says so, see
:data:`LAUNCHER_ENV`); then mpi4py must be importable, else :class:`MPIUnavailable` (a
ValueError: one line, exit 2) says how to install it. A single process never imports mpi4py.

Determinism: nothing here reduces with ``MPI.SUM``, whose order MPI leaves open. Gradients
travel by an all-gather and every rank sums the rows itself in rank order (refmtp.training.step),
so the result is the bits of a single process accumulating the same microbatches in order.

A deadline on every exchange (``world.timeout`` seconds, ``--rank-timeout``; 0: none). Every
exchange is nonblocking and the rank polls its requests against the deadline: the expert
dispatch and combine are MPI's all-to-all (``Ialltoall`` of the counts, ``Ialltoallv`` of the
rows); the others are point-to-point (``Isend`` / ``Irecv`` of the same buffers a collective
would move, each message from its sender to its receiver). A request still open at the deadline
names its peer, so the line says which ranks have not arrived::

    refmtp: rank 0 of 2: step 7: the gradient all-gather: rank 1 has not arrived within
    --rank-timeout 5 s (hung, stopped or much slower); stopping every rank

then MPI_Abort stops every rank (exit code :data:`TIMEOUT_EXIT`).
"""
from __future__ import annotations

import io
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np  # host buffers for MPI (mpi4py sends numpy arrays without copies)

from refmtp.backends import backend_of

INSTALL_HINT = 'pip install "refmtp[mpi]"'
# Set by the MPI launchers for every process they start: MPICH/Intel hydra (PMI_*), Open MPI,
# PMIx (srun --mpi=pmix, prterun), MVAPICH.
LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# `refmtp launch` sets it to a directory where every rank leaves ``rank-R.pid`` (its process id),
# so the launcher can name the rank of a process that was killed (refmtp.cli.launch).
PID_DIR_ENV = "REFMTP_LAUNCH_PID_DIR"
ABORT_FLUSH_S = 0.5  # between a rank's last line and MPI_Abort
DEFAULT_TIMEOUT = 300.0  # seconds, --rank-timeout: a rank waits this long for the others
TIMEOUT_EXIT = 124  # exit code of a run stopped by the deadline (as timeout(1) has it)
TAG_SPACE = 30000  # message tags 1 .. TAG_SPACE, one per exchange in turn (MPI guarantees 32767)


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


class _RankUnpickler(pickle.Unpickler):
    """Reads only what the ranks of one run send each other: builtins, numpy arrays, dtypes and
    scalars, paths, and refmtp's own settings classes. Objects cross between the processes of one job
    (never from a file: checkpoints are safetensors and JSON); anything else is refused, so a
    stray message cannot run code."""

    _NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
              ("numpy.core.numeric", "_frombuffer")}
    _PATHS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path")}
    _BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "bytearray", "complex", "slice", "range"}

    def find_class(self, module, name):
        if (module, name) in self._NUMPY | self._PATHS or (module == "builtins" and name in self._BUILTINS) or \
                module == "refmtp" or module.startswith("refmtp.") or (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"rank message: {module}.{name} is not a type ranks exchange")


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size``; ``comm`` is MPI.COMM_WORLD or None.

    ``timeout``: seconds an exchange may wait for the other ranks (0: forever); ``where``: what
    the run is doing (``"step 12"``), for the line of a rank that gives up."""

    rank: int = 0
    size: int = 1
    comm: Any = None
    timeout: float = 0.0
    where: str = "start-up"
    _stderr_fd: int | None = None  # the real stderr of a silenced rank, for abort's line
    _exchanges: int = 0  # exchanges so far: every rank counts the same, the tag of the next

    @property
    def writes(self) -> bool:
        """Rank 0 writes every file and prints; the other ranks only compute."""
        return self.rank == 0

    @property
    def peers(self) -> list:
        return [q for q in range(self.size) if q != self.rank]

    # -- the one primitive: point-to-point messages, nonblocking, waited for against the deadline
    def exchange(self, sends: dict, recvs: dict, what: str) -> None:
        """Send ``sends[q]`` to rank q and receive ``recvs[q]`` (preallocated, contiguous) from
        rank q, for every q given; returns when all have arrived, or stops every rank when the
        deadline passes first. Every rank calls its exchanges in the same order (the tag)."""
        self._exchanges += 1
        tag = 1 + self._exchanges % TAG_SPACE
        comm = self.comm
        open_ = [(q, comm.Irecv(buf, source=q, tag=tag)) for q, buf in recvs.items()]
        open_ += [(q, comm.Isend(buf, dest=q, tag=tag)) for q, buf in sends.items()]
        self._wait(open_, what)

    def _wait_collective(self, request, what: str) -> None:
        """:meth:`_wait` for one collective's request: any other rank may be the late one."""
        self._wait([(q, request) for q in (self.peers or [self.rank])], what)

    def _wait(self, open_: list, what: str) -> None:
        """Poll the requests ``[(peer, request)]`` until all are done, or stop every rank at the
        deadline, naming the peers whose requests are still open."""
        start = time.monotonic()
        while open_:
            open_ = [(q, r) for q, r in open_ if not r.Test()]
            if not open_:
                break
            if self.timeout > 0 and time.monotonic() - start > self.timeout:
                late = sorted({q for q, _ in open_})
                who = (f"rank {late[0]} has" if len(late) == 1
                       else "ranks " + ", ".join(map(str, late)) + " have")
                self.abort(f"{self.where}: {what}: {who} not arrived within --rank-timeout "
                           f"{self.timeout:g} s (hung, stopped or much slower)", TIMEOUT_EXIT)
            time.sleep(0)  # give the core to another process (4 ranks on 2 cores)

    def _objects(self, sends: dict, sources: list, what: str) -> dict:
        """Pickled objects: ``sends[q]`` to rank q; {q: object} from every q in ``sources``."""
        data = {q: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for q, obj in sends.items()}
        sizes = {q: np.empty(1, dtype=np.int64) for q in sources}
        self.exchange({q: np.array([len(b)], dtype=np.int64) for q, b in data.items()}, sizes, what)
        bufs = {q: bytearray(int(n[0])) for q, n in sizes.items()}
        self.exchange(data, bufs, what)
        return {q: _RankUnpickler(io.BytesIO(b)).load() for q, b in bufs.items()}

    def allgather(self, obj, what: str = "the exchange of losses and loads") -> list:
        """Every rank's ``obj`` (small, pickled), in rank order."""
        if self.comm is None:
            return [obj]
        got = self._objects({q: obj for q in self.peers}, self.peers, what)
        got[self.rank] = _RankUnpickler(io.BytesIO(pickle.dumps(obj))).load()  # a copy, as the others receive
        return [got[q] for q in range(self.size)]

    def bcast(self, obj, what: str = "the start of the run"):
        """Rank 0's ``obj`` (pickled) on every rank."""
        if self.comm is None:
            return obj
        if self.rank == 0:
            self._objects({q: obj for q in self.peers}, [], what)
            return obj
        return self._objects({}, [0], what)[0]

    def scatter(self, make, what: str):
        """Rank 0 sends ``make(r)`` to every rank r > 0, one rank after the other (one object
        built at a time); returns it on rank r, None on rank 0 (the others pass ``make=None``)."""
        got = None
        for q in range(1, self.size):
            if self.rank == 0:
                self._objects({q: make(q)}, [], what)
            elif self.rank == q:
                got = self._objects({}, [0], what)[0]
            else:  # nothing to move; every rank still counts the exchange (the tags stay equal)
                self._objects({}, [], what)
        return got

    def gather(self, obj, what: str) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0; None on the others."""
        if self.comm is None:
            return [obj]
        if self.rank == 0:
            got = self._objects({}, self.peers, what)
            return [obj] + [got[q] for q in self.peers]
        self._objects({0: obj}, [], what)
        return None

    def any(self, flag: bool, what: str = "the agreement on stopping") -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return any(self.allgather(bool(flag), what))

    def allgather_rows(self, rows: np.ndarray, what: str = "the gradient all-gather") -> np.ndarray:
        """rows (n, P) of every rank -> (size * n, P), rank r's rows at ``r*n .. r*n + n - 1``.

        Every rank must give the same shape and dtype (the step checks it with the metadata)."""
        rows = np.ascontiguousarray(rows)
        if self.comm is None:
            return rows
        n = rows.shape[0]
        out = np.empty((self.size * n,) + rows.shape[1:], dtype=rows.dtype)
        out[self.rank * n:(self.rank + 1) * n] = rows
        self.exchange({q: rows for q in self.peers},
                      {q: out[q * n:(q + 1) * n] for q in self.peers}, what)
        return out

    def alltoallv(self, rows: np.ndarray, counts, what: str):
        """``rows`` (S, ...) sorted by destination, ``counts[q]`` of them for rank q -> (the rows
        every rank sent here, in source-rank order; how many came from each rank).

        MPI's all-to-all, nonblocking (``Ialltoall`` of the counts, then ``Ialltoallv`` of the
        rows) and waited for against the deadline; a collective does not say which rank is
        missing, so a late exchange names every other rank."""
        rows = np.ascontiguousarray(rows)
        counts = np.asarray(counts, dtype=np.int64)
        if self.comm is None:
            return rows, counts
        got = np.empty_like(counts)
        self._wait_collective(self.comm.Ialltoall(counts, got), what)
        width = int(np.prod(rows.shape[1:], dtype=np.int64))  # elements per row
        out = np.empty((int(got.sum()),) + rows.shape[1:], dtype=rows.dtype)
        send = (counts * width, np.concatenate([[0], np.cumsum(counts)[:-1]]) * width)
        recv = (got * width, np.concatenate([[0], np.cumsum(got)[:-1]]) * width)
        self._wait_collective(self.comm.Ialltoallv([rows.reshape(-1), send], [out.reshape(-1), recv]), what)
        return out, got

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
        pid_dir = os.environ.get(PID_DIR_ENV)
        if pid_dir:  # refmtp launch also reads it there: MPI_Abort may outrun the forwarded line
            try:
                with open(os.path.join(pid_dir, f"rank-{self.rank}.abort"), "w") as f:
                    f.write(text)
            except OSError:
                pass
        if self.comm is not None:
            time.sleep(ABORT_FLUSH_S)  # let mpiexec forward the line before it tears the run down
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
    world = World(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm)
    pid_dir = (os.environ if environ is None else environ).get(PID_DIR_ENV)
    if pid_dir:  # refmtp launch names a killed rank by its process id
        try:
            with open(os.path.join(pid_dir, f"rank-{world.rank}.pid"), "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError:
            pass  # another node: the launcher then names the process id only
    return world


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
