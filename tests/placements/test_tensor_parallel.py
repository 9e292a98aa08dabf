"""KaSA on tensor-parallel layers: real megatron-core (torchrun, gloo) and real DeepSpeed AutoTP + ZeRO-2, on CPU.

Each worker compares its TP model with a one-process KaSA model built from the same full weights.
Tolerances: the TP truncation reduces a float64 Gram and solves it with the same float32-eigh/float64-refinement
ladder as the one-process ``gram`` solver, so truncated shards agree to float32 round-off of the weights (1e-5
relative; measured 1.1e-6). Logits, gradients and the regularizer differ only by the order of float32 sums split
over ranks (1e-5 relative; measured ≤ 1.2e-6). Training losses: 1e-5 relative after 3–4 AdamW steps (measured
≤ 5e-7 absolute). Logits through PEFT: 2e-4 as in tests/io/test_peft_interop.py (PEFT re-truncates with its own
float32 SVD).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, tiny_llama

pytest.importorskip("megatron.core", reason="megatron-core is a [dev] dependency (pip install -e .[dev])")
pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency")
peft = pytest.importorskip("peft", minversion="0.21", reason="PEFT >= 0.21 is a [dev] dependency")

from kasa_ds.placements.tp.spec import ShardSpec  # noqa: E402
from kasa_ds.placements.tp.truncate import use_gram  # noqa: E402
from kasa_ds.core.truncation import gram_tail_basis, reference_world  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _torchrun(nproc: int, out: Path, tp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "tests/placements/megatron_tp_worker.py"), "--tp", str(tp), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc,tp", [(2, 2), (4, 2)], ids=["tp2", "tp2xdp2"])
def test_megatron_tp_equals_one_process(tmp_path, nproc, tp):
    results = _torchrun(nproc, tmp_path, tp)
    assert {r["dp_rank"] for r in results} == set(range(nproc // tp))
    for r in results:
        assert set(r["types"].values()) == {"ColumnParallelLinear", "RowParallelLinear"}
        assert r["truncation"] < 1e-5, r
        assert r["init"] == 0.0  # the adapter init is the one-process init, split
        assert (r["read_on_owner"] < 1e-5 if r["tp_rank"] == 0 else r["read_on_owner"] is None), r
        assert r["read_on_owner_elsewhere"] == [], r
        assert r["logits"] < 1e-5 and r["grads"] < 1e-5 and r["reg"] < 1e-5, r
        assert r["gathered"] < 1e-5 and r["gathered_shapes_ok"], r
        for a, b in zip(r["losses"]["tp"], r["losses"]["ref"]):
            assert a == pytest.approx(b, rel=1e-5)
        assert r["losses"]["tp"][-1] < r["losses"]["tp"][0]  # it trains
    assert len({tuple(r["tail_energy"]) for r in results}) == 1  # every rank reports the owners' solves


def test_autotp_zero2_matches_one_process_and_exports_to_peft(tmp_path):
    base = tmp_path / "base"
    tiny_llama(seed=4).save_pretrained(base)
    out = tmp_path / "out"
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests/placements/autotp_worker.py"), "--base", str(base), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        r = json.loads((out / f"rank{rank}.json").read_text())
        assert r["types"] == ["LinearAllreduce", "LinearLayer"] and r["tp_layers"] == 14
        assert r["logits_init"] < 1e-5 and r["adapter_after"] < 1e-5, r
        # each TP rank's report counts the whole model (AutoTP's split weights and KaSA's split factors unsplit)
        assert r["counts"]["autotp"] == r["counts"]["one_process"], r["counts"]
        for a, b in zip(r["losses"]["tp"], r["losses"]["ref"]):
            assert a == pytest.approx(b, rel=1e-5)
    # the gathered TP adapter is a plain PEFT adapter of the unsharded model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = torch.load(out / "reference.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=ref["tokens"]).logits
    assert ((logits - ref["logits"]).norm() / ref["logits"].norm()).item() < 2e-4
    # and its exact LoRA export (tools/export_adapter.py --as-lora): a plain rank-2r LoRA on the original base
    from export_adapter import export_lora

    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     export_lora(out / "adapter", tmp_path / "lora", base)).eval()
    with torch.no_grad():
        logits = lora(input_ids=ref["tokens"]).logits
    assert ((logits - ref["logits"]).norm() / ref["logits"].norm()).item() < 2e-4


def test_gram_tail_basis_matches_float64_truncation():
    """The solve the TP owner runs, from a float64 Gram: W_world within float32 round-off of the float64 SVD."""
    g = torch.Generator().manual_seed(0)
    for m, n, r in ((96, 64, 8), (64, 64, 16), (128, 40, 1)):
        w = torch.randn(m, n, generator=g)
        basis, energy = gram_tail_basis(w.double().T @ w.double(), r)
        world = w.double() - (w.double() @ basis) @ basis.T
        ref = reference_world(w, r)
        assert ((world - ref).norm() / ref.norm()).item() < 1e-5
        s = torch.linalg.svdvals(w.double())
        # reported from the float32 eigenvalues: absolute error ≈ ε·λ_max/Σλ
        assert energy == pytest.approx((s[-r:].square().sum() / s.square().sum()).item(), rel=1e-4)


def test_gram_unless_it_is_larger_than_the_weight():
    column = lambda m, n: ShardSpec(0, (m, n), (m // 2, m // 2), None)  # noqa: E731
    row = lambda m, n: ShardSpec(1, (m, n), (n // 2, n // 2), None)  # noqa: E731
    assert use_gram(column(28672, 8192))  # gate/up of a 70B: 8192² < 28672·8192
    assert not use_gram(column(1024, 8192))  # k/v projection: the Gram (8192²) exceeds the weight
    assert use_gram(row(8192, 28672))  # down_proj: 8192² Gram
    assert not use_gram(row(8192, 1024))


def test_unsupported_tp_layout_is_refused_before_any_work():
    """megatron's expert-parallel linears: a clear error naming the layer and the fix."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from kasa_ds import KaSAConfig, apply_kasa

    if dist.is_initialized():
        pytest.skip("needs a fresh process group")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32,
                                  tensor_model_parallel_size=1)
        model = torch.nn.ModuleDict({"up": ColumnParallelLinear(16, 32, config=cfg, init_method=torch.nn.init.zeros_,
                                                                bias=False, gather_output=False)})
        model.up.explicit_expert_comm = True  # megatron sets it for experts with TP or EP > 1; KaSA reads the layer's
        with pytest.raises(ValueError, match="up: expert-parallel linears are not supported.*exclude_modules"):
            apply_kasa(model, KaSAConfig(r=2, target_modules=["up"]))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_glu_chunked_split_join_roundtrip():
    """megatron's GLU linear_fc1 holds [gate_i; up_i] on TP rank i: splitting a full lora_B takes those rows and
    joining the parts restores the TP=1 layout (plain concatenation would interleave gate and up)."""
    from kasa_ds.placements.tp.spec import join_factor, split_factor

    full = torch.arange(12 * 2, dtype=torch.float32).view(12, 2)  # gate rows 0..5, up rows 6..11
    spec = ShardSpec(0, (12, 4), (6, 6), None, chunks=2)
    parts = [split_factor(full, spec, r) for r in range(2)]
    assert parts[0][:, 0].tolist() == [0, 2, 4, 12, 14, 16]  # gate rows 0-2, up rows 6-8
    assert torch.equal(join_factor(parts, spec), full)
    plain = ShardSpec(1, (2, 12), (4, 8), None)  # row-parallel, uneven split, no chunks
    full_a = torch.randn(2, 12)
    assert torch.equal(join_factor([split_factor(full_a, plain, r) for r in range(2)], plain), full_a)
