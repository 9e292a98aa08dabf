"""An adapter belongs to the base it truncated (kasa_ds.core.fingerprint): every loader, exporter and merger refuses
another base of the same shapes (another seed, a 1 %-perturbed copy), names both, and takes an explicit override;
damaged or foreign checkpoints are one line; ``save_pretrained`` on a KaSA model is refused with the right calls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama
from kasa_ds import KaSAConfig, apply_kasa, export_lora_adapter, load_adapter, merge_kasa, save_adapter
from kasa_ds.core import fingerprint

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(r=4, target_modules=ALL_LLAMA_TARGETS, init_seed=0)


def perturbed(seed: int = 0, scale: float = 0.01):
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base checkpoint, its adapter (ΔW ≠ 0), another seed's checkpoint and a 1 %-perturbed copy."""
    root = tmp_path_factory.mktemp("bases")
    tiny_llama(0).save_pretrained(root / "base")
    tiny_llama(1).save_pretrained(root / "seed1")
    perturbed().save_pretrained(root / "perturbed")
    model = tiny_llama(0)
    apply_kasa(model, KaSAConfig(**CONFIG), show_progress=False)
    randomize_adapters(model)
    save_adapter(model, root / "adapter")
    return root, model


def test_the_adapter_records_its_base(trained):
    root, model = trained
    extra = json.loads((root / "adapter" / "kasa_ds_config.json").read_text())["base_fingerprint"]
    assert set(extra["layers"]) == {n for n, _ in model.named_modules() if n.endswith(tuple(ALL_LLAMA_TARGETS))}
    entry = extra["layers"]["model.layers.0.self_attn.q_proj"]
    weight = tiny_llama(0).model.layers[0].self_attn.q_proj.weight.detach()
    assert entry["dtype"] == "float32" and len(entry["values"]) == fingerprint.SAMPLES
    assert entry["values"] == weight.flatten()[fingerprint.sample_positions(tuple(weight.shape))].tolist()
    assert extra["digest"] == fingerprint.digest(extra["layers"])


@pytest.mark.parametrize("other", ["seed1", "perturbed"])
def test_load_adapter_refuses_another_base_and_leaves_it_unchanged(trained, other):
    root, _ = trained
    model = tiny_llama(1) if other == "seed1" else perturbed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="belongs to another base") as e:
        load_adapter(model, root / "adapter", show_progress=False)
    assert "its base:" in str(e.value) and "this base:" in str(e.value) and "allow_other_base=True" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing truncated
    assert not hasattr(model, "kasa_config")
    load_adapter(model, root / "adapter", show_progress=False, allow_other_base=True)  # on purpose: loads


def test_the_same_base_loads_in_another_dtype(trained):
    root, model = trained
    x = torch.randint(0, 96, (2, 10))
    same = tiny_llama(0)
    load_adapter(same, root / "adapter", show_progress=False)
    torch.testing.assert_close(same(x).logits, model(x).logits, rtol=0, atol=0)
    load_adapter(tiny_llama(0).to(torch.bfloat16), root / "adapter", show_progress=False)  # bf16 copy: same base


def test_an_adapted_model_refuses_an_adapter_of_other_settings_or_base(trained, tmp_path):
    root, _ = trained
    other = tiny_llama(0)
    apply_kasa(other, KaSAConfig(**{**CONFIG, "alpha": 64.0}), show_progress=False)
    with pytest.raises(ValueError, match=r"alpha=16.0 vs 64.0"):
        load_adapter(other, root / "adapter", show_progress=False)
    seed1 = tiny_llama(1)
    apply_kasa(seed1, KaSAConfig(**CONFIG), show_progress=False)
    with pytest.raises(ValueError, match="belongs to another base"):
        load_adapter(seed1, root / "adapter", show_progress=False)


