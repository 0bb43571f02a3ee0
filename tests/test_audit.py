"""``refmtp audit``: every step passes on the tiny preset (all components, all formats), the
gradients match central differences, and injected faults make the RELEVANT check fail."""
from __future__ import annotations

import json
import re
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner

from refmtp.verification.audit.context import AUDIT_B
from refmtp.verification.audit.report import COMPONENTS
from refmtp.verification.audit.run import run_audit
from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.params import is_bias, param_shapes


def _invoke(*args):
    return CliRunner().invoke(cli, ["audit", *args])


def _failed(report):
    return [(s.component, s.title, c.name) for s, c in report.failures()]


# -------------------------------------------------------------------------------------------
# everything passes, in every format
# -------------------------------------------------------------------------------------------
def test_all_components_text(backend):
    res = _invoke("--component", "all", "--backend", backend.name)
    assert res.exit_code == 0, res.output
    for comp in COMPONENTS:
        assert f"== {comp}:" in res.output
    assert "FAIL" not in res.output
    assert re.search(r"^PASS: \d+ checks, 0 failed", res.output, re.M)
    # every step names an equation or a docs section, a formula, and at least one check
    assert "(eq. 8; docs/deepseek-v3.md §2.4" in res.output and "(eq. 21 as released; docs/deepseek-v3.md §4.2, §4.3)" in res.output


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_json(component):
    res = _invoke("--component", component, "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["passed"] is True and data["refmtp_audit"] == 1
    assert [c["name"] for c in data["components"]] == [component]
    steps = data["components"][0]["steps"]
    assert steps and [s["index"] for s in steps] == list(range(1, len(steps) + 1))
    for s in steps:
        assert s["ref"] and s["formula"] and s["checks"], s["title"]
        assert all(c["passed"] for c in s["checks"]) and s["passed"]
    assert data["summary"][component]["failed"] == 0


def test_markdown_has_the_tables():
    res = _invoke("--component", "all", "--format", "markdown")
    assert res.exit_code == 0, res.output
    md = res.output
    assert md.startswith("# refmtp audit")
    assert "| component | steps | checks | failed |" in md
    assert md.count("| # | step | ref | formula | shapes | values at (b, i) | checks | result |") == len(COMPONENTS)
    # every table row has the same number of cells as the header (pipes in cells are escaped)
    for line in md.splitlines():
        if line.startswith("| ") and line[2:3].isdigit():
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) == 8, line
    assert "**FAIL**" not in md


def test_position_and_batch_row_pick_the_values():
    r = run_audit(component="mla", position=2, batch_row=1, seed=3)
    assert r.passed, _failed(r)
    emb = r.steps[0]
    assert emb.values["t[b,i]"] == [r.meta["tokens[b]"][2]]
    assert r.meta["position"] == 2 and r.meta["batch_row"] == 1


