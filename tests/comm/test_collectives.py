"""kasa_ds.comm.collectives.all_reduce_mean on 2 real gloo ranks: tensors packed into buckets (one larger than a
bucket) come back as the mean over the ranks, in place, shapes kept. Tolerance 1e-6: a float32 sum of two values
divided by two, against the same computed in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_all_reduce_mean_in_buckets_equals_the_mean(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/comm/collectives_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["shapes_kept"] and result["error"] <= 1e-6, (rank, result)
