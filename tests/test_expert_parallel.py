"""Expert parallelism (refmtp.training.expert_parallel) under ``mpiexec -n 2`` and ``-n 4``
(oversubscribed on 2 cores) against the single-process MoE: tests/ep_ranks.py does the ranks'
work and the comparison (forward and owned experts' gradients bit for bit in float64, to 1e-5 in
float32, where some BLAS kernels round a row by the product's row count; dx to 1e-12 in
float64, gate / shared gradients summed over ranks to 1e-12, float64 central differences of
the distributed loss, the exchanged bytes equal to
docs/distributed.md's formula, node-limited routing's bound on ranks per token).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refmtp.config import preset
from refmtp.training.distributed import World
from refmtp.training.expert_parallel import ExpertShard

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and mpich: pip install -e '.[test]'")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
SCRIPT = Path(__file__).with_name("ep_ranks.py")


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec next to this Python or on PATH (pip install mpich)")
@pytest.mark.parametrize("n, topk_group, dtype", [
    (2, 2, "float64"), pytest.param(2, 1, "float32", marks=pytest.mark.slow),
    pytest.param(4, 2, "float64", marks=pytest.mark.slow), pytest.param(4, 1, "float64", marks=pytest.mark.slow)])
def test_expert_parallel_moe_equals_single_process(n, topk_group, dtype):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(SCRIPT), str(topk_group), dtype],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"ok: {n} ranks"), proc.stdout


def test_expert_shard_refuses_uneven_splits():
    cfg = preset("tiny")  # 8 experts in 2 groups
    with pytest.raises(ValueError, match="must divide n_routed_experts=8"):
        ExpertShard(cfg, World(rank=0, size=3))
    with pytest.raises(ValueError, match="n_group=3"):
        ExpertShard(cfg.replace(n_routed_experts=12, n_group=3, topk_group=1), World(rank=0, size=2))
    shard = ExpertShard(cfg, World(rank=1, size=4))
    assert list(shard.experts) == [2, 3] and shard.owner(5) == 2
