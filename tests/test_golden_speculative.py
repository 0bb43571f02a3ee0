"""Speculative golden cases (kind "speculative", docs/golden-format.md §1.5): generation is
byte-stable, refmtp verifies, and ``verify --against`` names the first diverging step and why
(draft, accept decision, residual sample, bonus) for outputs tampered in each of these ways;
the greedy cases equal plain greedy decoding (the lossless rule at temperature 0)."""
from __future__ import annotations

import filecmp

import numpy as np
import pytest
from click.testing import CliRunner

from refmtp.checkpoint import load_checkpoint
from refmtp.cli.main import cli
from refmtp.inference.decode import Decoder, generate as plain_generate
from refmtp.inference.sampling import rng_v1_draws
from refmtp.verification.golden.files import RECIPE, read_tensors, save_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import generate, load_recipe, shipped_cases, shipped_dir
from refmtp.verification.golden.report import format_report
from refmtp.verification.golden.verify import verify_case

ROOT = shipped_dir()
CASES = [n for n, e in shipped_cases(load_recipe(ROOT / RECIPE)).items() if e.get("kind") == "speculative"]
GREEDY = [n for n in CASES if read_manifest(ROOT / n)["speculative"]["temperature"] == 0]


def _expected(name):
    return read_tensors(ROOT / name / "expected.safetensors")


def _steps(exp):
    return sum(1 for n in exp if n.endswith(".num_accepted"))


def _verify_tampered(tmp_path, name, change):
    """Save the golden outputs with ``change(outputs)`` applied; verify --against them."""
    out = dict(_expected(name))
    change(out)
    path = tmp_path / "out.safetensors"
    save_tensors(path, out)
    report = verify_case(ROOT / name, against=path)
    assert report.status == "mismatch"
    lines = [h for h in report.hints if h.startswith("first divergence")]
    assert len(lines) == 1 and lines[0] in format_report(report), format_report(report)
    return lines[0]


def _find_step(exp, pred):
    return next(s for s in range(_steps(exp)) if pred(s, len(exp[f"spec.{s}.drafts"]),
                                                      int(exp[f"spec.{s}.num_accepted"])))


def test_shipped_set_covers_the_settings():
    ms = {n: read_manifest(ROOT / n)["speculative"] for n in CASES}
    d = {n: load_checkpoint(ROOT / n, backend="numpy")[0].D for n in CASES}
    assert any(m["temperature"] == 0 for m in ms.values()) and any(m["temperature"] == 1 for m in ms.values())
    assert any(1 <= m["k"] <= d[n] for n, m in ms.items())
    assert any(m["k"] > d[n] and m["reuse_last_module"] for n, m in ms.items())
    assert all(m["rule"] == "lossless" for m in ms.values())
    size = sum(p.stat().st_size for n in CASES for p in (ROOT / n).iterdir())
    assert size < 1_000_000, size
    for n in CASES:  # both decisions and both kinds of correction token occur
        exp = _expected(n)
        kinds = {("bonus" if A == K else "residual") for s in range(_steps(exp))
                 for K, A in [(len(exp[f"spec.{s}.drafts"]), int(exp[f"spec.{s}.num_accepted"]))] if K}
        assert kinds == {"bonus", "residual"}, n


def test_generate_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, only=CASES)
    generate(b, only=CASES)
    for n in CASES:  # the same machine makes the same bytes
        names = sorted(p.name for p in (ROOT / n).iterdir())
        assert sorted(p.name for p in (a / n).iterdir()) == names
        for f in names:
            assert filecmp.cmp(a / n / f, b / n / f, shallow=False), (n, f)
    # The shipped files are what the recipe makes: config, inputs, weights, every decision and
    # token exactly; the float outputs to rounding (BLAS picks its kernels by machine, and its
    # float64 products move by ~1e-15 between kernels).
    for n in CASES:
        for f in ("config.json", "inputs.safetensors", "model.safetensors"):
            assert filecmp.cmp(ROOT / n / f, a / n / f, shallow=False), (n, f)
        shipped, fresh = _expected(n), read_tensors(a / n / "expected.safetensors")
        assert sorted(shipped) == sorted(fresh)
        for k, want in shipped.items():
            got = fresh[k]
            assert got.dtype == want.dtype and got.shape == want.shape, (n, k)
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max(initial=1.0)),
                                           err_msg=f"{n} {k}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{n} {k}")
        ms, mf = read_manifest(ROOT / n), read_manifest(a / n)
        assert ms["recipe"] == mf["recipe"] and ms["command"] == mf["command"] and ms["tensors"] == mf["tensors"]


