"""The training recipe's schema: its sections, their defaults and their checks, run before any model is loaded.

Reading (YAML, overrides, coercion, the ``error:`` line) is :mod:`kasa_ds.training.config_loader`'s; this module
says what the recipe accepts. The adapter section is derived from :class:`kasa_ds.KaSAConfig`: a field added there
is a config key here, a trajectory setting of checkpoints and a key of ``kasa_config()`` with no other edit. The
defaults are generic; the embedded demo's settings are in ``configs/default.yaml`` (what ``launch/train.py`` runs
with no ``--config``), so nothing here points into a checkout.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import jinja2

from ..config import KaSAConfig
from ..registry import refusal
from .chat import FORMATS
from .config_loader import ConfigError, dump, load_config, need, resolve_path  # noqa: F401 (dump: re-exported)

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")  # kasa_ds.training.precision.build_optimizer
#: PEFT's rule for a sequence-classification model: its head is trained in full unless modules_to_save says
SEQ_CLS_HEADS = ("classifier", "score")
#: KaSAConfig's fields, in order: the adapter section's keys
ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(KaSAConfig))


def adapter_section(name: str, defaults: dict[str, Any], extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A config section holding every :class:`KaSAConfig` field (its type; its default unless ``defaults`` names
    one) followed by recipe-only ``extra`` fields (name, type, default)."""
    hints = get_type_hints(KaSAConfig)
    specs = []
    for f in dataclasses.fields(KaSAConfig):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        specs.append((f.name, _yaml_type(hints[f.name]), _field(default)))
    specs += [(key, tp, _field(default)) for key, tp, default in extra]
    section = dataclasses.make_dataclass(name, specs)
    section.__module__ = __name__  # pickling and reprs find it here
    return section


def _yaml_type(tp):
    """A KaSAConfig type as YAML gives it: sequences are lists."""
    if get_origin(tp) is Union:
        return Union[tuple(_yaml_type(a) for a in get_args(tp))]
    return list if get_origin(tp) in (list, tuple, collections.abc.Sequence) else tp


def _field(default):
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): list(d))
    return field(default=default)


def kasa_config_of(section) -> KaSAConfig:
    """The KaSAConfig an adapter section describes (a bad value: ValueError naming the field)."""
    return KaSAConfig(**{key: getattr(section, key) for key in ADAPTER_FIELDS})


@dataclass
class ModelSection:
    path: Optional[str] = None  # required: a HF model directory, or the embedded default (embedded:all-MiniLM-L6-v2)
    task: str = "causal_lm"  # causal_lm | seq_cls
    num_labels: int = 2  # seq_cls only
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the frozen base
    max_length: int = 64
    gradient_checkpointing: bool = False
    quantize: Optional[str] = None  # nf4 | fp4: QKaSA on a bitsandbytes 4-bit base (every linear but the head)
    double_quant: bool = True


@dataclass
class DataSection:
    # a file (.jsonl .json .csv .parquet .arrow), a glob of shards, or a datasets.save_to_disk directory
    train: Optional[str] = None  # required
    eval: Optional[str] = None
    text_field: str = "text"  # seq_cls
    label_field: str = "label"  # seq_cls
    format: str = "auto"  # causal_lm: auto | alpaca | messages | sharegpt | prompt_completion | text
    chat_template: Optional[str] = None  # Jinja file or string; default: the tokenizer's own
    train_on_prompt: bool = False  # causal_lm: loss on every token, not only the responses / assistant turns
    overlong: str = "truncate"  # causal_lm examples longer than model.max_length: truncate | drop (counted)
    packing: bool = False  # causal_lm: bin-pack training examples into model.max_length rows (no cross-attention)
    max_eval_examples: Optional[int] = None
    cache_dir: Optional[str] = None  # tokenized examples; default: <data dir>/.kasa_ds_cache (else ~/.cache/kasa_ds)


