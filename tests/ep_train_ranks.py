"""Run under ``mpiexec -n N`` by tests/test_distributed.py: a short expert-parallel training run
(refmtp.training.trainer, float32, tiny preset) whose ranks then report what they hold. Rank 0
checks that every rank's parameters, AdamW moments (and so gradients: AdamW keeps a moment per
gradient) hold the replicated tensors and its own E/N routed experts only, with the bytes of
docs/distributed.md §3's formula, and that the checkpoint on disk is the whole one-process model.
Prints one ``ok`` line on rank 0, or exits 1 naming the mismatch.

    mpiexec -n 2 python tests/ep_train_ranks.py CORPUS OUT [PRESET]
"""
from __future__ import annotations

import sys

from refmtp.checkpoint import load_checkpoint
from refmtp.config import preset
from refmtp.params import check_params, is_bias, param_shapes, routed_expert
from refmtp.training.distributed import detect_world
from refmtp.training.expert_parallel import held_params
from refmtp.training.trainer import Trainer, TrainSettings


def main(corpus: str, out: str, name: str = "tiny") -> int:
    world = detect_world()
    world.timeout = 60
    N = world.size
    settings = TrainSettings(preset=name, data=corpus, steps=2, batch_size=4, seq_len=16,
                             eval_every=1, eval_batches=1, log_every=1, checkpoint_every=0,
                             microbatches=N, expert_parallel=N, dtype="float32")
    trainer = Trainer.distributed(world, lambda: Trainer.new(settings, preset(name), out,
                                                              world=world))
    result = trainer.run()
    t = trainer
    mine = {"params": sorted(t.params), "m": sorted(t.opt.m), "v": sorted(t.opt.v),
            "bytes": sum(int(a.nbytes) for d in (t.params, t.opt.m, t.opt.v) for a in d.values())}
    reports = world.gather(mine, "the test's report")
    if not world.writes:
        return 0
    cfg = t.cfg
    E = cfg.n_routed_experts
    shapes = param_shapes(cfg)
    problems = []
    for q, rep in enumerate(reports):
        held = {routed_expert(n) for n in rep["params"]} - {None}
        own = set(t.shard.experts_of(q))
        if held != own:
            problems.append(f"rank {q} holds experts {sorted(held)}, owns {sorted(own)}")
        want = sorted(n for n in shapes if routed_expert(n) is None or routed_expert(n) in own)
        if rep["params"] != want:
            problems.append(f"rank {q}: parameter names are not the replicated ones + its experts")
        with_grad = [n for n in want if not is_bias(n)]
        if rep["m"] != with_grad or rep["v"] != with_grad:
            problems.append(f"rank {q}: AdamW moments for other names than its own parameters")
        n_rep, n_exp = held_params(cfg, t.shard, q)
        n_bias = sum(shapes[n][0] for n in shapes if is_bias(n))
        formula = 4 * (n_rep + n_exp) + 2 * 4 * (n_rep - n_bias + n_exp)  # float32 p, m, v
        if rep["bytes"] != formula:
            problems.append(f"rank {q} holds {rep['bytes']} bytes, the formula says {formula}")
        total_exp = sum(held_params(cfg, None)[1:])
        if n_exp * N != total_exp:
            problems.append(f"rank {q}: {n_exp} expert parameters, not 1/{N} of {total_exp}")
    cfg_disk, params = load_checkpoint(result.checkpoint)  # the one-process files, every expert
    check_params(params, cfg_disk)
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    held = ", ".join(f"{rep['bytes']:,}" for rep in reports)
    print(f"ok: {N} ranks, each holds the replicated tensors and {E // N} of {E} experts per MoE "
          f"layer ({held} bytes of float32 weights and AdamW moments on ranks 0..{N - 1}, "
          f"{name} preset); the checkpoint holds all of them")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
