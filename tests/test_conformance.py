"""The bug catalog (refmtp.mutation) against the shipped golden cases (docs/conformance.md).

* every mutant fails at least one shipped case and the unmutated model passes all of them;
* golden/conformance.json and the tables of docs/conformance.md are what the command generates;
* the diagnosis ranks every mutant (or one indistinguishable from it) first on every case it
  fails, also with perturbed error magnitudes (an independent implementation's rounding);
* an outputs file carrying a mutant fails `verify --against` and names that mutant first.
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from refmtp.verification import conformance as conf
from refmtp.verification.golden.files import read_tensors, save_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import shipped_dir
from refmtp.verification.golden.verify import recompute
from refmtp.backends import kernels_enabled
from refmtp.cli.main import cli as main
from refmtp.mutation import CATALOG, IDS, active, mutation, on

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"rope", "mla", "decode", "router", "experts", "balance", "bias_update", "mtp",
              "loss", "optim", "acceptance"}
SOURCE = re.compile(r"[\w.-]+/[\w.-]+#\d+")


# -------------------------------------------------------------------------------------------
# the catalog and its switch
# -------------------------------------------------------------------------------------------
def test_catalog_entries():
    assert len(CATALOG) >= 40
    assert len(IDS) == len(CATALOG), "mutant ids must be unique"
    for m in CATALOG:
        assert m.component in COMPONENTS, m
        assert m.id.split(".")[0] == m.component, m
        assert m.what and "\n" not in m.what, m
        for ref in filter(None, (s.strip() for s in m.source.split(","))):
            assert SOURCE.fullmatch(ref), f"{m.id}: source {ref!r} is not owner/repo#N"
    assert sum(bool(m.source) for m in CATALOG) >= 15
    assert {m.component for m in CATALOG} == COMPONENTS


def test_every_switch_is_in_the_code_and_every_id_is_switched():
    """Each catalog id appears as on("<id>") in refmtp/, and every on("...") names a catalog id."""
    used = set()
    for path in (ROOT / "refmtp").rglob("*.py"):
        used |= set(re.findall(r'\bon\("([\w.]+)"\)', path.read_text()))
    assert used == set(IDS)


def test_mutation_is_off_by_default_and_scoped():
    assert active() == frozenset()
    kernels = kernels_enabled()
    with mutation("router.mask_zero"):
        assert on("router.mask_zero") and not on("router.no_scaling")
        assert not kernels_enabled()
    assert active() == frozenset() and not on("router.mask_zero")
    assert kernels_enabled() == kernels
    with pytest.raises(ValueError, match="unknown mutant"):
        with mutation("router.no_such_bug"):
            pass


def test_mutation_switches_off_after_an_exception():
    with pytest.raises(RuntimeError):
        with mutation("mla.no_causal_mask"):
            raise RuntimeError("boom")
    assert active() == frozenset()


# -------------------------------------------------------------------------------------------
# proven coverage
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh():
    return conf.run_catalog()  # also asserts that every case passes unmutated


@pytest.mark.slow
def test_every_mutant_fails_a_shipped_case(fresh):
    assert not fresh.errors, f"mutants crashed instead of producing outputs: {fresh.errors}"
    missed = [mid for mid, p in fresh.prints.items() if not p]
    assert not missed, f"mutants no shipped case catches: {missed}"
    assert set(fresh.prints) == set(IDS)


@pytest.mark.slow
def test_stored_fingerprints_are_generated(fresh):
    stored = conf.load_fingerprints()
    assert stored["catalog_sha256"] == conf.catalog_digest()
    assert {c: {k: v[k] for k in ("kind", "sha256", "n")} for c, v in stored["cases"].items()} == fresh.cases
    for mid, per_case in fresh.prints.items():
        assert set(stored["mutants"][mid]) == set(per_case), mid
        for case, fp in per_case.items():
            old = stored["mutants"][mid][case]
            assert set(old) == set(fp), (mid, case)
            for name, mag in fp.items():  # magnitudes may move by a rounding step across BLAS builds
                assert mag == old[name] if isinstance(mag, str) else abs(mag - old[name]) <= 0.3


@pytest.mark.slow
def test_coverage_page_is_generated(fresh):
    page = (ROOT / "docs" / "conformance.md").read_text()
    assert page == conf.render_page(page, fresh), "run `refmtp golden conformance --write`"
    assert f"**Coverage: {len(CATALOG)} of {len(CATALOG)} mutants (100%)" in page


# -------------------------------------------------------------------------------------------
# diagnosis
# -------------------------------------------------------------------------------------------
def _best(case, observed, prints):
    ranked = conf.likely_causes(case, observed, prints, top=0)
    best = ranked[0][0]
    return [mid for score, mid in ranked if score == best]


def _indistinguishable(a, b, case, prints):
    return set(prints["mutants"][a][case]) == set(prints["mutants"][b][case])


def test_diagnosis_ranks_each_mutant_first():
    prints = conf.load_fingerprints()
    pairs = [(mid, case) for mid, per in prints["mutants"].items() for case in per]
    assert len(pairs) >= len(CATALOG)
    for mid, case in pairs:
        top = _best(case, prints["mutants"][mid][case], prints)
        assert mid in top or all(_indistinguishable(mid, t, case, prints) for t in top), (mid, case, top)


def test_diagnosis_survives_rounding_noise():
    """An independent implementation carrying the mutant rounds differently: magnitudes move
    by up to half a decade, and the mutant (or an indistinguishable one) still ranks first."""
    prints = conf.load_fingerprints()
    rng = random.Random(0)
    for mid, per in prints["mutants"].items():
        for case, fp in per.items():
            noisy = {n: m if isinstance(m, str) else m + rng.uniform(-0.5, 0.5) for n, m in fp.items()}
            top = _best(case, noisy, prints)
            assert mid in top or all(_indistinguishable(mid, t, case, prints) for t in top), (mid, case, top)


def test_dataflow_order():
    names = ["grad.lm_head.weight", "grad.model.layers.1.mlp.gate.weight", "bias_after_update.1",
             "routing.1.topk_idx", "loss.total", "mtp_logits.2", "loss.mtp.1", "mtp_logits.1",
             "loss.main", "logits", "grad.model.embed_tokens.weight", "grad.model.layers.0.self_attn.o_proj.weight"]
    ordered = sorted(names, key=lambda n: conf.dataflow_key(n, 2))
    assert ordered == ["logits", "loss.main", "mtp_logits.1", "loss.mtp.1", "mtp_logits.2",
                       "routing.1.topk_idx", "loss.total", "bias_after_update.1",
                       "grad.model.embed_tokens.weight", "grad.model.layers.0.self_attn.o_proj.weight",
                       "grad.model.layers.1.mlp.gate.weight", "grad.lm_head.weight"]
    dec = sorted(["decode.1.logits", "decode.0.logits", "decode.1.latent.0", "decode.0.latent.1"],
                 key=lambda n: conf.dataflow_key(n, 2))
    assert dec == ["decode.0.latent.1", "decode.0.logits", "decode.1.latent.0", "decode.1.logits"]


@pytest.mark.parametrize("case, mutant", [
    ("group_limited_neg_bias", "router.mask_zero"),
    ("tiny_d2", "mtp.eh_concat_swapped"),
    ("yarn_mscale", "rope.yarn_softmax_mscale_from_mscale"),
    ("decode", "decode.cache_k_pe_unrotated"),
])
def test_verify_against_a_mutated_implementation(tmp_path, case, mutant):
    """A file of outputs with one bug fails verify and gets that bug as its first likely cause."""
    out = tmp_path / "theirs.safetensors"
    save_tensors(out, conf.mutant_outputs(shipped_dir() / case, mutant))
    res = CliRunner().invoke(main, ["golden", "verify", case, "--against", str(out)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    i = next(k for k, line in enumerate(lines) if "first failing tensor (dataflow order)" in line)
    assert "likely causes" in lines[i + 1]
    first = lines[i + 2].split()[0]
    prints = conf.load_fingerprints()
    assert first == mutant or _indistinguishable(mutant, first, case, prints), res.output


def test_passing_outputs_get_no_diagnosis(tmp_path):
    case = shipped_dir() / "tiny_d1"
    out = tmp_path / "ours.safetensors"
    save_tensors(out, recompute(case, read_manifest(case), "numpy"))
    res = CliRunner().invoke(main, ["golden", "verify", "tiny_d1", "--against", str(out)])
    assert res.exit_code == 0, res.output
    assert "diagnosis" not in res.output


def test_conformance_command_lists_and_refuses_unknown():
    res = CliRunner().invoke(main, ["golden", "conformance", "--list"])
    assert res.exit_code == 0
    assert len(res.output.splitlines()) == len(CATALOG)
    res = CliRunner().invoke(main, ["golden", "conformance", "--mutant", "nope"])
    assert res.exit_code == 2 and "unknown mutant" in res.output


def test_conformance_command_runs_one_mutant():
    res = CliRunner().invoke(main, ["golden", "conformance", "--mutant", "router.mask_zero"])
    assert res.exit_code == 0, res.output
    assert "1 of 1 mutants caught" in res.output


def test_off_switch_costs_a_set_lookup():
    """`on` is the bound C method set.__contains__ of an empty set: no Python frame per call."""
    assert type(on).__name__ == "builtin_function_or_method"
    assert math.isfinite(len(active()))


def test_float32_outputs_blame_the_precision_not_a_mutant(tmp_path):
    case = shipped_dir() / "tiny_d1"
    exp = read_tensors(case / "expected.safetensors")
    out = tmp_path / "f32.safetensors"
    save_tensors(out, {k: v.astype("float32") if v.dtype == "float64" else v for k, v in exp.items()})
    res = CliRunner().invoke(main, ["golden", "verify", "tiny_d1", "--against", str(out)])
    assert res.exit_code == 1
    assert "likely cause: the outputs' precision" in res.output
    assert "likely causes (bug catalog" not in res.output
