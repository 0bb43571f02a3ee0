"""The decode case's records (refmtp/verification/golden/cases.py compute_decode, docs/golden-format.md
section 1.4) against the full-sequence training forward, without torch: per append step the main
logits are the forward's rows at the step's positions over the committed tokens, and MTP module
k's rows j are the forward's module-k rows (reading h^{k-1}_j and t_{j+k}); the rows each module
runs cover 0..N-1-k once since the last rollback; recorded tensors are copies, not views of
cache buffers that a rollback overwrites; the pre_norm chain and D=1 also export."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.backends import get_backend
from refmtp.checkpoint import load_checkpoint
from refmtp.config import preset
from refmtp.model import forward
from refmtp.verification.golden.cases import compute_decode, decode_inputs, golden_params
from refmtp.verification.golden.files import read_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import shipped_dir

CASE = shipped_dir() / "decode"
TOL = 1e-10


def _committed(schedule, inputs, upto):
    seq = inputs["step.0.tokens"][:, :0]
    for i, op in enumerate(schedule[: upto + 1]):
        seq = (np.concatenate([seq, inputs[f"step.{i}.tokens"]], axis=1) if op["op"] == "append"
               else seq[:, : op["length"]])
    return seq


def _check_against_forward(cfg, params, schedule, inputs, exp):
    bk = get_backend("numpy")
    D = cfg.D
    for i, op in enumerate(schedule):
        if op["op"] != "append":
            continue
        seq = _committed(schedule, inputs, i)
        N, n = seq.shape[1], op["n"]
        # + D+1 unused later tokens (the forward needs T > D; causal rows < N do not see them)
        tokens = np.concatenate([seq, np.zeros((seq.shape[0], D + 1), dtype=np.int64)], axis=1)
        out, _ = forward(params, cfg, bk.asarray(tokens, dtype="int64"), need_cache=False)
        np.testing.assert_allclose(exp[f"decode.{i}.logits"], out.logits[:, N - n:N], atol=TOL, rtol=0)
        hidden = [out.hidden] + list(out.mtp_hidden)
        for k in range(1, D + 1):
            name = f"decode.{i}.mtp.{k}"
            if f"{name}.positions" not in exp:
                assert N - k <= 0 or i > 0, name
                continue
            j = exp[f"{name}.positions"]
            assert j.dtype == np.int64 and j.ndim == 1 and j[-1] == N - 1 - k  # caught up to the last committed row
            assert np.array_equal(j, np.arange(j[0], N - k))
            assert np.array_equal(exp[f"{name}.token_ids"], seq[:, j + k])
            np.testing.assert_allclose(exp[f"{name}.logits"], out.mtp_logits[k - 1][:, j], atol=TOL, rtol=0)
            np.testing.assert_allclose(exp[f"{name}.hidden"], hidden[k - 1][:, j], atol=TOL, rtol=0)


def test_shipped_decode_case_matches_the_training_forward():
    m = read_manifest(CASE)
    cfg, params = load_checkpoint(CASE, backend=get_backend("numpy"), dtype="float64")
    inputs = read_tensors(CASE / "inputs.safetensors")
    exp = read_tensors(CASE / "expected.safetensors")
    assert cfg.D == 2 and any(".mtp.2." in k for k in exp)
    _check_against_forward(cfg, params, m["schedule"], inputs, exp)


def test_module_rows_cover_each_position_once_since_the_last_rollback():
    m = read_manifest(CASE)
    exp = read_tensors(CASE / "expected.safetensors")
    cfg, _ = load_checkpoint(CASE, backend=get_backend("numpy"), dtype="float64")
    held = {k: [] for k in range(1, cfg.D + 1)}
    N = 0
    for i, op in enumerate(m["schedule"]):
        if op["op"] == "truncate":
            N = op["length"]
            held = {k: [j for j in rows if j <= N - 1 - k] for k, rows in held.items()}
            continue
        N += op["n"]
        for k in held:
            held[k] += list(exp.get(f"decode.{i}.mtp.{k}.positions", []))
            assert held[k] == list(range(N - k)), (i, k)


def test_latent_rows_survive_a_later_rollback():
    """decode.3 wrote positions 7-9; the rollback to 7 and step 5 overwrite positions 7-8 of the
    cache buffers: the recorded step-3 rows must still be step 3's."""
    exp = read_tensors(CASE / "expected.safetensors")
    for layer in (0, 1):
        assert not np.allclose(exp[f"decode.3.latent.{layer}"][:, :2], exp[f"decode.5.latent.{layer}"])
    assert not np.allclose(exp["decode.3.mtp.1.latent"][:, 1:3], exp["decode.5.mtp.1.latent"])


@pytest.mark.parametrize("refmtp_cfg,D", [({"mtp_chain": "pre_norm"}, 2), ({}, 1), ({}, 3)])
def test_other_chains_and_depths(refmtp_cfg, D):
    cfg = preset("tiny").replace(num_nextn_predict_layers=D, refmtp=refmtp_cfg)
    schedule = [{"op": "append", "n": 2}, {"op": "append", "n": 1}, {"op": "append", "n": 3},
                {"op": "truncate", "length": 3}, {"op": "append", "n": 1}, {"op": "append", "n": 2}]
    params = golden_params(cfg, 5, "float64", 0.2, 0.05)
    inputs = decode_inputs(5, 2, schedule, cfg.vocab_size)
    exp = compute_decode(cfg, params, schedule, inputs)
    assert "decode.0.mtp.2.logits" not in exp  # a 2-token prefill: module 2 has no row yet
    _check_against_forward(cfg, params, schedule, inputs, exp)