# -------------------------------------------------------------------------------------------
# --backward
# -------------------------------------------------------------------------------------------
def test_backward_covers_every_parameter_per_layer():
    res = _invoke("--component", "all", "--backward", "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    steps = next(c for c in data["components"] if c["name"] == "backward")["steps"]
    cfg = preset("tiny")
    L, D = cfg.num_hidden_layers, cfg.D
    assert len(steps) == L + D + 1  # one per main layer, one per MTP module, the shared tensors
    checked = []
    for s in steps:
        m = re.search(r"layer (\d+)", s["title"])
        for c in s["checks"]:
            assert "rel err" in c["detail"] or "routing" in c["name"], c
            if "rel err" not in c["detail"] or c["name"] in ("x", "emb", "h_prev"):
                continue
            checked.append(f"model.layers.{m.group(1)}.{c['name']}" if m else c["name"])
    want = sorted(k for k in param_shapes(cfg) if not is_bias(k))
    assert sorted(checked) == want  # every non-bias parameter exactly once


def test_backward_detects_a_wrong_gradient():
    import refmtp.model.block as block

    orig = block.mla_backward

    def wrong(dout, cache):  # o_proj's gradient 0.1% too large
        dx, g = orig(dout, cache)
        return dx, {**g, "o_proj.weight": g["o_proj.weight"] * 1.001}

    with mock.patch.object(block, "mla_backward", wrong):
        r = run_audit(component="mla", backward=True)
    failed = _failed(r)
    assert failed and all(comp == "backward" and name == "self_attn.o_proj.weight" for comp, _, name in failed)


# -------------------------------------------------------------------------------------------
# injected faults make the relevant check fail (and only that one)
# -------------------------------------------------------------------------------------------
def test_swapped_eh_proj_halves_fail_the_eq21_check():
    """A loader that swaps the two column halves of eh_proj (the paper's [h; emb] order instead of
    the released [enorm(emb); hnorm(h)]) runs a different function; only the check that rebuilds
    x from the REFERENCE weights in the checkpoint convention can see it."""
    res = _invoke("--component", "mtp", "--corrupt", "eh_proj_swap")
    assert res.exit_code == 1
    assert "CORRUPTED: eh_proj_swap" in res.output
    fails = [line for line in res.output.splitlines() if line.lstrip().startswith("FAIL ")]
    assert len(fails) == 1 and "[enorm(emb); hnorm(h)]" in fails[0], fails
    r = run_audit(component="mtp", corrupt="eh_proj_swap")
    assert _failed(r) == [("mtp", "depth 1: combine embedding and previous state",
                           "x = reference eh_proj applied to [enorm(emb); hnorm(h)] (host RMSNorm, column halves)")]


def test_swapped_kv_a_rows_fail_the_latent_first_check():
    r = run_audit(component="mla", corrupt="kv_a_layout")
    titles = {t for _, t, _ in _failed(r)}
    assert "joint KV down-projection, latent first" in titles
    assert not r.passed
    res = _invoke("--component", "mla", "--corrupt", "kv_a_layout", "--format", "json")
    assert res.exit_code == 1 and json.loads(res.stdout)["passed"] is False


def _bad_rope():
    import refmtp.model.mla as mla
    from refmtp.model.ops.rope import rope_forward

    return mock.patch.object(mla, "rope_forward", lambda x, cos, sin: rope_forward(x, cos, -sin))


def _bad_gates():
    import refmtp.model.moe as moe

    orig = moe.router_forward

    def scaled(x, w, b, cfg):
        idx, g, c = orig(x, w, b, cfg)
        return idx, g * 1.01, c

    return mock.patch.object(moe, "router_forward", scaled)


def _bad_normaliser():
    import refmtp.model.loss as loss

    return mock.patch.object(loss, "mtp_normaliser", lambda cfg, B, T, k: B * (T - k))


@pytest.mark.parametrize("fault, component, step, check", [
    (_bad_rope, "mla", "RoPE on the query's decoupled part", "rotates pair j"),
    (_bad_gates, "moe", "gate values", "sum to routed_scaling_factor"),
    (_bad_normaliser, "loss", "per-term normalisers and row weights", "N_k = B T"),
])
def test_code_faults_fail_the_identity_checks(fault, component, step, check):
    with fault():
        r = run_audit(component=component)
    failed = _failed(r)
    assert any(t == step and check in n for _, t, n in failed), failed
    if component == "mla":  # a rotation by -m theta still preserves norms: only the angle check fails
        assert not any("preserves" in n for _, _, n in failed)


# -------------------------------------------------------------------------------------------
# checkpoints, configs, bad input, backends
# -------------------------------------------------------------------------------------------
def test_checkpoint_uses_the_file_as_reference(tmp_path):
    from refmtp.checkpoint import save_checkpoint
    from refmtp.model import init_params

    cfg = preset("tiny")
    save_checkpoint(tmp_path / "ck", cfg, init_params(cfg, seed=1, std=0.3, bias_std=0.1))
    res = _invoke("--ckpt", str(tmp_path / "ck"), "--component", "mtp")
    assert res.exit_code == 0, res.output
    assert "shared_head.head copy" in res.output and "embed_tokens copy" in res.output

    # a fault written INTO the file is a different model: reference and library agree on it
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "ck" / "model.safetensors"
    w = load_file(str(path))
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    d = cfg.hidden_size
    w[name] = np.ascontiguousarray(np.concatenate([w[name][:, d:], w[name][:, :d]], axis=1))
    save_file(w, str(path))
    assert run_audit(ckpt=tmp_path / "ck", component="mtp").passed


@pytest.mark.parametrize("changes", [
    {"topk_group": 1},  # group limiting active: groups are dropped
    {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "topk_group": 1,
     "norm_topk_prob": False},  # V2 router
    {"q_lora_rank": None, "rope_scaling": {"type": "yarn", "factor": 40,
                                           "original_max_position_embeddings": 64}},
    {"refmtp": {"mtp_chain": "pre_norm", "mtp_loss_norm": "valid_mean"}},
], ids=["group-limited", "v2-softmax", "no-qlora-yarn", "pre_norm-valid_mean"])
def test_config_variants_pass(tmp_path, changes):
    cfg = preset("tiny").replace(**changes)
    cfg.save(tmp_path / "config.json")
    r = run_audit(config=tmp_path / "config.json")
    assert r.passed, _failed(r)
    if changes.get("topk_group") == 1:
        step = next(s for s in r.steps if s.title == "group-limited routing")
        assert "group scores" in step.values


@pytest.mark.parametrize("args, msg", [
    (["--position", "99"], "position=99"),
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "tiny", "--ckpt", "x"], "not several"),
    (["--ckpt", "/nonexistent/ck"], "does not exist"),
    (["--preset", "deepseek-v3"], "parameters"),
])
def test_bad_input_exits_2_with_one_line(args, msg):
    res = _invoke(*args)
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_run_audit_rejects_unknown_names():
    with pytest.raises(ValueError, match="component"):
        run_audit(component="attention")
    with pytest.raises(ValueError, match="corruption"):
        run_audit(component="mla", corrupt="nope")


