"""kasa_ds.comm.mappings on gloo (2 CPU ranks): megatron's four named collectives, and the tensor-parallel adapter
paths that use the gather/split pair (column-parallel with gather_output, row-parallel fed the whole input) —
forward and every gradient equal to one process.

Tolerance 1e-5 relative: the same float32 products summed in another order (an all-reduce of 2 partials)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mappings_and_gather_split_adapter_paths_equal_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests/placements/mappings_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # 6 mappings × (forward, backward); 4 layer paths (gathered/scattered, and sequence-parallel column/row)
        # × (y, ∂x, ∂ΔΣ, ∂A, ∂B)
        assert len(errors) == 12 + 4 * 5
        bad = {k: v for k, v in errors.items() if not v <= 1e-5}
        assert not bad, (rank, bad)