#: the adapter section: every KaSAConfig field (init_seed 0: every rank must draw the same adapter init) plus the
#: recipe's own truncation settings
KaSASection = adapter_section("KaSASection", {"init_seed": 0}, [
    ("max_gather_mb", int, 2048),  # distributed truncation: cap on weight bytes one rank gathers at once
    ("svd_cache", Optional[str], None),  # directory written by tools/precompute_svd.py: skip the SVDs
])


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
    output_dir: str = "outputs/run"
    ds_config: Optional[str] = None  # DeepSpeed JSON; set by --ds_config
    tensor_parallel: int = 1  # > 1: TP of this size (AutoTP under DeepSpeed, or megatron-core), adapters sharded too
    backend: str = "auto"  # auto (DeepSpeed with --ds_config, else one process) | megatron (megatron-core TP)
    pipeline_parallel: int = 1  # backend: megatron: pipeline stages (layers split evenly)
    # backend: megatron, tensor_parallel > 1, CUDA: megatron's sequence parallelism (the activations outside the TP
    # regions, and each recomputed layer's input, split over the TP ranks' tokens)
    sequence_parallel: bool = False
    distributed_timeout_minutes: int = 30  # a collective waiting longer than this fails the run (no silent hang)
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | none | <checkpoint dir>
    trust_checkpoint: bool = False  # resume from a checkpoint holding pickles that no run of this user sealed
    allow_other_base: bool = False  # resume although model.path now holds other weights (changed on purpose)
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def kasa_config(self) -> KaSAConfig:
        """The adapter's KaSAConfig; a classification model without modules_to_save trains its head (PEFT's rule)."""
        config = kasa_config_of(self.kasa)
        if self.model.task == "seq_cls" and not config.modules_to_save:
            config = dataclasses.replace(config, modules_to_save=SEQ_CLS_HEADS)
        return config


def load_train_config(path: Optional[str], overrides: Iterable[str] = (),
                      base_dirs: Iterable[os.PathLike | str] = ()) -> TrainConfig:
    """The recipe's config from defaults ← YAML file ← ``section.key=value`` overrides, validated. Relative paths
    are taken from the working directory, else from ``base_dirs`` (launch/train.py passes its checkout)."""
    config = load_config(TrainConfig, path, overrides)
    validate(config, tuple(base_dirs))
    return config


def validate(c: TrainConfig, base_dirs: tuple = ()) -> None:
    """Every check, section by section; the first failure is one ConfigError line."""
    resolve_paths(c, base_dirs)
    for check in (check_model, check_data, check_kasa, check_train, check_parallel):
        check(c)


def resolve_paths(c: TrainConfig, base_dirs: tuple) -> None:
    c.model.path, c.data.train, c.data.eval, c.ds_config, c.kasa.svd_cache = (
        resolve_path(p, base_dirs) for p in (c.model.path, c.data.train, c.data.eval, c.ds_config, c.kasa.svd_cache))


def zero_stage(ds_config: Optional[str]) -> Optional[int]:
    """The ZeRO stage a DeepSpeed JSON sets (0 when it sets none; None: no config or unreadable, checked later)."""
    if ds_config is None or not os.path.isfile(ds_config):
        return None
    try:
        with open(ds_config) as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def check_model(c: TrainConfig) -> None:
    m = c.model
    need(m.path is not None, f"model.path is not set: give a Hugging Face model directory (or {EMBEDDED_MODEL!r}, "
         "the bundled encoder; configs/default.yaml runs it)")
    need(m.task in ("seq_cls", "causal_lm"), f"model.task={m.task!r}: choose seq_cls or causal_lm")
    need(m.dtype in ("float32", "bfloat16", "float16"), f"model.dtype={m.dtype!r}: choose float32, bfloat16 or float16")
    need(m.quantize in (None, "nf4", "fp4"), f"model.quantize={m.quantize!r}: choose nf4, fp4 or null")
    need(m.quantize is None or c.ds_config is None or zero_stage(c.ds_config) == 3,
         f"model.quantize with --ds_config {c.ds_config} (ZeRO stage {zero_stage(c.ds_config)}): "
         f"{refusal('bnb4', 'deepspeed')}")
    need(m.max_length >= 8, f"model.max_length={m.max_length}: must be >= 8")
    need(m.num_labels >= 2, f"model.num_labels={m.num_labels}: must be >= 2")
    if m.path != EMBEDDED_MODEL:
        need(os.path.isdir(m.path) and os.path.isfile(os.path.join(m.path, "config.json")),
             f"model.path={m.path}: not a model directory with config.json (models are loaded from local "
             f"paths only; use {EMBEDDED_MODEL!r} for the bundled default)")
    else:
        need(m.task == "seq_cls", f"model.path={EMBEDDED_MODEL} is an encoder: use model.task=seq_cls, or give a "
             "causal LM directory")


