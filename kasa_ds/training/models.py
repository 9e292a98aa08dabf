"""Load the recipe's model and tokenizer from a local directory (never a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..formats.bnb4 import quantize_linears_
from ..inject import find_targets
from ..io.hf_checkpoint import list_tensors
from .assets import embedded_model_dir
from .config import EMBEDDED_MODEL, ModelSection
from .partitioned_4bit import load_partitioned_4bit


def device() -> torch.device:
    """This process's device: its local CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_dir(section: ModelSection) -> str:
    return str(embedded_model_dir()) if section.path == EMBEDDED_MODEL else section.path


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir(section), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


#: files one of which a tokenizer directory holds (fast tokenizers, SentencePiece models, WordPiece/BPE vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json")


def check_targets(section: ModelSection, kasa_config: KaSAConfig) -> None:
    """The model directory checked before anything loads, from config.json and the safetensors headers alone (the
    model built on the meta device, no weights read): a tokenizer is there, the weights are whole and of the shapes
    config.json describes, and kasa.target_modules, kasa.r and tied weights fit. Each problem: one ValueError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(model_dir(section))
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model.path={section.path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy "
                         "the tokenizer files of the model's release into it")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        if section.task == "seq_cls":
            config.num_labels = section.num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    check_weight_shapes(model, path, section.path)
    find_targets(model, kasa_config)


def check_weight_shapes(model: nn.Module, path: Path, shown: str) -> None:
    """The checkpoint's tensors (headers read, truncation checked) have the shapes of the model config.json builds."""
    try:
        stored = list_tensors(path)
    except FileNotFoundError:  # PyTorch .bin weights: from_pretrained checks them as it loads
        return
    found = 0
    for name, param in model.named_parameters():
        # the same name, or without a head model's base prefix (bert.encoder… in a BERT-base checkpoint's encoder…)
        key = next((k for k in (name, name.split(".", 1)[-1]) if k in stored), None)
        if key is None:
            continue
        found += 1
        if tuple(stored[key].shape) != tuple(param.shape):
            raise ValueError(f"model.path={shown}: config.json does not describe these weights ({name}: config.json "
                             f"gives {tuple(param.shape)}, {stored[key].file} holds {tuple(stored[key].shape)}); is "
                             "config.json from another model?")
    if not found:
        raise ValueError(f"model.path={shown}: none of the parameters config.json describes is in the weights; is "
                         "config.json from another model?")


def load_model(section: ModelSection, pad_token_id: int, keep_full_precision=lambda name: False,
               zero3: Optional[dict] = None, half: Optional[torch.dtype] = None) -> nn.Module:
    """The HF model for ``section.task``; with ``section.quantize`` every linear but the heads and the modules
    ``keep_full_precision(name)`` names becomes 4-bit. ``zero3``: the DeepSpeed config a 4-bit base is partitioned
    under as it streams in (kasa_ds.training.partitioned_4bit; ``half``: the engine's parameter dtype, which stores
    the packed bytes); a 16-bit base is built partitioned by ``from_pretrained`` itself (HfDeepSpeedConfig)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=getattr(torch, section.dtype), local_files_only=True)
    compute = torch.bfloat16 if torch.cuda.is_available() and section.dtype == "bfloat16" else torch.float32
    if section.quantize and zero3 is not None:
        config = AutoConfig.from_pretrained(model_dir(section), local_files_only=True)
        if section.task == "seq_cls":
            config.num_labels = section.num_labels
        auto = AutoModelForSequenceClassification if section.task == "seq_cls" else AutoModelForCausalLM
        storage = half or torch.float32
        model = load_partitioned_4bit(model_dir(section), lambda: auto.from_config(config, dtype=kwargs["dtype"]),
                                      zero3, section.quantize, section.double_quant, half or compute, storage,
                                      kwargs["dtype"], device(), keep=keep_full_precision)
    elif section.task == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir(section), num_labels=section.num_labels,
                                                                   **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir(section), **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if section.quantize and zero3 is None:
        quantize_linears_(model, section.quantize, section.double_quant, compute, keep=keep_full_precision)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model
