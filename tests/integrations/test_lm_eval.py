"""lm-evaluation-harness on a KaSA run: its ``hf`` model with the rank-2r LoRA export (``peft=``), on a task defined
by a local YAML over a local JSONL (no download), scores the items as kasa_ds.training.choices scores the KaSA model.

Tolerance: per choice log-likelihoods ≤ 1e-4 absolute (float32; PEFT adds the rank-2r update in another order than
the KaSA layer: ~1e-6 relative per logit, summed over a few tokens); accuracies equal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALL_LLAMA_TARGETS
from kasa_ds import KaSAConfig, apply_kasa, kasa_layers
from kasa_ds.io.lora import export_lora_adapter
from kasa_ds.training.choices import choice_accuracy

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a [dev] dependency (pip install -e .[dev])")
transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]

TASK = """task: kasa_rt_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


def items_of(path, n=12):
    """Rotten Tomatoes eval reviews (bundled) as 2-choice items."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [{"context": f"Review: {r['text']}\nSentiment:", "choices": ["negative", "positive"], "label": r["label"]}
            for r in rows]


def test_lm_eval_scores_the_export_as_kasa_ds_scores_the_model(tmp_path, tiny_llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    apply_kasa(model, KaSAConfig(r=4, alpha=8, target_modules=ALL_LLAMA_TARGETS, init_seed=0), show_progress=False)
    with torch.no_grad():
        for _, layer in kasa_layers(model):
            layer.lora_B.weight.normal_(std=0.2)
    export_lora_adapter(model, tmp_path / "lora", base=str(tiny_llama_dir))

    items = items_of(REPO / "data/rotten_tomatoes/eval.jsonl")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kasa_rt_choices.yaml").write_text(TASK.format(items=tmp_path / "items.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny_llama_dir},peft={tmp_path / 'lora'},dtype=float32",
                           "--include_path", str(tmp_path / "tasks"), "--tasks", "kasa_rt_choices", "--device", "cpu",
                           "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_kasa_rt_choices_*.jsonl"))
               .read_text().splitlines()]
    theirs = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}

    ours = choice_accuracy(model, tokenizer, items)
    for i, scores in enumerate(ours["loglikelihoods"]):
        assert theirs[i] == pytest.approx(scores, abs=1e-4), i
    assert results["results"]["kasa_rt_choices"]["acc,none"] == ours["acc"]
    assert len({round(s[0] - s[1], 3) for s in ours["loglikelihoods"]}) > 1  # the items are not all scored alike
