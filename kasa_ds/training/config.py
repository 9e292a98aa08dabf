"""The training recipe's configuration: YAML + ``key=value`` overrides, validated before any model is loaded.

Every knob is visible in :class:`TrainConfig` and its sections; an unknown key, a wrong type, an impossible value or a
missing file is reported as one :class:`ConfigError` line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..config import KaSAConfig
from ..registry import refusal
from .assets import DATA_DIR, REPO_ROOT
from .chat import FORMATS

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")  # kasa_ds.training.precision.build_optimizer


class ConfigError(ValueError):
    """A bad training configuration; its message is one line naming the key and the fix."""


@dataclass
class ModelSection:
    path: str = EMBEDDED_MODEL  # HF model directory, or the embedded default
    task: str = "seq_cls"  # seq_cls | causal_lm
    num_labels: int = 2  # seq_cls only
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the frozen base
    max_length: int = 64
    gradient_checkpointing: bool = False
    quantize: Optional[str] = None  # nf4 | fp4: QKaSA on a bitsandbytes 4-bit base (every linear but the head)
    double_quant: bool = True


@dataclass
class DataSection:
    # a file (.jsonl .json .csv .parquet .arrow), a glob of shards, or a datasets.save_to_disk directory
    train: str = str(DATA_DIR / "rotten_tomatoes" / "train.jsonl")
    eval: Optional[str] = str(DATA_DIR / "rotten_tomatoes" / "eval.jsonl")
    text_field: str = "text"  # seq_cls
    label_field: str = "label"  # seq_cls
    format: str = "auto"  # causal_lm: auto | alpaca | messages | sharegpt | prompt_completion | text
    chat_template: Optional[str] = None  # Jinja file or string; default: the tokenizer's own
    train_on_prompt: bool = False  # causal_lm: loss on every token, not only the responses / assistant turns
    overlong: str = "truncate"  # causal_lm examples longer than model.max_length: truncate | drop (counted)
    packing: bool = False  # causal_lm: bin-pack training examples into model.max_length rows (no cross-attention)
    max_eval_examples: Optional[int] = None
    cache_dir: Optional[str] = None  # tokenized examples; default: <data dir>/.kasa_ds_cache (else ~/.cache/kasa_ds)


@dataclass
class KaSASection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Union[list, str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    beta: float = 1e-4
    gamma: float = 1e-3
    svd_solver: str = "auto"
    # the head and BERT's pooler (a sentence-transformers checkpoint never trained the [CLS] pooler the HF
    # classification head reads; training it in full removes a long loss plateau at ln 2)
    modules_to_save: list = field(default_factory=lambda: ["classifier", "pooler"])
    exclude_modules: list = field(default_factory=lambda: ["pooler.dense"])
    init_seed: Optional[int] = 0  # same adapter init on every rank (required with several ranks)
    quant_mode: str = "low_rank_correction"  # 4-bit bases: low_rank_correction | requantize
    max_gather_mb: int = 2048  # distributed truncation: cap on weight bytes one rank gathers at once
    svd_cache: Optional[str] = None  # directory written by tools/precompute_svd.py: skip the SVDs


@dataclass
class TrainSection:
    max_steps: int = 300
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30
    lr_schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit (bitsandbytes; runs without DeepSpeed)
    autocast: Optional[str] = None  # bfloat16 | float16 (with loss scaling) | null: mixed precision without DeepSpeed
    max_memory_gib: Optional[float] = None  # without DeepSpeed: planner check before loading, then a cap per step
    max_nonfinite_steps: int = 3  # stop (exit 3) after this many consecutive steps with a NaN/inf loss or gradient
    sample_prompts: int = 0  # causal_lm: at each evaluation, answer the first N eval prompts (greedy) and log them
    sample_max_new_tokens: int = 48


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    kasa: KaSASection = field(default_factory=KaSASection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "outputs/default"
    ds_config: Optional[str] = None  # DeepSpeed JSON; set by --ds_config
    tensor_parallel: int = 1  # > 1: DeepSpeed AutoTP of this size (HF models), KaSA adapters sharded with the base
    distributed_timeout_minutes: int = 30  # a collective waiting longer than this fails the run (no silent hang)
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | none | <checkpoint dir>
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def kasa_config(self) -> KaSAConfig:
        k = self.kasa
        modules_to_save = k.modules_to_save if self.model.task == "seq_cls" else []
        return KaSAConfig(r=k.r, alpha=k.alpha, dropout=k.dropout, target_modules=k.target_modules, beta=k.beta,
                          gamma=k.gamma, svd_solver=k.svd_solver, modules_to_save=modules_to_save,
                          exclude_modules=k.exclude_modules, init_seed=k.init_seed, quant_mode=k.quant_mode)


# ---- launch/megatron/train_gpt.py: a megatron-core GPT with tensor parallelism -----------------------------------

@dataclass
class GPTModelSection:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 176
    seq_length: int = 64
    checkpoint: Optional[str] = None  # Megatron-LM directory (mp_rank_XX/model_optim_rng.pt); null: random init


@dataclass
class GPTDataSection:
    train: str = "data/rt_instruct/train.jsonl"  # text or Alpaca records, read as one byte stream


@dataclass
class GPTKaSASection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[list, str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    beta: float = 1e-4
    gamma: float = 1e-3
    init_seed: Optional[int] = 0


@dataclass
class GPTTrainSection:
    max_steps: int = 20
    micro_batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 5


@dataclass
class MegatronGPTConfig:
    model: GPTModelSection = field(default_factory=GPTModelSection)
    data: GPTDataSection = field(default_factory=GPTDataSection)
    kasa: GPTKaSASection = field(default_factory=GPTKaSASection)
    train: GPTTrainSection = field(default_factory=GPTTrainSection)
    tensor_parallel: int = 2
    output_dir: str = "outputs/megatron-gpt"

    def kasa_config(self) -> KaSAConfig:
        k = self.kasa
        return KaSAConfig(r=k.r, alpha=k.alpha, dropout=k.dropout, target_modules=k.target_modules, beta=k.beta,
                          gamma=k.gamma, init_seed=k.init_seed)


def load_megatron_config(path: Optional[str], overrides: list[str] = ()) -> MegatronGPTConfig:
    """The megatron GPT recipe's config, through the same loader as the main recipe's, validated."""
    c = load_config(MegatronGPTConfig, path, overrides)
    c.data.train = resolve_path(c.data.train)
    if not os.path.exists(c.data.train):
        raise ConfigError(f"data.train={c.data.train}: file not found")
    if c.model.checkpoint and not os.path.isdir(c.model.checkpoint):
        raise ConfigError(f"model.checkpoint={c.model.checkpoint}: directory not found")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "seq_length"):
        if getattr(c.model, key) < 1:
            raise ConfigError(f"model.{key}={getattr(c.model, key)}: must be >= 1")
    for key in ("max_steps", "micro_batch_size", "log_every"):
        if getattr(c.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(c.train, key)}: must be >= 1")
    if not (c.train.lr > 0 and c.train.lr < float("inf")):
        raise ConfigError(f"train.lr={c.train.lr}: must be a finite number > 0")
    if c.tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel={c.tensor_parallel}: must be >= 1")
    try:
        c.kasa_config()
    except ValueError as e:
        raise ConfigError(f"kasa: {e}") from None
    return c


def load_train_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """The recipe's config from defaults ← YAML file ← ``section.key=value`` overrides, validated."""
    config = load_config(TrainConfig, path, overrides)
    validate(config)
    return config


