"""Property-based fuzzing of every subcommand's input: malformed configs, CLI values, metrics
lines, run metadata, recipes and golden files. Every one must end with exit 2, ONE line on
stderr and no traceback (docs/architecture.md, "Errors"), before any long work starts.

The fast lane runs a few examples of each (``FAST``); the ``slow`` variants run many more.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from refmtp.cli.main import cli
from refmtp.config import preset
from tests.test_train import text_file  # noqa: F401 (fixture)

FAST, SLOW = 10, 150
HUGE = st.integers(min_value=10**10, max_value=10**13)  # no machine holds these models
JUNK = st.sampled_from([None, [], {}, "x", -1, 0, 1.5, True, [1.0], {"a": 1}])
BAD_FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, -1.0])


def assert_refused(r, *, code=2):
    """Exit ``code``, one line on stderr, no traceback, no exception but the exit."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(lines) == 1, r.stderr


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fuzz(n, derandomize=True):
    return settings(max_examples=n, deadline=None, derandomize=derandomize,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# -------------------------------------------------------------------------------------------
# strategies
# -------------------------------------------------------------------------------------------
DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
        "v_head_dim", "intermediate_size", "n_routed_experts", "moe_intermediate_size",
        "num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim")
INVALID_DIM = st.sampled_from([None, "x", [], {}, -1, 1.5, True, [4]])


@st.composite
def bad_config(draw):
    """A config.json (bytes) that no command may accept."""
    d = preset("tiny").to_dict()
    kind = draw(st.sampled_from(["dim", "huge", "rope", "number", "choice", "unknown", "garbage"]))
    if kind == "dim":
        field = draw(st.sampled_from([f for f in DIMS if f != "q_lora_rank"]))
        d[field] = draw(INVALID_DIM)
    elif kind == "huge":
        d[draw(st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers",
                                "num_attention_heads", "intermediate_size"]))] = draw(HUGE)
    elif kind == "rope":
        d["rope_scaling"] = {"type": "yarn", "original_max_position_embeddings": 64,
                             "factor": draw(st.sampled_from([None, [], [2.0], "x", 0.5, {}, True]))}
        if draw(st.booleans()):
            d["rope_scaling"] = draw(st.sampled_from([[], "yarn", 4, {"type": "linear", "factor": 2}]))
    elif kind == "number":
        d[draw(st.sampled_from(["rms_norm_eps", "rope_theta", "routed_scaling_factor"]))] = draw(
            st.sampled_from([0, -1.0, None, "x", [], math.inf]))
    elif kind == "choice":
        d[draw(st.sampled_from(["scoring_func", "topk_method"]))] = draw(JUNK.filter(
            lambda v: v not in ("sigmoid", "noaux_tc")))
    elif kind == "unknown":
        d[draw(st.text("abcdefgh_", min_size=3, max_size=8).map(lambda s: "zz_" + s))] = 1
    else:
        return draw(st.sampled_from([b"\xff\xfe\x00garbage", b"[1, 2]", b"5", b"{\"vocab",
                                     b"", b"null", b"{\"refmtp\": 3}"]))
    return json.dumps(d).encode()


METRIC_LINES = st.sampled_from([
    "5", "\"text\"", "[1, 2]", "null", "{}", '{"loss": {"main": 1.0}}', '{"step": "3"}',
    '{"step": 1.5}', '{"step": 2, "loss": 7}', '{"step": 2, "imbalance": [1, 2]}',
    "{not json", "\udcff", '{"step": true}',
])