def test_on_each_backend(backend):
    """Every component, forward and backward (gradients vs central differences), per backend."""
    r = run_audit(backend=backend.name, backward=True, component="all")
    assert r.passed, _failed(r)
    assert r.meta["backend"] == backend.name
    assert {s.component for s in r.steps} == {*COMPONENTS, "backward"}


def test_reference_is_taken_before_the_hook():
    """The corruption hook changes only what the library runs on, never the reference."""
    seen = {}

    def hook(params, cfg):
        seen["before"] = np.array(params["model.embed_tokens.weight"])
        params["model.embed_tokens.weight"] = params["model.embed_tokens.weight"] * 1.5

    r = run_audit(component="mla", corrupt=hook)
    step = r.steps[0]
    assert step.checks[0].name == "h equals the checkpoint rows E[t]" and not step.checks[0].passed
    assert AUDIT_B == 2 and seen["before"].shape == (64, 16)


# -------------------------------------------------------------------------------------------
# docs/derivations/README.md indexes every page and every backward in refmtp/
# -------------------------------------------------------------------------------------------
def _docs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return root, (root / "docs" / "derivations" / "README.md").read_text()


def test_derivations_index_lists_every_page():
    root, index = _docs()
    pages = sorted(p.name for p in (root / "docs" / "derivations").glob("*.md") if p.name != "README.md")
    assert pages
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, f"docs/derivations/README.md does not link {missing}"


def test_derivations_index_names_every_backward():
    root, index = _docs()
    defs = set()
    for path in (root / "refmtp").rglob("*.py"):
        defs |= set(re.findall(r"^def ([a-z][a-z_]*_backward[a-z_]*)\(", path.read_text(), re.M))
    missing = sorted(f for f in defs if f"`{f}`" not in index)
    assert not missing, f"docs/derivations/README.md does not list {missing}"
