"""Run under ``mpiexec -n N`` by tests/test_expert_parallel.py: the expert-parallel MoE layer
(refmtp.training.expert_parallel) on N ranks against refmtp.model.moe on the concatenation of the
ranks' tokens in one process, and (float64) its backward against central differences of the
distributed loss. Prints one ``ok`` line on rank 0, or exits 1 naming the mismatch.

    mpiexec -n 2 python tests/ep_ranks.py [topk_group] [dtype]
"""
from __future__ import annotations

import sys

import numpy as np

from refmtp.config import preset
from refmtp.model.moe import moe_backward, moe_forward
from refmtp.params import BIAS, moe_param_shapes
from refmtp.training.distributed import detect_world
from refmtp.training.expert_parallel import ExpertShard, ep_moe_backward, ep_moe_forward, expected_bytes

B, T = 2, 5  # each rank's sequences


def central_differences(world, shard, x, dout, p, h=1e-6):
    """(what, numeric, analytic) for a few coordinates: the loss sum_ranks <out_r, dout_r> (+ the
    mean balance loss), perturbed on one rank, every rank running the forward (its exchanges)."""
    N = world.size

    def loss(xv, pv):
        out, aux, _ = ep_moe_forward(xv, pv, shard)
        return sum(world.allgather(float(np.sum(out * dout)) + float(aux) / N))

    _, _, cache = ep_moe_forward(x, p, shard)
    dx, grads = ep_moe_backward(dout, 1.0 / N, cache)
    e = shard.experts[0]  # the names differ per rank, the loop over q keeps the calls in step
    checks = [("x", (0, 1, 3)), ("x", (1, 4, 0)), (f"experts.{e}.down_proj.weight", (2, 1)),
              (f"experts.{e}.gate_proj.weight", (1, 5)), ("gate.weight", (3, 2))]
    found = []
    for q in range(N):  # x and the experts: rank q's own coordinates, the others unperturbed
        for name, idx in checks:
            if name == "gate.weight" and q > 0:
                continue
            here = world.rank == q or name == "gate.weight"  # gate.weight: replicated, all ranks
            plus, minus = x.copy(), x.copy()
            pp, pm = dict(p), dict(p)
            if name == "x":
                if here:
                    plus[idx] += h
                    minus[idx] -= h
                analytic = float(dx[idx])
            else:
                pp[name], pm[name] = p[name].copy(), p[name].copy()
                if here:
                    pp[name][idx] += h
                    pm[name][idx] -= h
                analytic = float(grads[name][idx])
            numeric = (loss(plus, pp) - loss(minus, pm)) / (2 * h)
            if name == "gate.weight":  # every rank's share: the total gradient is their sum
                analytic = sum(world.allgather(analytic))
            if world.rank == q:
                found.append((f"{name}{list(idx)} on rank {q}", numeric, analytic))
    return [f for rank in world.allgather(found) for f in rank]


