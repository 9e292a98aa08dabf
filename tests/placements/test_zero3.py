"""KaSA on a real DeepSpeed ZeRO-3 partitioned model (CPU accelerator, gloo), 1 and 2 ranks, against one process.

Tolerances: the distributed truncation runs the same solver on the same gathered weight as one process, and only
W − left·right is evaluated per shard, so W_world agrees to float32 round-off (≤ 1e-6 relative). Regularizer values
and gradients are float32 r×r Gram computations (1e-5 relative). Logits through PEFT: 2e-4 as in
tests/io/test_peft_interop.py (PEFT re-truncates with its own float32 SVD).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is a [dev] dependency")
peft = pytest.importorskip("peft", minversion="0.21", reason="PEFT >= 0.21 is a [dev] dependency")
from safetensors.torch import load_file  # noqa: E402

from conftest import free_port, randomize_adapters, tiny_llama, tiny_moe  # noqa: E402
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, kasa_regularization, save_adapter  # noqa: E402
from kasa_ds.io.adapter import read_base_fingerprint  # noqa: E402
from zero3_common import (ADAPTER_SEED, CONFIG_KW, EXPERTS_CONFIG_KW, EXPERTS_LR, EXPERTS_STEPS,  # noqa: E402
                          TOKENS_SEED, adapted_base_parameters)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_llama(seed=4).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(base_dir):
    """The single-process run of the same steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_kasa(model, KaSAConfig(**CONFIG_KW), show_progress=False)
    truncated = {n: m.base_layer.weight.detach().clone() for n, m in kasa_layers(model)}
    init = {f"{n}.{p}": t.detach().clone() for n, m in kasa_layers(model) for p, t in m.adapter_parameters()}
    randomize_adapters(model, ADAPTER_SEED)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(TOKENS_SEED))
    model(input_ids=tokens)
    reg = kasa_regularization(model)
    reg.backward()
    grads = {f"{n}.{p}": t.grad.clone() for n, m in kasa_layers(model) for p, t in m.adapter_parameters()}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return dict(truncated=truncated, init=init, reg=reg.item(), grads=grads, logits=logits, tokens=tokens)


def run_worker(base_dir, out, world):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port",
           str(free_port()), str(REPO / "tests/placements/zero3_worker.py"), str(base_dir),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (out / "done").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_zero3_matches_single_process(base_dir, reference, tmp_path, world):
    run_worker(base_dir, tmp_path, world)
    truncated = load_file(str(tmp_path / "truncated.safetensors"))
    assert truncated.keys() == reference["truncated"].keys() and len(truncated) == 14
    for name, w in truncated.items():
        ref = reference["truncated"][name]
        assert ((w - ref).norm() / ref.norm()).item() <= 1e-6, name
    init = load_file(str(tmp_path / "adapter_init" / "adapter_model.safetensors"))
    for key, value in reference["init"].items():
        assert torch.equal(init["base_model.model." + key], value), key  # identical adapter init
    assert json.loads((tmp_path / "reg.json").read_text())["value"] == pytest.approx(reference["reg"], rel=1e-5)
    grads = load_file(str(tmp_path / "reg_grads.safetensors"))
    assert grads.keys() == reference["grads"].keys()
    for key, g in grads.items():
        torch.testing.assert_close(g, reference["grads"][key], rtol=1e-5, atol=1e-6)
    sharded_logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(sharded_logits, reference["logits"], rtol=1e-5, atol=1e-5)
    # the adapter exported from the sharded model loads in PEFT on the original base and gives the same logits
    from transformers import AutoModelForCausalLM

    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in exported.values())  # never the empty-partition bug
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=reference["tokens"]).logits, sharded_logits,
                                   rtol=2e-4, atol=2e-4)


def test_plan_balances_owners_and_bounds_rounds():
    from kasa_ds.inject import find_targets
    from kasa_ds.comm.schedule import assign_owners, svd_cost
    from kasa_ds.placements.scheduled import work_items

    model = tiny_llama()
    items = work_items(find_targets(model, KaSAConfig(**CONFIG_KW)))
    for world in (1, 2, 3, 8):
        assignments = assign_owners(items, world, max_gather_bytes=40_000)
        assert sorted(a.index for a in assignments) == list(range(len(items)))
        load = [sum(svd_cost(items[a.index].shape) for a in assignments if a.owner == r) for r in range(world)]
        biggest = max(svd_cost(i.shape) for i in items)
        assert max(load) - min(load) <= biggest  # LPT: no rank is more than one weight behind
        for rnd in {a.round for a in assignments}:
            for r in range(world):
                mine = [items[a.index] for a in assignments if a.round == rnd and a.owner == r]
                assert len(mine) <= 1 or sum(i.nbytes for i in mine) <= 40_000
    assert assign_owners(items, 2) == assign_owners(items, 2)  # deterministic