def load_config(schema, path: Optional[str], overrides: list[str] = ()):
    """An instance of the dataclass ``schema`` from its defaults ← YAML file ← ``section.key=value`` overrides.

    Unknown keys (with the closest valid one) and wrong types are one :class:`ConfigError` line each; every recipe
    (launch/train.py, launch/megatron/train_gpt.py) reads its config through here.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: file not found")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write overrides as section.key=value, e.g. train.lr=3e-4")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value) if value else None
    return _build(schema, raw, "")


def resolve_path(path: Optional[str]) -> Optional[str]:
    """A relative path is taken from the working directory if it exists there, else from the kasa_ds checkout (so
    the shipped configs' ``data/...`` paths work from any directory)."""
    if path is None or path == EMBEDDED_MODEL:
        return path
    path = os.path.expanduser(path)  # configs may name the cache: ~/.cache/kasa_ds/...
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else path


def zero_stage(ds_config: Optional[str]) -> Optional[int]:
    """The ZeRO stage a DeepSpeed JSON sets (0 when it sets none; None: no config or unreadable, checked later)."""
    if ds_config is None or not os.path.isfile(ds_config):
        return None
    try:
        with open(ds_config) as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def validate(c: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    c.model.path, c.data.train, c.data.eval = (resolve_path(p) for p in (c.model.path, c.data.train, c.data.eval))
    c.ds_config = resolve_path(c.ds_config)
    c.kasa.svd_cache = resolve_path(c.kasa.svd_cache)
    need(c.kasa.svd_cache is None or os.path.isdir(c.kasa.svd_cache),
         f"kasa.svd_cache={c.kasa.svd_cache}: directory not found (write it with tools/precompute_svd.py)")

    need(c.model.task in ("seq_cls", "causal_lm"), f"model.task={c.model.task!r}: choose seq_cls or causal_lm")
    need(c.model.dtype in ("float32", "bfloat16", "float16"),
         f"model.dtype={c.model.dtype!r}: choose float32, bfloat16 or float16")
    need(c.model.quantize in (None, "nf4", "fp4"), f"model.quantize={c.model.quantize!r}: choose nf4, fp4 or null")
    need(c.model.quantize is None or c.ds_config is None or zero_stage(c.ds_config) == 3,
         f"model.quantize with --ds_config {c.ds_config} (ZeRO stage {zero_stage(c.ds_config)}): "
         f"{refusal('bnb4', 'deepspeed')}")
    need(c.model.max_length >= 8, f"model.max_length={c.model.max_length}: must be >= 8")
    need(c.model.num_labels >= 2, f"model.num_labels={c.model.num_labels}: must be >= 2")
    if c.model.path != EMBEDDED_MODEL:
        need(os.path.isdir(c.model.path) and os.path.isfile(os.path.join(c.model.path, "config.json")),
             f"model.path={c.model.path}: not a model directory with config.json (models are loaded from local "
             f"paths only; use {EMBEDDED_MODEL!r} for the bundled default)")
    elif c.model.task != "seq_cls":
        need(False, f"model.path={EMBEDDED_MODEL} is an encoder: use model.task=seq_cls, or give a causal LM directory")
    for split in ("train", "eval"):
        spec = getattr(c.data, split)
        need(spec is None or (bool(glob.glob(spec)) if glob.has_magic(spec) else os.path.exists(spec)),
             f"data.{split}={spec}: " + ("no file matches" if spec and glob.has_magic(spec) else
                                         "file or directory not found"))
    need(c.data.format in FORMATS, f"data.format={c.data.format!r}: choose one of {', '.join(FORMATS)}")
    need(c.data.overlong in ("truncate", "drop"), f"data.overlong={c.data.overlong!r}: choose truncate or drop")
    need(not c.data.packing or c.model.task == "causal_lm", "data.packing is for model.task=causal_lm (a "
         "classification example is one sequence with one label)")
    template = c.data.chat_template
    need(template is None or "{%" in template or "{{" in template or os.path.isfile(template),
         f"data.chat_template={template}: neither a file nor a Jinja template string")
    t = c.train
    for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "eval_every", "save_every",
                "log_every", "keep_checkpoints", "max_nonfinite_steps", "sample_max_new_tokens"):
        need(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)}: must be >= 1")
    for section, key, value in _float_keys(c):
        need(math.isfinite(value), f"{section}{key}={value}: must be a finite number")
    need(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    need(t.max_grad_norm > 0, f"train.max_grad_norm={t.max_grad_norm}: must be > 0 (gradients are clipped to this "
         "norm; use a large value such as 1e9 to disable clipping)")
    need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    need(t.sample_prompts >= 0, f"train.sample_prompts={t.sample_prompts}: must be >= 0")
    need(t.sample_prompts == 0 or (c.model.task == "causal_lm" and c.data.eval is not None),
         "train.sample_prompts needs model.task=causal_lm and data.eval (the prompts come from the eval set)")
    need(t.lr_schedule in ("cosine", "linear", "constant"),
         f"train.lr_schedule={t.lr_schedule!r}: choose cosine, linear or constant")
    if c.ds_config is not None:
        need(os.path.isfile(c.ds_config), f"--ds_config {c.ds_config}: file not found")
    need(c.tensor_parallel >= 1, f"tensor_parallel={c.tensor_parallel}: must be >= 1")
    if c.tensor_parallel > 1:
        need(c.ds_config is not None, f"tensor_parallel={c.tensor_parallel} needs the DeepSpeed launcher and "
             "--ds_config (AutoTP runs inside DeepSpeed), e.g. ds_configs/zero2.json")
        need(c.model.quantize is None, f"tensor_parallel with model.quantize: {refusal('bnb4', 'tp')}")
        # measured: AutoTP leaves the seq-cls head of a Llama wrong on TP rank > 0 in training mode
        need(c.model.task == "causal_lm", "tensor_parallel is supported for model.task=causal_lm (AutoTP does not "
             "train sequence-classification heads correctly); use data parallelism (--ds_config only) for seq_cls")
    need(t.optimizer in OPTIMIZERS,
         f"train.optimizer={t.optimizer!r}: choose adamw, adamw8bit or paged_adamw8bit")
    need(t.autocast in (None, "bfloat16", "float16"),
         f"train.autocast={t.autocast!r}: choose bfloat16, float16 or null")
    need(t.max_memory_gib is None or t.max_memory_gib > 0, f"train.max_memory_gib={t.max_memory_gib}: must be > 0")
    if c.ds_config is not None:
        need(t.optimizer == "adamw", f"train.optimizer={t.optimizer} with --ds_config: DeepSpeed runs use AdamW "
             "(its offload/ZeRO configs cover optimizer memory); drop train.optimizer or --ds_config")
        need(t.autocast is None, "train.autocast with --ds_config: set mixed precision in the DeepSpeed config "
             "(\"bf16\": {\"enabled\": true}, e.g. ds_configs/zero3_bf16.json)")
        need(t.max_memory_gib is None, "train.max_memory_gib with --ds_config: plan with tools/plan_memory.py instead")
    need(c.distributed_timeout_minutes >= 1,
         f"distributed_timeout_minutes={c.distributed_timeout_minutes}: must be >= 1")
    need(c.kasa.max_gather_mb >= 1, f"kasa.max_gather_mb={c.kasa.max_gather_mb}: must be >= 1")
    need(c.ds_config is None or c.kasa.init_seed is not None,
         "kasa.init_seed is null: with DeepSpeed every rank must initialize identical adapters; set kasa.init_seed")
    need(c.resume in ("auto", "none") or os.path.isdir(c.resume),
         f"resume={c.resume!r}: use auto, none or an existing checkpoint directory")
    try:
        c.kasa_config()
    except ValueError as e:
        raise ConfigError(f"kasa: {e}") from None


def _float_keys(config, where: str = ""):
    """(section prefix, key, value) of every float-valued key, sections included."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{where}{f.name}.")
        elif isinstance(value, float):
            yield where, f.name, value


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        allowed = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key}={value!r}: expected {allowed}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}")


def dump(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
