"""backends/numba_cache.py: the kernels' Numba cache is dropped when any kernel source changes."""
from __future__ import annotations

from refmtp.backends import numba_cache


def _cached(tmp_path):
    cache = tmp_path / "__pycache__"
    cache.mkdir(exist_ok=True)
    for name in ("numba_a._loop-1.py311.nbi", "numba_a._loop-1.py311.1.nbc", "numba_b.f-3.py311.nbi"):
        (cache / name).write_bytes(b"compiled")
    (cache / "numba_a.cpython-311.pyc").write_bytes(b"bytecode")
    return cache


def test_a_changed_helper_source_drops_every_cached_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    (tmp_path / "numba_a.py").write_text("A = 1\n")
    (tmp_path / "numba_helper.py").write_text("H = 1\n")
    cache = _cached(tmp_path)
    assert numba_cache.drop_stale(tmp_path)  # no stamp: what is cached predates it
    assert not list(cache.glob("*.nb?")) and (cache / "numba_a.cpython-311.pyc").exists()
    _cached(tmp_path)
    assert not numba_cache.drop_stale(tmp_path)  # same sources: the cache stays
    assert len(list(cache.glob("*.nb?"))) == 3
    (tmp_path / "numba_helper.py").write_text("H = 2\n")  # only the inlined helper changes
    assert numba_cache.drop_stale(tmp_path)
    assert not list(cache.glob("*.nb?"))
    (tmp_path / "other.py").write_text("x = 1\n")  # not a kernel source
    _cached(tmp_path)
    assert not numba_cache.drop_stale(tmp_path)


def test_a_numba_cache_dir_of_the_users_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "numba_a.py").write_text("A = 1\n")
    cache = _cached(tmp_path)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert not numba_cache.drop_stale(tmp_path)
    assert len(list(cache.glob("*.nb?"))) == 3


def test_the_digest_covers_names_bytes_and_the_package(tmp_path):
    (tmp_path / "numba_a.py").write_text("A = 1\n")
    d1 = numba_cache.sources_digest(tmp_path)
    assert numba_cache.sources_digest(tmp_path, "backends") != d1  # imported under another name
    (tmp_path / "numba_a.py").rename(tmp_path / "numba_b.py")
    assert numba_cache.sources_digest(tmp_path) != d1
    assert numba_cache.__package__ == "refmtp.backends"