# -------------------------------------------------------------------------------------------
# fixtures: one small run (checkpoint + run directory), written once
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):  # noqa: F811
    out = tmp_path_factory.mktemp("fuzz") / "run"
    r = CliRunner().invoke(cli, ["train", "--preset", "tiny", "--data", str(text_file), "--steps",
                                 "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


# -------------------------------------------------------------------------------------------
# the properties
# -------------------------------------------------------------------------------------------
def _configs(data, text_file):  # noqa: F811
    raw = data.draw(bad_config())
    command = data.draw(st.sampled_from(["train", "audit", "export"]))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_bytes(raw)
        if command == "train":
            args = ["train", "--config", cfg, "--data", text_file, "--steps", 1, "--out",
                    Path(tmp) / "out"]
        elif command == "audit":
            args = ["audit", "--config", cfg]
        else:
            args = ["golden", "export", "--config", cfg, "--seed", 0, "--out", Path(tmp) / "case"]
        r = invoke(args)
        assert_refused(r)
        assert not (Path(tmp) / "out").exists() and not (Path(tmp) / "case").exists()


@fuzz(FAST)
@given(data=st.data())
def test_fuzz_malformed_configs(data, text_file):  # noqa: F811
    _configs(data, text_file)


@pytest.mark.slow
@fuzz(SLOW, derandomize=False)
@given(data=st.data())
def test_fuzz_malformed_configs_long(data, text_file):  # noqa: F811
    _configs(data, text_file)


def _values(data, run_dir, text_file):  # noqa: F811
    ckpt = str(run_dir)
    case = data.draw(st.sampled_from([
        ["generate", "--ckpt", ckpt, "--prompt", "hi", "--temperature", data.draw(BAD_FLOAT)],
        ["generate", "--ckpt", ckpt, "--prompt", "hi", "--seed", data.draw(st.integers(max_value=-1))],
        ["generate", "--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens",
         data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=10**6)))],
        ["generate", "--ckpt", ckpt, "--prompt", data.draw(st.sampled_from(["", "a\udcff"]))],
        ["generate", "--ckpt", ckpt, "--prompt", "x", "--speculative", data.draw(
            st.one_of(st.integers(max_value=-1), st.integers(min_value=50)))],
        ["speculate", "--ckpt", ckpt, "--temperature", data.draw(BAD_FLOAT)],
        ["speculate", "--ckpt", ckpt, "--samples", data.draw(st.integers(max_value=0))],
        ["speculate", "--ckpt", ckpt, "--json", "/nonexistent-dir/x.json"],
        ["speculate", "--ckpt", ckpt, "--json", str(run_dir)],
        ["train", "--preset", "tiny", "--data", text_file, "--out", "/nonexistent/never",
         "--batch-size", data.draw(st.one_of(HUGE, st.integers(max_value=0),
                                             st.sampled_from(["1e9", "x"])))],
        ["train", "--preset", "tiny", "--data", text_file, "--out", "/nonexistent/never",
         "--lr", data.draw(st.one_of(BAD_FLOAT, st.just(0.0)))],
        ["train", "--preset", "tiny", "--data", text_file, "--out", "/nonexistent/never",
         "--seq-len", data.draw(st.integers(min_value=513, max_value=10**9))],
        ["train", "--preset", data.draw(st.sampled_from(["huge", "", "deepseek-v3"])),
         "--data", text_file, "--out", "/nonexistent/never"],
        ["train", "--seed", data.draw(st.integers(max_value=-1))],
        ["golden", "export", "--preset", data.draw(st.sampled_from(["deepseek-v3", "nope"])),
         "--seed", 0, "--out", "/nonexistent/never"],
        ["golden", "export", "--preset", "tiny", "--seed", 0, "--seq-len",
         data.draw(st.integers(min_value=513, max_value=10**7)), "--out", "/nonexistent/never"],
        ["golden", "export", "--preset", "tiny", "--seed", data.draw(st.integers(max_value=-1)),
         "--out", "/nonexistent/never"],
        ["golden", "export", "--preset", "tiny", "--seed", 0, data.draw(st.sampled_from(
            ["--init-std", "--bias-std"])), data.draw(BAD_FLOAT), "--out", "/nonexistent/never"],
        ["golden", "verify", data.draw(st.sampled_from(["no_such_case", "/nonexistent/dir"]))],
        ["golden", "conformance", "--mutant", "no.such.mutant"],
        ["audit", "--preset", data.draw(st.sampled_from(["huge", "deepseek-v3"]))],
        ["audit", "--position", data.draw(st.integers(min_value=64, max_value=10**6))],
        ["info", "--" + data.draw(st.text("abcxyz", min_size=1, max_size=5))],
        ["plot", str(run_dir), "--out", "x." + data.draw(st.sampled_from(["xyz", "txt", "jpeg2"]))],
    ]))
    assert_refused(invoke(case))


@fuzz(FAST * 3)
@given(data=st.data())
def test_fuzz_cli_values(data, run_dir, text_file):  # noqa: F811
    _values(data, run_dir, text_file)


@pytest.mark.slow
@fuzz(SLOW, derandomize=False)
@given(data=st.data())
def test_fuzz_cli_values_long(data, run_dir, text_file):  # noqa: F811
    _values(data, run_dir, text_file)


def _metrics(data, run_dir):
    lines = data.draw(st.lists(METRIC_LINES, min_size=1, max_size=3))
    binary = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        good = (run_dir / "metrics.jsonl").read_bytes()
        bad = "\n".join(lines).encode("utf-8", "surrogateescape")
        (Path(tmp) / "metrics.jsonl").write_bytes(
            (b"\xff\xfe\x00\x01" if binary else b"") + good + bad + b"\n")
        r = invoke(["plot", tmp, "--out", Path(tmp) / "c.png"])
        if not any(x.strip() for x in lines) and not binary:
            return  # nothing malformed was drawn
        assert_refused(r)


