"""One PEFT-format writer: recipe checkpoints, the final adapter, exports and save_adapter carry the same files,
kasa_ds_config.json included, so a QKaSA requantize / svd_fp64 run reads back as what it was and merges as such.
Also: load_adapter keeps the model's train/eval mode."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALL_LLAMA_TARGETS, randomize_adapters, tiny_llama
from kasa_ds import KaSAConfig, apply_kasa, load_adapter, save_adapter
from kasa_ds.io.adapter import ADAPTER_FILES, read_adapter_config, read_base_quantization
from kasa_ds.training.config import load_train_config
from kasa_ds.training.recipe import run_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_checkpoint_export_and_merge_keep_the_runs_settings(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a [dev] dependency (QKaSA)")
    from export_adapter import export
    from make_tiny_llama import build
    from merge import merge

    model_dir = build(tmp_path / "tiny", hidden=48, layers=2, vocab=320)
    run = tmp_path / "run"
    assert run_recipe(load_train_config(str(REPO / "configs/tiny_llama_instruct.yaml"), [
        f"model.path={model_dir}", f"output_dir={run}", "model.quantize=nf4", "kasa.quant_mode=requantize",
        "kasa.svd_solver=svd_fp64", "train.max_steps=2", "train.save_every=2", "data.max_eval_examples=8",
        "model.max_length=96", "train.micro_batch_size=4"])) == 0
    checkpoint_dir, final = run / "checkpoints" / "step-0000002", run / "adapter"
    exported = export(run, tmp_path / "exported")  # from the run: its newest checkpoint
    for directory in (checkpoint_dir, final, exported):
        assert {f for f in ADAPTER_FILES if (directory / f).is_file()} == set(ADAPTER_FILES), directory
        config = read_adapter_config(directory)
        assert (config.quant_mode, config.svd_solver) == ("requantize", "svd_fp64"), directory
        assert read_base_quantization(directory)["quant_type"] == "nf4", directory
    # the exported checkpoint adapter merges exactly like the final adapter (same step, same tensors, same base
    # rebuilt as 4-bit and requantized): were the settings lost, the merge would treat the base as 16-bit
    a = merge(model_dir, exported, tmp_path / "m1", torch.float32)
    b = merge(model_dir, final, tmp_path / "m2", torch.float32)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_load_adapter_keeps_eval_mode_so_forwards_are_deterministic(tmp_path, tokens):
    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, dropout=0.3, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama()  # in eval mode
    load_adapter(fresh, tmp_path / "adapter", show_progress=False)
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, fresh(tokens).logits)
    training = tiny_llama().train()
    load_adapter(training, tmp_path / "adapter", show_progress=False)
    assert all(m.training for m in training.modules())