def main() -> int:
    topk_group = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float64"
    world = detect_world()
    N = world.size
    cfg = preset("tiny").replace(topk_group=topk_group)
    d, E = cfg.hidden_size, cfg.n_routed_experts
    rng = np.random.default_rng(7)  # the same draws on every rank
    p = {name: (rng.normal(size=shape) * 0.5).astype(dtype) for name, shape in moe_param_shapes(cfg).items()}
    p[BIAS] = (rng.normal(size=(E,)) * 0.1).astype(np.float32)
    x_all = rng.normal(size=(N * B, T, d)).astype(dtype)
    dout_all = rng.normal(size=(N * B, T, d)).astype(dtype)

    # the single process on every rank's tokens; aux = mean over all sequences = mean of ranks'
    ref_out, ref_aux, ref_cache = moe_forward(x_all, p, cfg)
    ref_dx, ref_grads = moe_backward(dout_all, 1.0, ref_cache)

    shard = ExpertShard(cfg, world)
    mine = slice(world.rank * B, (world.rank + 1) * B)
    local = {k: v for k, v in p.items() if not k.startswith("experts.")
             or int(k.split(".")[1]) in shard.experts}  # this rank's experts only
    out, aux, cache = ep_moe_forward(x_all[mine], local, shard)
    dx, grads = ep_moe_backward(dout_all[mine], 1.0 / N, cache)  # d (mean of the ranks' aux)
    got = world.allgather((out, float(aux), dx, grads, dict(shard.bytes)))
    topk = [ref_cache.topk_idx[r * B:(r + 1) * B] for r in range(N)]
    want_bytes = world.allgather(expected_bytes(topk, shard, np.dtype(dtype).itemsize, d))
    fd = central_differences(world, shard, x_all[mine], dout_all[mine], local) if dtype == "float64" else []
    if world.rank != 0:
        return 0

    problems = []
    out_all = np.concatenate([g[0] for g in got])
    dx_all = np.concatenate([g[2] for g in got])
    tol = 1e-12 if dtype == "float64" else 1e-5
    # float64: bit for bit. float32: to rounding, because some BLAS kernels round a float32 row
    # differently with the number of rows in the product (OpenBLAS's Haswell sgemm does, measured
    # on an AMD EPYC), and the shared expert runs on one rank's tokens here, on all of them there.
    exact = dtype == "float64"

    def same(a, b, scale=1.0):
        return a.tobytes() == b.tobytes() if exact else np.allclose(a, b, rtol=0, atol=tol * scale)

    if not same(out_all, ref_out):
        problems.append(f"forward differs (max {np.max(np.abs(out_all - ref_out)):.2e})")
    if not np.allclose(dx_all, ref_dx, rtol=0, atol=tol):
        problems.append(f"dx differs by {np.max(np.abs(dx_all - ref_dx)):.2e} > {tol}")
    if abs(np.mean([g[1] for g in got]) - float(ref_aux)) > tol:
        problems.append("balance loss differs")
    for name, ref in ref_grads.items():
        if name.startswith("experts."):  # owned by one rank: bit for bit (float64)
            owner = int(name.split(".")[1]) // shard.per_rank
            if not same(got[owner][3][name], ref, max(1.0, float(np.max(np.abs(ref))))):
                problems.append(f"{name} (rank {owner}) differs")
        else:  # each rank's share; summed here in rank order
            total = sum(g[3][name] for g in got)
            scale = max(1.0, float(np.max(np.abs(ref))))
            if not np.allclose(total, ref, rtol=0, atol=tol * scale):
                problems.append(f"{name} differs by {np.max(np.abs(total - ref)):.2e}")
    for r, g in enumerate(got):
        if g[4] != want_bytes[r]:
            problems.append(f"rank {r} sent {g[4]}, the formula says {want_bytes[r]}")
    owners = np.asarray(ref_cache.topk_idx).reshape(-1, cfg.num_experts_per_tok) // shard.per_rank
    ranks_per_token = max(len(set(row)) for row in owners.tolist())
    limit = topk_group * max(1, N // cfg.n_group)  # a routing group spans N / n_group ranks
    if ranks_per_token > limit:
        problems.append(f"a token reached {ranks_per_token} ranks > {limit} (node-limited routing)")
    for what, numeric, analytic in fd:  # float64 central differences of the distributed loss
        if abs(numeric - analytic) > 1e-6 * max(1.0, abs(analytic)):
            problems.append(f"d loss / d {what}: central difference {numeric:.9g}, backward {analytic:.9g}")
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 1
    sent = sum(g[4]["dispatch"] + g[4]["combine"] for g in got)
    print(f"ok: {N} ranks, topk_group={topk_group}, {dtype}: forward and expert gradients "
          f"{'bit-identical' if exact else f'within {tol}'}, dx within {tol}, {len(fd)} central differences; {sent} bytes exchanged (= formula); at most "
          f"{ranks_per_token} rank(s) per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
