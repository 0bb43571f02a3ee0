"""Keeps Numba's on-disk cache of the kernels in step with their sources.

Numba (``cache=True``) keys a compiled kernel on the timestamp and size of the file that
defines it, and on nothing else: a kernel that inlines a helper from another file (the lanes
and the vectorised ``exp`` of backends/numba_expf.py are inlined into most kernels) is loaded
from its old cache after that helper changes, so it would run the old code. Before any kernel
module is imported, :func:`drop_stale` hashes every ``numba_*.py`` source of this directory
(and the name of the package they are imported under) and, when the hash differs from the one
recorded beside the cache, removes this directory's cached kernels (``__pycache__/*.nbi``,
``*.nbc``) so that they compile again from the current sources. (Numba itself recompiles when a
data file named in an index is gone, so another process removing them meanwhile is harmless.)
When ``NUMBA_CACHE_DIR`` is set, Numba keeps the cache there instead, and it is left alone
(whoever sets it owns it); a directory that cannot be written is left alone too (Numba then
caches elsewhere or not at all).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMP = "refmtp_numba_sources.sha256"


def sources_digest(directory: Path = HERE, package: str = __package__ or "") -> str:
    """sha256 over the package name the kernels are imported under and the names and bytes of
    the directory's ``numba_*.py`` files, in name order. (A kernel cached while its module was
    imported under another name, ``backends.numba_x`` from a checkout on ``sys.path`` say,
    refers to that name and fails to load under ``refmtp.backends``.)"""
    h = hashlib.sha256(package.encode() + b"\0")
    for path in sorted(directory.glob("numba_*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def drop_stale(directory: Path = HERE, package: str = __package__ or "") -> bool:
    """Remove the cached kernels under ``directory/__pycache__`` when the sources (or the package
    name) changed since they were recorded; returns whether it removed anything."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    cache = directory / "__pycache__"
    digest = sources_digest(directory, package)
    stamp = cache / STAMP
    try:
        if stamp.read_text().strip() == digest:
            return False
    except OSError:
        pass  # no stamp yet: whatever is cached predates it
    removed = False
    try:
        cache.mkdir(exist_ok=True)
        for path in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            path.unlink(missing_ok=True)
            removed = True
        tmp = cache / f"{STAMP}.{os.getpid()}"
        tmp.write_text(digest + "\n")
        os.replace(tmp, stamp)  # atomic: a concurrent reader sees the old stamp or the new one
    except OSError:
        return removed
    return removed