def check_data(c: TrainConfig) -> None:
    d = c.data
    need(d.train is not None, "data.train is not set: give a data file (.jsonl .json .csv .parquet .arrow), a glob "
         "of shards or a datasets.save_to_disk directory")
    for split in ("train", "eval"):
        spec = getattr(d, split)
        need(spec is None or (bool(glob.glob(spec)) if glob.has_magic(spec) else os.path.exists(spec)),
             f"data.{split}={spec}: " + ("no file matches" if spec and glob.has_magic(spec) else
                                         "file or directory not found"))
    need(d.format in FORMATS, f"data.format={d.format!r}: choose one of {', '.join(FORMATS)}")
    need(d.overlong in ("truncate", "drop"), f"data.overlong={d.overlong!r}: choose truncate or drop")
    need(not d.packing or c.model.task == "causal_lm", "data.packing is for model.task=causal_lm (a "
         "classification example is one sequence with one label)")
    template = d.chat_template
    need(template is None or "{%" in template or "{{" in template or os.path.isfile(template),
         f"data.chat_template={template}: neither a file nor a Jinja template string")
    if template is not None:
        check_template(template)


def check_template(template: str) -> None:
    """A chat template (file or string) must be Jinja that compiles: a syntax error is named here, with its file and
    line, not in the middle of tokenization."""
    is_file = "{%" not in template and "{{" not in template
    try:
        text = open(template).read() if is_file else template
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.chat_template={template}: cannot be read ({e})") from None
    except jinja2.TemplateSyntaxError as e:
        where = f"{template}, line {e.lineno}" if is_file else f"line {e.lineno}"
        raise ConfigError(f"data.chat_template ({where}): not a valid Jinja template ({e.message})") from None


def check_kasa(c: TrainConfig) -> None:
    k = c.kasa
    need(k.svd_cache is None or os.path.isdir(k.svd_cache),
         f"kasa.svd_cache={k.svd_cache}: directory not found (write it with tools/precompute_svd.py)")
    need(k.max_gather_mb >= 1, f"kasa.max_gather_mb={k.max_gather_mb}: must be >= 1")
    need(c.ds_config is None or k.init_seed is not None,
         "kasa.init_seed is null: with DeepSpeed every rank must initialize identical adapters; set kasa.init_seed")
    for section, key, value in _float_keys(c):  # every float key of every section, here once
        need(math.isfinite(value), f"{section}{key}={value}: must be a finite number")
    try:
        c.kasa_config()
    except ValueError as e:
        raise ConfigError(f"kasa: {e}") from None


def check_train(c: TrainConfig) -> None:
    t = c.train
    for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "eval_every", "save_every",
                "log_every", "keep_checkpoints", "max_nonfinite_steps", "sample_max_new_tokens"):
        need(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)}: must be >= 1")
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
    need(t.optimizer in OPTIMIZERS, f"train.optimizer={t.optimizer!r}: choose adamw, adamw8bit or paged_adamw8bit")
    need(t.autocast in (None, "bfloat16", "float16"), f"train.autocast={t.autocast!r}: choose bfloat16, float16 or null")
    need(t.max_memory_gib is None or t.max_memory_gib > 0, f"train.max_memory_gib={t.max_memory_gib}: must be > 0")
    need(c.resume in ("auto", "none") or os.path.isdir(c.resume),
         f"resume={c.resume!r}: use auto, none or an existing checkpoint directory")


