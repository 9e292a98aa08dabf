#!/usr/bin/env python
"""Training throughput of the kasa_ds recipe against TRL SFTTrainer + PEFT LoRA, and packing against none.

    python tools/prepare_model.py smollm2-135m-instruct && python tools/make_chat_data.py   # once
    python tools/bench_recipe.py                       # SmolLM2-135M-Instruct on the chatterbot conversations
    python tools/bench_recipe.py --steps 30 --out docs/results/bench_recipe.json

Three runs in one process, on the same model, conversations, micro batch, max_length, rank r and target modules,
float32, AdamW, constant learning rate, no activation checkpointing (TRL's default turns it on: off here, as in the
recipe), no evaluation:
    kasa            the kasa_ds recipe (kasa_ds.training.recipe.Recipe), KaSA, examples padded per batch
    trl_lora        TRL SFTTrainer with a PEFT LoRA config, examples padded per batch (TRL's default)
    kasa_packed     the kasa_ds recipe with data.packing: examples bin-packed into max_length rows
Throughput is non-padding tokens per second of wall time between the end of step ``--warmup`` and the end of the
last step (data loading, forward, backward, optimizer and logging included; model loading, tokenization and the
KaSA truncation not). The unpacked runs train on the same batches in the same order: the recipe's own stream
(kasa_ds.training.data.global_batches, seeded by train.seed) is fed to TRL through its sampler, and both runs record
the example indices they stepped on (``same_batches`` in the JSON says they matched). The packed run trains on the
same conversations packed into ``--max-length`` rows. Prints the table and the two ratios (targets: kasa / trl_lora
≥ 1.0, kasa_packed / kasa ≥ 1.5); ``--out`` writes them as JSON with the settings and the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


from kasa_ds.training.assets import models_cache
from kasa_ds.training.config import load_train_config
from kasa_ds.training.data import global_batches
from kasa_ds.training.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(models_cache() / "smollm2-135m-instruct"))
    p.add_argument("--data", default=str(Path.home() / ".cache/kasa_ds/data/chatterbot/train.jsonl"),
                   help="JSONL of {messages: [...]} conversations")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (measured after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="micro batch (rows when packed)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--runs", nargs="+", default=["kasa", "trl_lora", "kasa_packed"],
                   choices=["kasa", "trl_lora", "kasa_packed"])
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)
    for path, what in ((a.model, "--model"), (a.data, "--data")):
        if not Path(path).exists():
            p.error(f"{what} {path} not found; run tools/prepare_model.py smollm2-135m-instruct and "
                    "tools/make_chat_data.py first")
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    return a


def throughput(marks: list[tuple[float, float]], warmup: int) -> float:
    """Tokens per second from (time at step end, tokens of the step): steps after ``warmup``."""
    measured = marks[warmup:]
    return sum(tokens for _, tokens in measured) / (measured[-1][0] - marks[warmup - 1][0])


class TimedRecipe(Recipe):
    """The recipe, noting when each step ends and how many non-padding tokens it trained on."""

    def train_step(self, step: int, indices: list[int]) -> dict:
        record = super().train_step(step, indices)
        self.marks.append((time.perf_counter(), record["tokens_per_s"] * record["step_time"]))
        self.stepped.append(list(indices))
        return record


def recipe_config(a, packing: bool, out: Path):
    return load_train_config(str(REPO / "configs/smollm2_chat.yaml"), [
        f"model.path={a.model}", f"data.train={a.data}", "data.eval=null", f"data.packing={str(packing).lower()}",
        f"model.max_length={a.max_length}", f"kasa.r={a.r}", f"kasa.alpha={2 * a.r}",
        f"kasa.target_modules=[{','.join(a.targets)}]", f"train.max_steps={a.steps}",
        f"train.micro_batch_size={a.batch}",
        "train.lr_schedule=constant", "train.warmup_steps=0", f"train.save_every={a.steps}", "train.log_every=4",
        "train.sample_prompts=0", f"output_dir={out}", "resume=none"])


def run_kasa(a, packing: bool, out: Path) -> dict:
    recipe = TimedRecipe(recipe_config(a, packing, out))
    recipe.marks, recipe.stepped = [], []
    recipe.preflight()
    try:
        assert recipe.run() == 0
    finally:
        recipe.lock.release()
    return {"tokens_per_s": throughput(recipe.marks, a.warmup), "examples": len(recipe.train_set),
            "batches": recipe.stepped, **_memory()}


def recipe_order(a, examples: int) -> list[list[int]]:
    """The recipe's first ``--steps`` batches of example indices (one process: its global batch is the micro batch)."""
    stream = global_batches(examples, a.batch, recipe_config(a, False, Path(".")).train.seed)
    return [next(stream) for _ in range(a.steps)]


