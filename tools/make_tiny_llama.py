"""Write a small Llama (random init, from a config) with a SentencePiece tokenizer trained on the bundled text.

No small pretrained causal LM ships in a registry package in plain HF format, so the causal-LM path of the recipe
is exercised end to end on this model: a real LlamaForCausalLM + LlamaTokenizer directory loaded through the same
`from_pretrained` code as any user checkpoint (Llama-2-class tokenizers are SentencePiece models too).

    python tools/make_tiny_llama.py --out outputs/tiny-llama [--hidden 64 --layers 2 --vocab 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


CHECKOUT = Path(__file__).resolve().parents[1]
DATA_DIR = CHECKOUT / "data"  # the bundled instruction data the tokenizer is trained on


def build(out: Path, hidden: int = 64, layers: int = 2, vocab: int = 512, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from kasa_ds.training.data import format_prompt

    texts = []
    with open(DATA_DIR / "rt_instruct" / "train.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            texts.append(format_prompt(rec["instruction"], rec["input"]) + rec["output"])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab,
                                       model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                       pad_id=-1, minloglevel=2, num_threads=1)
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    a = p.parse_args()
    print(build(Path(a.out), a.hidden, a.layers, a.vocab))