def tool(name: str, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("other", ["seed1", "perturbed"])
def test_export_and_merge_refuse_another_base(trained, tmp_path, other):
    root, _ = trained
    for cmd in (["export_adapter.py", root / "adapter", "--as-lora", "--base", root / other, "--out", tmp_path / "l"],
                ["merge.py", "--base", root / other, "--adapter", root / "adapter", "--out", tmp_path / "m"]):
        proc = tool(*cmd)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "belongs to another base" in lines[0] and "--allow-other-base" in lines[0]
        assert not (tmp_path / "l").exists() and not (tmp_path / "m").exists()  # nothing half-written
    assert tool("merge.py", "--base", root / other, "--adapter", root / "adapter", "--out", tmp_path / "m",
                "--allow-other-base").returncode == 0


def test_export_lora_adapter_from_the_model_refuses_another_base(trained, tmp_path):
    root, model = trained
    with pytest.raises(ValueError, match="belongs to another base"):
        export_lora_adapter(model, tmp_path / "lora", base=tiny_llama(1))
    assert export_lora_adapter(model, tmp_path / "lora", base=root / "base") is not None


def test_a_base_of_another_shape_is_one_line(trained, tmp_path):
    root, _ = trained
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "wide")
    for cmd in (["export_adapter.py", root / "adapter", "--as-lora", "--base", tmp_path / "wide", "--out",
                 tmp_path / "l"],
                ["merge.py", "--base", tmp_path / "wide", "--adapter", root / "adapter", "--out", tmp_path / "m"]):
        proc = tool(*cmd)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "another model's checkpoint" in proc.stderr


def damaged(root: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    bad = tmp_path / how
    shutil.copytree(root / "base", bad)
    data = (bad / "model.safetensors").read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # a header length of 2^62 bytes
        data = (1 << 62).to_bytes(8, "little") + data[8:]
    (bad / "model.safetensors").write_bytes(data)
    return bad


@pytest.mark.parametrize("how", ["truncated", "header_length"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(trained, tmp_path, how):
    root, _ = trained
    bad = damaged(root, tmp_path, how)
    for cmd in (["export_adapter.py", root / "adapter", "--as-lora", "--base", bad, "--out", tmp_path / "l"],
                ["merge.py", "--base", bad, "--adapter", root / "adapter", "--out", tmp_path / "m"]):
        proc = tool(*cmd)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
        assert f"{bad / 'model.safetensors'}" in proc.stderr and ("truncated" in proc.stderr or "corrupted" in
                                                                   proc.stderr)


def test_merge_refuses_to_write_non_finite_tensors(trained, tmp_path):
    root, _ = trained
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    proc = tool("merge.py", "--base", tmp_path / "nan", "--adapter", root / "adapter", "--out", tmp_path / "m",
                "--allow-other-base")
    assert proc.returncode == 2 and "NaN or inf" in proc.stderr and not (tmp_path / "m").exists()


def test_save_pretrained_on_a_kasa_model_names_the_two_right_calls(trained, tmp_path):
    _, model = trained
    with pytest.raises(ValueError, match=r"save_adapter\(model, DIR\).*merge_kasa\(model\).save_pretrained\(DIR\)"):
        model.save_pretrained(tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    merged = merge_kasa(_adapted_copy())
    merged.save_pretrained(tmp_path / "merged")  # a plain model saves again
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = torch.randint(0, 96, (1, 8))
    torch.testing.assert_close(reloaded(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)


def _adapted_copy():
    model = tiny_llama(0)
    apply_kasa(model, KaSAConfig(**CONFIG), show_progress=False)
    randomize_adapters(model)
    return model


def test_no_export_writes_a_non_finite_tensor(trained, tmp_path):
    root, _ = trained
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    proc = tool("export_adapter.py", root / "adapter", "--as-lora", "--base", tmp_path / "inf", "--out",
                tmp_path / "l", "--allow-other-base")
    assert proc.returncode == 2 and "NaN or inf" in proc.stderr and not (tmp_path / "l").exists()
    proc = tool("precompute_svd.py", "--model", tmp_path / "inf", "--kasa-r", "4", "--targets", "q_proj",
                "--out", tmp_path / "c")
    assert proc.returncode == 2 and "NaN or inf" in proc.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.tmp").exists()
