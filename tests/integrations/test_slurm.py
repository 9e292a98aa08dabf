"""launch/slurm/train.sbatch on a real 2-node SLURM cluster on localhost (tools/local_slurm.sh: Debian slurmctld,
two slurmd, munge), with real DeepSpeed ZeRO-3 across the two nodes' tasks.

- an uninterrupted 2-node job fine-tunes the embedded default to completion and writes the adapter;
- a second job is signalled mid-run (SIGUSR1 to its batch shell, as ``#SBATCH --signal=B:USR1@T`` does): the ranks
  checkpoint, exit 75, the script requeues the job, the restarted job resumes from the checkpoint, and its final
  adapter equals the uninterrupted run's. Tolerance 1e-5 absolute: the resumed run repeats the same float32
  operations in the same order (same batches, restored RNG, optimizer and fp32 partitions), so only the order of
  gloo reductions may differ.
- a rank killed mid-run ends the whole job with a non-zero exit (srun --kill-on-bad-exit), no hang.

Needs root + apt-get (tools/local_slurm.sh installs the packages) or the packages already there; otherwise the tests
skip with the reason, except when KASA_DS_REQUIRE_CLUSTER=1 (set by .ci/run), where they fail.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency (pip install -e .[dev])")

REPO = Path(__file__).resolve().parents[2]
RUN = ["--ds_config", str(REPO / "ds_configs/zero3.json"), "train.max_steps=24", "train.micro_batch_size=4",
       "train.save_every=100", "train.eval_every=100", "train.log_every=4", "model.max_length=32",
       "data.max_eval_examples=16", "tensorboard=false"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "start", str(state)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        reason = f"no local SLURM cluster (tools/local_slurm.sh start): {proc.stderr.strip()[-400:]}"
        if os.environ.get("KASA_DS_REQUIRE_CLUSTER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "stop", str(state)], capture_output=True)


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def submit(env, tmp: Path, name: str, *extra: str, launcher: str = "srun", run=tuple(RUN)) -> str:
    """sbatch the recipe (``run`` + ``extra``) on 2 nodes × 1 task and return the job id; the job's log is
    tmp/<name>.log. (Not ``sbatch --wait``: it polls after 2, 10, 42, 74 … s, so every job here took ≥ 42 s.)"""
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--job-name={name}",
           f"--output={tmp / (name + '.log')}", str(REPO / "launch/slurm/train.sbatch"),
           "--output_dir", str(tmp / name), *run, *extra]
    job_env = {**env, "KASA_DS_STOP_FILE": str(tmp / f".stop-{name}"), "LAUNCHER": launcher, "GPUS_PER_NODE": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def job_field(env, jid: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def finish(env, jid: str, log: Path, timeout: float = 600) -> int:
    """Poll the job every 0.5 s until it ends (a requeued job is followed into its next run) and return its exit
    code, or 128 + the signal that ended it (ended jobs' records stay for MinJobAge = 600 s)."""
    deadline = time.time() + timeout
    while (state := job_field(env, jid, "JobState")) not in TERMINAL:
        if time.time() > deadline:
            subprocess.run(["scancel", jid], env=env)
            raise AssertionError(f"job {jid} still {state} after {timeout} s:\n"
                                 f"{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.5)
    code, sig = (int(x) for x in job_field(env, jid, "ExitCode").split(":"))
    return code or (128 + sig if sig else 0) or (0 if state == "COMPLETED" else 1)


def running(env, jid: str) -> bool:
    return job_field(env, jid, "JobState") not in TERMINAL


def wait_for_step(env, jid: str, out_dir: Path, step: int, log: Path) -> None:
    metrics = out_dir / "metrics.jsonl"
    while running(env, jid):
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if any(r["split"] == "train" and r["step"] >= step for r in rows):
                return
        time.sleep(0.2)
    raise AssertionError(f"the job ended before step {step}:\n{log.read_text()[-3000:]}")


def adapter(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-jobs")
    jid = submit(cluster, tmp, "full")
    log = tmp / "full.log"
    rc = finish(cluster, jid, log)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return tmp, text


def test_two_node_zero3_job_completes(uninterrupted):
    tmp, text = uninterrupted
    assert "2 nodes (node[1-2])" in text and "2 tasks, launcher srun" in text
    assert "step 24/24" in text and "finished with exit code 0" in text
    state = adapter(tmp / "full")
    assert state and all(v.isfinite().all() for v in state.values())
    assert (tmp / "full" / "adapter" / "adapter_config.json").is_file()


def test_preempted_job_requeues_resumes_and_matches(cluster, uninterrupted, tmp_path):
    full_dir = uninterrupted[0] / "full"
    name = "preempt"
    jid = submit(cluster, tmp_path, name)
    log = tmp_path / f"{name}.log"
    wait_for_step(cluster, jid, tmp_path / name, 3, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], env=cluster, check=True)
    # first the requeue, then the job's second run to the end (it starts once the old job credential expired:
    # cred_expire=10 on this cluster)
    deadline = time.time() + 300
    while job_field(cluster, jid, "Restarts") != "1":
        assert time.time() < deadline, f"job {jid} was not requeued:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    rc = finish(cluster, jid, log)
    text = log.read_text()
    assert rc == 0 and job_field(cluster, jid, "JobState") == "COMPLETED", text[-4000:]
    assert "stop requested (USR1)" in text and "requeueing job" in text, text[-4000:]
    assert f"job {jid} restart 1" in text and "resuming from" in text, text[-4000:]
    stopped_at = int(text.split("stopping after step ")[1].split()[0])
    assert 3 <= stopped_at < 24
    assert f"at step {stopped_at}" in text.split("resuming from")[1].splitlines()[0]
    a, b = adapter(full_dir), adapter(tmp_path / name)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"resumed adapter differs from the uninterrupted one by {worst:.3e}"


def test_dead_rank_fails_the_job(cluster, tmp_path):
    name = "deadrank"
    jid = submit(cluster, tmp_path, name)
    log = tmp_path / f"{name}.log"
    wait_for_step(cluster, jid, tmp_path / name, 2, log)
    # kill rank 1 (SIGKILL: no chance to clean up), as a crashed node or an OOM kill would
    pids = subprocess.run(["pgrep", "-f", f"launch/train.py .*{tmp_path / name}"], capture_output=True,
                          text=True).stdout.split()
    victims = [p for p in pids if _env_of(p).get("RANK") == "1"]
    assert victims, f"no rank-1 process among {pids}"
    os.kill(int(victims[0]), signal.SIGKILL)
    rc = finish(cluster, jid, log, timeout=240)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "finished with exit code 0" not in text and "requeueing" not in text
    assert "task 1" in text, text[-3000:]  # srun names the failed rank


def _env_of(pid: str) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_torchrun_per_node_launcher(cluster, uninterrupted, tmp_path):
    """LAUNCHER=torchrun: one torchrun per node (node rank from SLURM_NODEID) starting the node's ranks; the same
    2-rank run as the srun job, so the same adapter (1e-5: same batches, init and reductions)."""
    name = "torchrun"
    jid = submit(cluster, tmp_path, name, launcher="torchrun")
    log = tmp_path / f"{name}.log"
    rc = finish(cluster, jid, log)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "launcher torchrun" in text and "step 24/24" in text
    a, b = adapter(uninterrupted[0] / "full"), adapter(tmp_path / name)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_megatron_road_across_two_nodes(cluster, tmp_path, tiny_llama_dir):
    """The Megatron road through the same sbatch script: an HF Llama checkpoint split by megatron-core TP=2 across the
    two nodes (one rank each, gloo), trained and written as an adapter under the HF model's names."""
    name = "megatron"
    run = ["--config", str(REPO / "configs/tiny_llama_instruct.yaml"), f"model.path={tiny_llama_dir}",
           "backend=megatron", "tensor_parallel=2", "train.max_steps=4", "train.log_every=2", "train.eval_every=100",
           "train.save_every=100", "data.max_eval_examples=8", "tensorboard=false"]
    jid = submit(cluster, tmp_path, name, run=run)
    log = tmp_path / f"{name}.log"
    rc = finish(cluster, jid, log)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "tensor parallel: 2-way megatron-core × 1 data-parallel replicas" in text and "step 4/4" in text
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in adapter(tmp_path / name)