@pytest.mark.parametrize("name", CASES)
def test_refmtp_verifies_and_against_its_own_outputs(name, tmp_path):
    report = verify_case(ROOT / name)
    assert report.status == "pass" and not report.hints, format_report(report)
    path = tmp_path / "out.safetensors"
    save_tensors(path, _expected(name))
    code = CliRunner().invoke(cli, ["golden", "verify", name, "--against", str(path)]).exit_code
    assert code == 0


def test_coins_are_rng_v1_from_the_seed():
    name = next(n for n in CASES if read_manifest(ROOT / n)["speculative"]["temperature"] > 0)
    m = read_manifest(ROOT / name)
    inputs, exp = read_tensors(ROOT / name / "inputs.safetensors"), _expected(name)
    gen = np.random.Generator(np.random.PCG64(m["seed"]))  # accept/sample coins: the seed itself
    drafts = np.random.Generator(np.random.PCG64(np.random.SeedSequence(m["seed"]).spawn(1)[0]))
    for s in range(_steps(exp)):
        K = len(exp[f"spec.{s}.drafts"])
        u_accept, u_sample = rng_v1_draws(gen, K)
        assert np.array_equal(inputs[f"spec.{s}.u_accept"], u_accept)
        assert float(inputs[f"spec.{s}.u_sample"]) == u_sample
        if K:  # sampled drafts: one coin each from the child stream, in draft order
            assert np.array_equal(inputs[f"spec.{s}.u_draft"], drafts.random(K))


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_speculative_equals_plain_greedy(name):
    cfg, params = load_checkpoint(ROOT / name, backend="numpy")
    prompt = read_tensors(ROOT / name / "inputs.safetensors")["prompt"]
    exp = _expected(name)
    plain = plain_generate(Decoder(params, cfg), prompt.tolist(), len(exp["spec.final_tokens"]))
    assert plain == exp["spec.final_tokens"].tolist()


def test_changed_residual_token_is_the_first_divergence(tmp_path):
    name = "spec_greedy_k1"
    exp = _expected(name)
    s = _find_step(exp, lambda s, K, A: K and A < K)

    def change(out):
        t = out[f"spec.{s}.tokens"].copy()
        t[-1] = (t[-1] + 1) % 64
        out[f"spec.{s}.tokens"] = t
    line = _verify_tampered(tmp_path, name, change)
    assert line.startswith(f"first divergence: step {s} (residual sample): "), line


def test_changed_bonus_token_is_the_first_divergence(tmp_path):
    name = "spec_greedy_k3_reuse"
    exp = _expected(name)
    s = _find_step(exp, lambda s, K, A: K and A == K)

    def change(out):
        t = out[f"spec.{s}.tokens"].copy()
        t[-1] = (t[-1] + 1) % 64
        out[f"spec.{s}.tokens"] = t
        later = out[f"spec.{s + 1}.drafts"].copy()  # what an engine would do next differs too
        out[f"spec.{s + 1}.drafts"] = (later + 1) % 64
    line = _verify_tampered(tmp_path, name, change)
    assert line.startswith(f"first divergence: step {s} (bonus): "), line


def test_wrong_accept_decision_is_the_first_divergence(tmp_path):
    name = "spec_t1_k2"
    exp = _expected(name)
    s = _find_step(exp, lambda s, K, A: K and A < K)

    def change(out):
        out[f"spec.{s}.num_accepted"] = out[f"spec.{s}.num_accepted"] + 1
    line = _verify_tampered(tmp_path, name, change)
    assert line.startswith(f"first divergence: step {s} (accept decision): "), line


def test_wrong_draft_is_the_first_divergence(tmp_path):
    name = "spec_greedy_k3_reuse"
    exp = _expected(name)
    s = _find_step(exp, lambda s, K, A: s > 0 and K == 3)

    def change(out):
        d = out[f"spec.{s}.drafts"].copy()
        d[2] = (d[2] + 1) % 64  # the reused module's draft
        out[f"spec.{s}.drafts"] = d
        out[f"spec.{s + 1}.num_accepted"] = out[f"spec.{s + 1}.num_accepted"] * 0
    line = _verify_tampered(tmp_path, name, change)
    assert line.startswith(f"first divergence: step {s} (draft): draft 3 is "), line


def test_distribution_only_and_cli_line(tmp_path):
    name = "spec_t1_k2"
    out = dict(_expected(name))
    p = out["spec.1.p"].copy()
    p[0, int(np.argmax(p[0]))] *= 1 + 1e-6  # 1e-6 relative: beyond float64's 1e-9
    out["spec.1.p"] = p
    path = tmp_path / "out.safetensors"
    save_tensors(path, out)
    res = CliRunner().invoke(cli, ["golden", "verify", name, "--against", str(path)])
    assert res.exit_code == 1
    assert "first divergence: step 1 (distribution): spec.1.p max abs err" in res.output, res.output
