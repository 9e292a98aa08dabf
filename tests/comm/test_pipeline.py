"""kasa_ds.comm.pipeline.one_f_one_b on real gloo ranks (torchrun, CPU), one pipeline stage per rank: every stage's
gradient equals the whole chain's in one process, and each stage runs megatron-core's 1F1B order — min(P − s − 1, K)
forwards first, then one forward and one backward in turn, so stage s never holds more than P − s micro-batches.

Tolerance 1e-6 relative: the same float32 products in the same order, accumulated over the micro-batches in the
same order (measured 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def expected_order(stage: int, stages: int, k: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, k)
    order = [("F", i) for i in range(warmup)]
    for i in range(k - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(k - warmup, k)]


@pytest.mark.slow
@pytest.mark.parametrize("stages,microbatches", [(4, 6), (3, 2)])  # more micro-batches than stages, and fewer
def test_one_f_one_b_matches_one_process_in_megatron_order(tmp_path, stages, microbatches):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(stages), "--master_port",
           str(free_port()), str(REPO / "tests/comm/pipeline_worker.py"), str(tmp_path), str(microbatches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(stages):
        result = json.loads((tmp_path / f"rank{stage}.json").read_text())
        assert result["error"] <= 1e-6, (stage, result["error"])
        events = [tuple(e) for e in result["events"]]
        assert events == expected_order(stage, stages, microbatches), (stage, events)
        held = max(sum(1 for e in events[: i + 1] if e[0] == "F") - sum(1 for e in events[: i + 1] if e[0] == "B")
                   for i in range(len(events)))
        assert held == min(stages - stage, microbatches), (stage, held)
