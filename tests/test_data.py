"""The byte corpus, its held-out split, and the seeded window sampler."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from refmtp.training.data import (HELDOUT_FRACTION, STDLIB_EXCLUDED_DIRS, WindowSampler, check_window,
                         heldout_windows, load_corpus, stdlib_files)


def test_default_corpus_is_the_stdlib_source_in_sorted_order():
    root, names = stdlib_files()
    assert root == Path(sysconfig.get_paths()["stdlib"])
    assert names == sorted(names) and len(names) > 100
    assert "os.py" in names and "json/decoder.py" in names
    for n in names:
        parts = n.split("/")
        assert n.endswith(".py") and not parts[-1].startswith("_sysconfigdata")
        assert not set(parts[:-1]) & STDLIB_EXCLUDED_DIRS, n
        assert not any(p.startswith(("config-", ".")) for p in parts[:-1]), n

    corpus = load_corpus()
    n_held = int(np.ceil(HELDOUT_FRACTION * len(names)))
    held = b"".join((root / n).read_bytes() for n in names[-n_held:])
    assert corpus.split == "files"
    assert corpus.heldout.tobytes() == held
    assert corpus.train.size + corpus.heldout.size == sum(
        (root / n).stat().st_size for n in names)
    assert corpus.train[:200].tobytes() == (root / names[0]).read_bytes()[:200]
    assert load_corpus().fingerprint == corpus.fingerprint  # reproducible


def test_single_file_holds_out_last_five_percent_of_bytes(tmp_path):
    text = bytes(range(256)) * 8  # 2048 bytes
    (tmp_path / "a.txt").write_bytes(text)
    c = load_corpus(tmp_path / "a.txt")
    n_held = int(np.ceil(0.05 * len(text)))
    assert c.split == "bytes" and c.heldout.size == n_held
    assert c.train.tobytes() + c.heldout.tobytes() == text
    assert c.heldout.tobytes() == text[-n_held:]


def test_directory_split_by_files_or_bytes(tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.txt").write_text(f"file {i}\n" * 50)
    (few / ".hidden").write_text("never read")
    c = load_corpus(few)
    assert c.split == "bytes" and c.files == ("0.txt", "1.txt", "2.txt")
    many = tmp_path / "many"
    (many / "sub").mkdir(parents=True)
    for i in range(30):
        (many / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_text(f"text {i}\n" * 10)
    c = load_corpus(many)
    assert c.split == "files" and len(c.files) == 30 and list(c.files) == sorted(c.files)
    # the last ceil(0.05 * 30) = 2 files in sorted relative-path order are held out
    held = b"".join((many / n).read_bytes() for n in c.files[-2:])
    assert c.heldout.tobytes() == held
    (many / "f00.txt").write_text("changed\n")
    assert load_corpus(many).fingerprint != c.fingerprint


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as e:
        load_corpus(tmp_path / "nope")
    assert "\n" not in str(e.value)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "emptydir")
    (tmp_path / "short.txt").write_text("abc" * 10)
    with pytest.raises(ValueError, match="smaller --seq-len"):
        check_window(load_corpus(tmp_path / "short.txt"), 64)


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "locked.txt"
    p.write_text("secret " * 100)

    def deny(self):  # chmod 000 does not stop root, so refuse the read itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ValueError, match="cannot read .*Permission denied") as e:
        load_corpus(p)
    assert "\n" not in str(e.value)


def test_sampler_windows_are_corpus_slices_and_resume_exactly(backend):
    tokens = np.frombuffer(bytes(range(256)) * 4, dtype=np.uint8).copy()  # token i = i % 256
    s = WindowSampler(tokens, seq_len=9, seed=5, backend=backend)
    batch = s.next(4)
    assert tuple(batch.shape) == (4, 10) and str(batch.dtype) == "int64"
    host = backend.to_numpy(batch)
    assert np.all((np.diff(host, axis=1) % 256) == 1)  # contiguous windows of the corpus
    state = json.loads(json.dumps(s.state()))  # JSON round trip, as in trainer_state.json
    nxt = [s.next_host(4) for _ in range(3)]
    s2 = WindowSampler(tokens, seq_len=9, seed=5, backend=backend)
    s2.set_state(state)
    assert s2.batches == 1
    for want in nxt:
        np.testing.assert_array_equal(s2.next_host(4), want)
    # same seed -> same first batch; other seed -> other windows
    np.testing.assert_array_equal(
        backend.to_numpy(WindowSampler(tokens, 9, 5, backend).next(4)), host)
    assert not np.array_equal(WindowSampler(tokens, 9, 6, backend).next_host(4), host)


def test_sampler_reaches_both_ends():
    from refmtp.backends import get_backend

    tokens = np.arange(12, dtype=np.uint8)
    s = WindowSampler(tokens, seq_len=10, seed=0, backend=get_backend("numpy"))
    starts = {int(s.next_host(1)[0, 0]) for _ in range(200)}
    assert starts == {0, 1}  # windows of 11 tokens in 12: offsets 0 and 1 only


def test_heldout_windows_fixed_and_in_range():
    tokens = np.arange(100, dtype=np.uint8)
    w = heldout_windows(tokens, seq_len=9, n_windows=5)
    assert w.shape == (5, 10)
    assert w[0, 0] == 0 and w[-1, -1] == 99  # first and last possible windows
    np.testing.assert_array_equal(w, heldout_windows(tokens, 9, 5))
    with pytest.raises(ValueError):
        heldout_windows(tokens[:5], 9, 1)