EXPERT_ARCHS = ("mixtral", "gpt_oss")  # gate/up concatenated [E, 2I, H]; transposed, interleaved, with biases


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    """Per architecture: the saved base, and one process's run of what the worker does."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in EXPERT_ARCHS:
        d = tmp_path_factory.mktemp(arch) / arch
        tiny_moe(arch, experts=5).save_pretrained(d)  # 5 experts: the two flat shards cut through an expert
        model = AutoModelForCausalLM.from_pretrained(d)
        apply_kasa(model, KaSAConfig(**EXPERTS_CONFIG_KW), show_progress=False)
        truncated = {n: w.detach().clone() for n, w in adapted_base_parameters(model).items()}
        adapter_init = tmp_path_factory.mktemp("init")
        save_adapter(model, adapter_init)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=EXPERTS_LR)
        tokens = torch.randint(0, model.config.vocab_size, (2, 12),
                               generator=torch.Generator().manual_seed(TOKENS_SEED))
        model.train()
        losses = []
        for _ in range(EXPERTS_STEPS):
            task = model(input_ids=tokens, labels=tokens).loss
            reg = kasa_regularization(model)
            (task + reg).backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append([task.item(), reg.item()])
        adapter = tmp_path_factory.mktemp("adapter")
        save_adapter(model, adapter)
        out[arch] = dict(dir=d, truncated=truncated, init=adapter_init, losses=losses, adapter=adapter)
    return out


def adapter_tensors(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
def test_zero3_experts_match_one_process(moe_reference, tmp_path):
    """Fused MoE experts under a real 2-rank ZeRO-3 partition (flat shards that cut through experts): truncation
    owner-scheduled per (parameter, range of experts), the base fingerprint, the in-forward regularizer, 3 SGD steps
    and the gathered adapter all equal one process's; so does the spread truncation of experts held whole. Tolerances: W_world 1e-6 relative (the same solver on the same gathered
    weights, float32 rewrite per shard); losses and the adapter 1e-5 (float32 gradients averaged over two ranks)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests/placements/zero3_experts_worker.py"), str(tmp_path),
           *[str(moe_reference[a]["dir"]) for a in EXPERT_ARCHS]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "done").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    for arch in EXPERT_ARCHS:
        ref, out = moe_reference[arch], tmp_path / arch
        for what in ("truncated", "whole_truncated"):  # ZeRO-3 shards; weights held whole, solves spread
            truncated = load_file(str(out / f"{what}.safetensors"))
            assert truncated.keys() == ref["truncated"].keys()
            assert any("experts.down_proj" in k for k in truncated)
            assert any("experts.gate_up_proj" in k for k in truncated)
            for name, w in truncated.items():
                expected = ref["truncated"][name]
                assert ((w - expected).norm() / expected.norm()).item() <= 1e-6, (arch, what, name)
        init, ref_init = adapter_tensors(out / "adapter_init"), adapter_tensors(ref["init"])
        assert init.keys() == ref_init.keys() and all(torch.equal(init[k], ref_init[k]) for k in init), arch
        # the base fingerprint sampled from the flat shards is the one sampled from the whole weights
        fingerprint, ref_fingerprint = read_base_fingerprint(out / "adapter_init"), read_base_fingerprint(ref["init"])
        assert fingerprint["digest"] == ref_fingerprint["digest"], arch
        assert any("experts" in k for k in fingerprint["layers"]), arch
        losses = json.loads((out / "losses.json").read_text())
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        assert losses[-1][0] < losses[0][0], (arch, losses)  # the steps train
        trained, ref_trained = adapter_tensors(out / "adapter"), adapter_tensors(ref["adapter"])
        assert trained.keys() == ref_trained.keys()
        for key, value in trained.items():
            torch.testing.assert_close(value, ref_trained[key], rtol=1e-5, atol=1e-6, msg=f"{arch} {key}")
