import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

#: tests of a tool import the tool's module (tools/ is not a package; each tool is a thin command over kasa_ds)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"

ALL_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def free_port() -> int:
    """A TCP port the OS reports free now, for one launcher's rendezvous (back-to-back launches on one fixed port
    can find it still held by the previous job's store)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_script_output(script: str, what: str, timeout: int = 1800) -> str:
    """The last line ``tools/<script>`` prints (the environment it made, or found made earlier under ~/.cache/kasa_ds);
    a skip with the script's own error when it could not make ``what``."""
    import subprocess

    proc = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "tools" / script)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.skip(f"{what} could not be installed (tools/{script}): {proc.stderr[-1500:]}")
    return proc.stdout.strip().splitlines()[-1]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_moe(arch: str, experts: int = 4):
    """A 2-layer mixture-of-experts model of ``arch`` (``experts`` experts, top-2) from transformers' own classes,
    seeded."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
    config = {
        "mixtral": lambda: tf.MixtralConfig(intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2,
                                            **common),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=experts,
                                               num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8,
                                               norm_topk_prob=True, **common),
        "olmoe": lambda: tf.OlmoeConfig(intermediate_size=24, num_experts=experts, num_experts_per_tok=2, **common),
        "deepseek_v3": lambda: tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=24,
                                                   n_routed_experts=experts,
                                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                                   n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                                   **(common | {"num_key_value_heads": 4})),
        "gpt_oss": lambda: tf.GptOssConfig(intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2,
                                           head_dim=8, sliding_window=16, **common),
    }[arch]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # some classes leave expert parameters uninitialized (torch.empty) outside from_pretrained
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def randomize_adapters(model, seed: int = 1) -> None:
    """Give every adapter non-zero ΔU so that ΔW ≠ 0 (a fresh adapter has ΔW = 0 and would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def token_data(n: int = 32, length: int = 16, seed: int = 0) -> list[dict]:
    """Causal-LM examples of equal length (no padding) for the tiny Llama: labels = input_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def write_checkpoints(model, run, steps=(2, 4)) -> None:
    """Recipe-style checkpoints of an adapted ``model`` in ``run``: per step, new adapter values, the adapter files
    (the same files save_adapter writes) and meta.json, committed as the recipe does."""
    from kasa_ds import save_adapter
    from kasa_ds.training import checkpoint

    for step in steps:
        randomize_adapters(model, seed=step)
        tmp = checkpoint.begin(run, step)
        save_adapter(model, tmp / "adapter")
        for f in (tmp / "adapter").iterdir():
            f.rename(tmp / f.name)
        (tmp / "adapter").rmdir()
        checkpoint.commit(tmp, {"step": step, "fingerprint": {}}, keep=5)


def write_uneven_instructions(path, n: int = 32) -> None:
    """Alpaca records whose label-token counts differ by an order of magnitude: long prompts with one-word answers,
    short prompts with long answers (a mean of per-batch means is then far from the token mean)."""
    import json

    words = "the quick brown fox jumps over the lazy dog while the cat watches from the warm window".split()
    with open(path, "w") as f:
        for i in range(n):
            long = " ".join(words[(i + j) % len(words)] for j in range(40))
            record = {"instruction": long, "input": "", "output": "Yes."} if i % 2 else \
                {"instruction": "Say it.", "input": "", "output": long}
            f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """A real full disk to write to: a tmpfs of ``size`` mounted at ``path`` (root only: skipped, with the reason,
    elsewhere), unmounted on the way out."""
    import subprocess

    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """One tiny Llama checkpoint (random init, SentencePiece tokenizer; tools/make_tiny_llama.py) for the whole session.
    Read-only: a test that changes model files copies it first."""
    from make_tiny_llama import build

    return build(tmp_path_factory.mktemp("tiny-llama"), hidden=48, layers=2, vocab=320)


@pytest.fixture(scope="session")
def tiny_moe_dir(tiny_llama_dir, tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint (5 experts, top-2, random init) with the tiny Llama's tokenizer, for recipe runs.
    Read-only."""
    import shutil

    import transformers as tf

    cfg = tf.Qwen3MoeConfig(vocab_size=320, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=5, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=256,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # expert parameters may be left uninitialized (torch.empty) outside from_pretrained
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(out)
    for f in Path(tiny_llama_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a local HF checkpoint (tools/prepare_model.py from the registry package's GGUF), once
    per session. Read-only."""
    from kasa_ds.training.assets import gguf_file

    try:
        gguf_file("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(f"{e} (tools/setup.sh --dev installs it)")
    from prepare_model import main

    return main(["smollm2-135m-instruct", "--out", str(tmp_path_factory.mktemp("models") / "smollm2")])


#: two tasks, one KaSA adapter each, trained on SmolLM2 once per session for the serving tests (vLLM, llama.cpp)
SMOLLM2_TASKS = {"capitals": "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
                 "colours": "Question: What colour is the sky?\nAnswer: The sky is a deep, bright blue."}
SMOLLM2_R, GREEDY_TOKENS = 4, 8


@pytest.fixture(scope="session")
def smollm2_kasa(smollm2):
    """Per task of SMOLLM2_TASKS: SmolLM2 with KaSA (r = 4 on every linear of each block) trained 4 steps to
    reproduce the task's text, an adapter that visibly changes the model; and the tokenizer. Read-only: eval mode."""
    import transformers
    from kasa_ds import KaSAConfig, apply_kasa

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    models = {}
    for name, text in SMOLLM2_TASKS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
        apply_kasa(model, KaSAConfig(r=SMOLLM2_R, alpha=2 * SMOLLM2_R, target_modules=ALL_LLAMA_TARGETS, init_seed=0),
                   show_progress=False)
        ids = tokenizer(text, return_tensors="pt").input_ids
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models[name] = model.eval()
    return models, tokenizer


@torch.no_grad()
def greedy(model, prompt_ids: list[int], new_tokens: int = GREEDY_TOKENS) -> dict:
    """Up to ``new_tokens`` greedy tokens and their log-probabilities, ending at EOS (as servers do)."""
    ids, tokens, logprobs = torch.tensor([prompt_ids]), [], []
    for _ in range(new_tokens):
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(lp[token].item())
        if token == model.config.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session", autouse=True)
def remove_leaked_deepspeed_shm():
    """DeepSpeed's CPU allreduce leaves a ≈ 66 MiB /dev/shm segment per rank of a run that did not end through the
    recipe's shutdown (workers, killed or preempted ranks); remove those this session created."""
    import glob

    before = set(glob.glob(SHM_GLOB))
    yield
    for path in set(glob.glob(SHM_GLOB)) - before:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