def run_trl(a, out: Path) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks: list[list[float]] = []
    data = datasets.load_dataset("json", data_files=a.data, split="train").select_columns(["messages"])
    batches = recipe_order(a, len(data))

    drawn: list[int] = []

    class RecipeOrder(torch.utils.data.Sampler):
        """The recipe's batches, in its order; what the loader drew is noted."""

        def __len__(self):
            return len(batches) * a.batch

        def __iter__(self):
            for i in (i for batch in batches for i in batch):
                drawn.append(i)
                yield i

    class Counting(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return RecipeOrder()

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            marks.append([0.0, float(mask.sum() if mask is not None else inputs["input_ids"].numel())])
            return super().training_step(model, inputs, *args, **kwargs)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[-1][0] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                       max_steps=a.steps, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
                       max_length=a.max_length, packing=False, gradient_checkpointing=False, save_strategy="no",
                       logging_steps=max(a.steps, 1), report_to=[], bf16=False, fp16=False, seed=0,
                       use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    lora = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, target_modules=a.targets, task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                       callbacks=[StepEnd()])
    trainer.train()
    stepped = [drawn[k * a.batch:(k + 1) * a.batch] for k in range(a.steps)]
    return {"tokens_per_s": throughput([tuple(m) for m in marks], a.warmup), "examples": len(data),
            "batches": stepped, **_memory()}


def _memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated() / (1 << 30)
    torch.cuda.reset_peak_memory_stats()
    return {"peak_memory_gib": peak}


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.runs:
            out = Path(tmp) / name
            results[name] = run_trl(a, out) if name == "trl_lora" else run_kasa(a, name == "kasa_packed", out)
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    print(f"\n{'run':<12} {'tokens/s':>10}" + ("  peak GiB" if torch.cuda.is_available() else ""))
    for name, r in results.items():
        print(f"{name:<12} {r['tokens_per_s']:>10.0f}" + (f"  {r['peak_memory_gib']:8.2f}" if "peak_memory_gib" in r
                                                           else ""))
    ratios, same = {}, None
    if {"kasa", "trl_lora"} <= results.keys():
        same = results["kasa"]["batches"] == results["trl_lora"]["batches"]
        print(f"kasa and trl_lora stepped on the same batches in the same order: {same}")
        ratios["kasa / trl_lora"] = results["kasa"]["tokens_per_s"] / results["trl_lora"]["tokens_per_s"]
    if {"kasa", "kasa_packed"} <= results.keys():
        ratios["kasa_packed / kasa"] = results["kasa_packed"]["tokens_per_s"] / results["kasa"]["tokens_per_s"]
    for name, value in ratios.items():
        target = 1.0 if name.endswith("trl_lora") else 1.5
        print(f"{name}: {value:.3f}× (target ≥ {target}×: {'met' if value >= target else 'NOT met'})")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"device": device, "settings": {k: v for k, v in vars(a).items()
                                                                          if k != "out"},
                                           "same_batches": same, "ratios": ratios,
                                           "runs": {n: {k: v for k, v in r.items() if k != "batches"}
                                                    for n, r in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