@fuzz(FAST * 2)
@given(data=st.data())
def test_fuzz_metrics_lines(data, run_dir):
    _metrics(data, run_dir)


RUN_KEYS = ("format", "format_version", "settings", "model", "data", "run_id", "overrides")
SETTING_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "decay_steps", "seed",
                "backend", "dtype", "eval_every", "log_every", "beta1", "eps", "data",
                "min_lr_ratio", "eval_batches")
STATE_KEYS = ("step", "tokens_seen", "elapsed_s", "data", "run_id", "data_fingerprint", "seed")
META_JUNK = st.sampled_from([[], {}, "x\u00e9"])


def _run_metadata(data, run_dir):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(run_dir, run)
        ckpt = next(run.glob("checkpoint-*"))
        what = data.draw(st.sampled_from(["run", "settings", "state", "garbage"]))
        if what == "garbage":
            target = data.draw(st.sampled_from([run / "run.json", ckpt / "trainer_state.json",
                                                run / "checkpoints.json"]))
            target.write_bytes(data.draw(st.sampled_from([b"\xff\x00", b"[]", b"{", b"7",
                                                          b"{\"format\": 1}"])))
        else:
            path = run / "run.json" if what in ("run", "settings") else ckpt / "trainer_state.json"
            doc = json.loads(path.read_text())
            if what == "run":
                key = data.draw(st.sampled_from(RUN_KEYS))
                doc[key] = data.draw(st.sampled_from([{}, 5, [1]]) if key == "overrides"
                                     else META_JUNK)
            elif what == "settings":
                doc["settings"][data.draw(st.sampled_from(SETTING_KEYS))] = data.draw(META_JUNK)
            else:
                key = data.draw(st.sampled_from(STATE_KEYS))
                if data.draw(st.booleans()) and key not in ("run_id", "seed", "data_fingerprint"):
                    del doc[key]
                else:
                    doc[key] = data.draw(META_JUNK)
            path.write_text(json.dumps(doc))
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        r = invoke(["train", "--resume", run, "--steps", 4])
        assert_refused(r)
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert after == before  # nothing written


@fuzz(FAST * 3)
@given(data=st.data())
def test_fuzz_run_metadata(data, run_dir):
    _run_metadata(data, run_dir)


@pytest.mark.slow
@fuzz(SLOW, derandomize=False)
@given(data=st.data())
def test_fuzz_run_metadata_long(data, run_dir):
    _run_metadata(data, run_dir)


def _golden(data):
    from refmtp.verification import golden

    case = golden.shipped_case("tiny_d1")
    if case is None:
        pytest.skip("the shipped case tiny_d1 is not there")
    with tempfile.TemporaryDirectory() as tmp:
        what = data.draw(st.sampled_from(["flip", "truncate", "manifest", "recipe"]))
        if what == "recipe":
            recipe = Path(tmp) / "recipe.json"
            builder = data.draw(st.sampled_from(["refmtp.no_such_module:f", "refmtp.config:PRESETS",
                                                 "refmtp.config:nope", "os:system", "refmtp.",
                                                 "refmtp.config:preset"]))
            body = data.draw(st.sampled_from([
                {"cases": {"x": {"kind": "acceptance", "builder": builder}}},
                {"cases": {}}, [], {"cases": {"bad name!": {}}}]))
            recipe.write_text(json.dumps(body))
            assert_refused(invoke(["golden", "generate", "--recipe", recipe, "--out",
                                   Path(tmp) / "out"]))
            return
        d = Path(tmp) / "case"
        shutil.copytree(case, d)
        files = sorted(p for p in d.iterdir() if p.is_file() and p.name != "manifest.json")
        target = data.draw(st.sampled_from(files))
        raw = bytearray(target.read_bytes())
        if what == "flip":
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
            target.write_bytes(bytes(raw))
        elif what == "truncate":
            target.write_bytes(bytes(raw[:data.draw(st.integers(0, len(raw) - 1))]))
        else:
            (d / "manifest.json").write_bytes(data.draw(st.sampled_from(
                [b"\xff", b"[]", b"{}", b"{\"format\": \"x\"}", b"{"])))
        assert_refused(invoke(["golden", "verify", d]))


@fuzz(FAST * 2)
@given(data=st.data())
def test_fuzz_golden_files(data):
    _golden(data)


@pytest.mark.slow
@fuzz(SLOW, derandomize=False)
@given(data=st.data())
def test_fuzz_golden_files_long(data):
    _golden(data)
