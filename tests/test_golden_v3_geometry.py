"""The DeepSeek-V3-geometry golden family: generated on demand (not shipped), its inputs and
parameters bit-reproducible against hashes in golden/recipe.json, its outputs verified."""
from __future__ import annotations

import json
import resource

import pytest
from click.testing import CliRunner

from refmtp.cli.main import cli
from refmtp.verification.golden.files import GoldenError
from refmtp.verification.golden.recipe import (check_hashes, config_from_recipe, generate, load_recipe,
                                               on_demand, shipped_dir)
from refmtp.verification.golden.verify import verify_case

RECIPE = load_recipe(shipped_dir() / "recipe.json")
FAMILY = [n for n, e in RECIPE["cases"].items() if on_demand(e)]


def test_the_family_has_v3_geometry_and_hashes():
    assert {"v3_geometry", "v3_geometry_mscale", "v3_geometry_decode", "v3_geometry_speculative"} <= set(FAMILY)
    assert {RECIPE["cases"][n].get("kind", "model") for n in FAMILY} == {"model", "decode", "speculative"}
    for name in FAMILY:
        entry = RECIPE["cases"][name]
        assert set(entry["hashes"]) == {"config.json", "model.safetensors", "inputs.safetensors"}
        cfg = config_from_recipe(entry)
        assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                cfg.v_head_dim) == (1536, 512, 128, 64, 128)
        assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                cfg.n_shared_experts, cfg.routed_scaling_factor) == (256, 8, 4, 8, 1, 2.5)
        assert (cfg.scoring_func, cfg.topk_method) == ("sigmoid", "noaux_tc")
        y = cfg.rope_scaling
        assert (y["factor"], y["original_max_position_embeddings"], y["beta_fast"], y["beta_slow"]) == (40, 4096, 32, 1)
        assert 128 % cfg.num_attention_heads == 0  # a tensor-parallel shard of V3's 128 heads
    mscales = {(RECIPE["cases"][n]["overrides"].get("rope_scaling") or {}).get("mscale", 1.0) for n in FAMILY}
    assert mscales == {1.0, 0.707}


def test_on_demand_cases_are_not_shipped_and_say_how_to_make_them():
    for name in FAMILY:
        assert not (shipped_dir() / name).exists()
    res = CliRunner().invoke(cli, ["golden", "verify", "v3_geometry"])
    assert res.exit_code == 2 and "golden generate --case v3_geometry --out DIR" in res.output
    res = CliRunner().invoke(cli, ["golden", "generate", "--case", "v3_geometry"])
    assert res.exit_code != 0 and "on demand" in res.output
    res = CliRunner().invoke(cli, ["golden", "list"])
    assert res.exit_code == 0 and "v3_geometry_decode" in res.output and "(on demand)" in res.output


def test_hash_check_refuses_other_bytes(tmp_path):
    generate(tmp_path, only=["tiny_d1"])
    entry = dict(RECIPE["cases"]["tiny_d1"])
    entry["hashes"] = {"model.safetensors": "0" * 64}
    with pytest.raises(GoldenError, match="not bit-reproducible"):
        check_hashes(tmp_path / "tiny_d1", entry)


@pytest.mark.slow
def test_generate_reproduces_the_hashes_and_verifies(tmp_path):
    """The whole family in one go: ~35 s and ~1.2 GB on 2 cores (the limit: 5 min, 8 GB)."""
    names = generate(tmp_path, only=FAMILY)  # raises GoldenError when a hash differs
    assert names == FAMILY
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 8
    for name in FAMILY:
        report = verify_case(tmp_path / name)
        assert report.status == "pass", name
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["recipe"]["on_demand"] is True


def test_generate_refuses_cases_too_long_or_too_large(tmp_path):
    """A recipe case is sized before any work: positions and memory (one line, exit 2)."""
    recipe = json.loads((shipped_dir() / "recipe.json").read_text())
    long_case = dict(recipe["cases"]["tiny_d1"], seq_len=10_000)
    huge_case = dict(recipe["cases"]["tiny_d1"], overrides={"vocab_size": 10**11})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**recipe, "cases": {"long": long_case, "huge": huge_case}}))
    for name, msg in (("long", "exceed max_position_embeddings"), ("huge", "needs at least")):
        res = CliRunner().invoke(cli, ["golden", "generate", "--recipe", str(path), "--case", name,
                                       "--out", str(tmp_path / "out")])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