def check_megatron(c: TrainConfig) -> None:
    """backend: megatron runs HF causal LMs with megatron-core TP; what it does not do yet is refused by name."""
    t, m = c.train, c.model
    need(c.ds_config is None, "backend: megatron runs megatron-core's own parallelism: drop --ds_config")
    need(m.task == "causal_lm", "backend: megatron trains causal LMs (model.task=causal_lm)")
    need(m.quantize is None, "backend: megatron with model.quantize: 4-bit bases (QKaSA) run on the default backend")
    need(t.optimizer == "adamw", f"train.optimizer={t.optimizer} with backend: megatron: use adamw")
    need(t.autocast is None, "train.autocast with backend: megatron: set model.dtype (bfloat16) instead")
    need(not c.kasa.modules_to_save, "kasa.modules_to_save with backend: megatron: its modules are TP-sharded and "
         "are not saved whole yet; drop kasa.modules_to_save")
    need(not c.sequence_parallel or c.tensor_parallel > 1, "sequence_parallel: true splits the tokens over the "
         "tensor-parallel ranks: set tensor_parallel > 1, or sequence_parallel: false")


def check_parallel(c: TrainConfig) -> None:
    """DeepSpeed, tensor parallelism and what they exclude."""
    t = c.train
    need(c.distributed_timeout_minutes >= 1,
         f"distributed_timeout_minutes={c.distributed_timeout_minutes}: must be >= 1")
    need(c.tensor_parallel >= 1, f"tensor_parallel={c.tensor_parallel}: must be >= 1")
    need(c.backend in ("auto", "megatron"), f"backend={c.backend!r}: choose auto or megatron")
    need(c.pipeline_parallel >= 1, f"pipeline_parallel={c.pipeline_parallel}: must be >= 1")
    need(c.pipeline_parallel == 1 or c.backend == "megatron",
         f"pipeline_parallel={c.pipeline_parallel} needs backend: megatron")
    need(not c.sequence_parallel or c.backend == "megatron", "sequence_parallel: true needs backend: megatron")
    if c.backend == "megatron":
        check_megatron(c)
        return
    if c.tensor_parallel > 1:
        need(c.ds_config is not None, f"tensor_parallel={c.tensor_parallel} needs the DeepSpeed launcher and "
             "--ds_config (AutoTP runs inside DeepSpeed), e.g. ds_configs/zero2.json")
        need(c.model.quantize is None, f"tensor_parallel with model.quantize: {refusal('bnb4', 'tp')}")
        # measured: AutoTP leaves the seq-cls head of a Llama wrong on TP rank > 0 in training mode
        need(c.model.task == "causal_lm", "tensor_parallel is supported for model.task=causal_lm (AutoTP does not "
             "train sequence-classification heads correctly); use data parallelism (--ds_config only) for seq_cls")
    if c.ds_config is None:
        return
    need(os.path.isfile(c.ds_config), f"--ds_config {c.ds_config}: file not found")
    try:
        with open(c.ds_config) as f:
            need(isinstance(json.load(f), dict), f"--ds_config {c.ds_config}: expected a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--ds_config {c.ds_config}: not valid JSON ({e})") from None
    need(t.optimizer == "adamw", f"train.optimizer={t.optimizer} with --ds_config: DeepSpeed runs use AdamW "
         "(its offload/ZeRO configs cover optimizer memory); drop train.optimizer or --ds_config")
    need(t.autocast is None, "train.autocast with --ds_config: set mixed precision in the DeepSpeed config "
         "(\"bf16\": {\"enabled\": true}, e.g. ds_configs/zero3_bf16.json)")
    need(t.max_memory_gib is None, "train.max_memory_gib with --ds_config: plan with tools/plan_memory.py instead")


def _float_keys(config, where: str = ""):
    """(section prefix, key, value) of every float-valued key, sections included."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{where}{f.name}.")
        elif isinstance(value, float):
            yield where, f.name, value
