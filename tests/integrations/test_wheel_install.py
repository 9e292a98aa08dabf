"""kasa_ds as a library: the wheel (``pip wheel . --no-deps``) installed into a fresh virtual environment (system
torch and transformers visible, nothing editable), used from a directory outside the checkout: the README's library
example, and ``kasa-train --config`` on a YAML written here, for a few steps."""

import json
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd, cwd, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's python, its bin dir, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-w", root / "dist"], root)
    wheels = list((root / "dist").glob("kasa_ds-*.whl"))
    assert len(wheels) == 1, wheels
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheels[0]], root)
    work = root / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import kasa_ds; print(kasa_ds.__file__, kasa_ds.__version__)"], work).split()
    assert where[0].startswith(str(root / "venv")), f"kasa_ds imported from {where[0]}, not the installed wheel"
    return python, root / "venv" / "bin", work


def test_the_readme_library_example_runs_from_the_wheel(installed):
    python, _, work = installed
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Using the library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = textwrap.dedent('''
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        def tiny():
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=False)).eval()
        model, original_model = tiny(), tiny()
        batch = {"input_ids": torch.randint(0, 96, (2, 12)), "labels": torch.randint(0, 96, (2, 12))}
    ''') + example + textwrap.dedent('''
        with torch.no_grad():
            x = batch["input_ids"]
            assert torch.allclose(original_model(x).logits, model(x).logits, atol=1e-5)
            from transformers import AutoModelForCausalLM
            merged = AutoModelForCausalLM.from_pretrained("merged")
            assert torch.allclose(merged(x).logits, model(x).logits, atol=1e-4)
        print("example ok", loss.item())
    ''')
    (work / "example.py").write_text(script)
    assert "example ok" in run([python, "example.py"], work)


def test_kasa_train_runs_a_yaml_from_the_wheel(installed, tmp_path):
    python, bin_dir, work = installed
    from make_tiny_llama import build

    model_dir = build(tmp_path / "tiny-llama", hidden=48, layers=2, vocab=320)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w} {w}."}) + "\n"
                            for w in ("red", "green", "blue", "cyan", "teal", "gold", "grey", "pink")))
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{path: {model_dir}, task: causal_lm, max_length: 32}}
        data: {{train: {data}, eval: {data}, format: prompt_completion}}
        kasa: {{r: 2, target_modules: [q_proj, v_proj]}}
        train: {{max_steps: 3, micro_batch_size: 4, eval_every: 3, save_every: 3, log_every: 1, lr: 1.0e-3}}
        output_dir: {tmp_path / "run"}
    """))
    run([bin_dir / "kasa-train", "--config", config], work)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for command in ("kasa-export", "kasa-merge", "kasa-precompute-svd", "kasa-plan-memory", "kasa-prepare-model"):
        assert "usage:" in run([bin_dir / command, "--help"], work)
