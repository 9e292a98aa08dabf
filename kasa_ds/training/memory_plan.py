"""Per-GPU memory plan of a KaSA / QKaSA run, from a model's config.json alone (no weights).

Parameter counts are exact (the model is built on the meta device). Bytes per parameter follow from the run:

- base weights: 2 B (bf16/fp16) or, for QKaSA, 4-bit NF4/FP4 linears (0.5 B + block constants: 4 B per 64 weights,
  or with double quantization 1 B per 64 + 4 B per 64·256) and 16-bit embeddings/norms/head; low_rank_correction adds
  the frozen rank-r tail factors (16-bit). TP splits the decoder linears (the Megatron road also the embedding and
  the head: vocabulary-parallel); pipeline stages split the layers, the first stage holding the embedding and the last
  the head (the larger of the two is counted); ZeRO-3 splits everything over DP except,
  for QKaSA, the block constants and correction factors, which every GPU keeps (kasa_ds.training.partitioned_4bit),
  and adds one gathered packed linear with its dequantized 16-bit copy (the largest target) while it computes.
- adapters without DeepSpeed: float32 parameters, gradients and AdamW states (4 + 4 + 8 B; 8-bit AdamW: 2 B states).
  Under DeepSpeed bf16: 2 B parameters + 2 B gradients + float32 master 4 B + AdamW 8 B; ZeRO-1 splits master +
  states over DP, ZeRO-2 also gradients, ZeRO-3 also parameters; optimizer offload moves master + states to CPU.
- activations of a Llama-style decoder with SDPA/flash attention (no s² scores kept), per token and layer:
  2-byte tensors saved by autograd — norm inputs in float32 (2 × 4h), norm outputs (2 × 2h), rotated q and k, v
  (k and v repeated to every head for grouped-query attention), the attention output and its contiguous copy for
  o_proj (5 × 2h), SwiGLU's gate, up, silu(gate) and their product (4 × 2·ffn) — plus each adapter's dropped-out
  input and its 1-byte mask ((2 + 1) B × in_features when dropout > 0); TP splits the attention and MLP terms.
  A mixture-of-experts layer's MLP terms are those of the top-k experts each token is routed to (and of a shared
  expert), plus the routed rows of h gathered per expert (2 B) with the experts' float32 outputs (4 B) per row, and
  the router's float32 softmax over the experts.
  With pipeline stages (the Megatron road's 1F1B schedule) stage s keeps its own layers' activations of up to P − s
  micro-batches: the first stage P of them (as many layers' worth as one micro-batch of the whole model), the last
  one micro-batch's and the loss's; the larger of the two is counted.
  With sequence parallelism (the Megatron road, TP > 1) the terms outside the TP regions (the norms' inputs and
  outputs, a checkpointed layer's input) are split over the TP ranks too.
  With gradient checkpointing each layer keeps only its input (2h), and the peak is the larger of the loss's
  tensors and one layer recomputed in backward together with the gradients it is working on (h + 2·ffn). The loss
  adds float32 logits and their gradient (2 × 4·V per token) beside the bf16 logits (2·V).
  Checked against CPU peaks measured with torch.profiler's memory timeline (tools/validate_memory_plan.py, float32,
  compute_bytes=4): within 15%, see README.
- a fixed 1.0 GiB per GPU for the CUDA context, NCCL buffers and allocator slack.

Not modelled: fragmentation beyond that slack, DeepSpeed's prefetch/bucket buffers (bounded by the config's bucket
sizes), the pipeline's activation messages, and GPU kernels' workspaces; GPU peaks have not been measured here (no
GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import KaSAConfig
from ..core.experts import experts_layout, targeted_projections
from ..registry import refusal
from .config import TrainConfig
from .models import model_dir

GiB = 1 << 30
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # AutoTP / megatron split their rows


@dataclass
class RunShape:
    method: str = "kasa"  # kasa (16-bit base) | qkasa (4-bit base)
    r: int = 16
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seq_len: int = 4096
    micro_batch: int = 1
    checkpointing: bool = True
    optimizer: str = "adamw"  # adamw | paged_adamw (32-bit states) | adamw8bit | paged_adamw8bit
    deepspeed: bool = True
    zero: int = 3
    offload: str = "none"  # none | optimizer | all
    tp: int = 1
    pp: int = 1  # pipeline stages (the Megatron road)
    megatron: bool = False  # the Megatron road: no DeepSpeed; TP splits the embedding and head too
    sequence_parallel: bool = False  # the Megatron road at TP > 1: tokens outside the TP regions split over TP
    gpus: int = 8
    quant_mode: str = "low_rank_correction"
    double_quant: bool = True
    dropout: float = 0.05
    adapter_bytes: int = 4  # adapters without DeepSpeed: float32 (kasa_ds) or 2 (bf16, as QLoRA's scripts cast them)
    compute_bytes: int = 2  # bytes of the base weights and activations: 2 (bf16/fp16) or 4 (float32)

    def __post_init__(self) -> None:
        for key in ("r", "seq_len", "micro_batch", "tp", "pp", "gpus"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ValueError(f"{key}={getattr(self, key)!r}: must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.megatron and self.method != "kasa":
            raise ValueError("the Megatron road trains 16-bit bases: QKaSA (--method qkasa) runs on the default "
                             "backend, without --megatron")
        if self.megatron and self.deepspeed:
            raise ValueError("the Megatron road runs megatron-core's parallelism, not DeepSpeed (deepspeed=False)")
        if self.pp > 1 and not self.megatron:
            raise ValueError(f"pp={self.pp}: pipeline stages are the Megatron road's: add --megatron")
        if self.sequence_parallel and not (self.megatron and self.tp > 1):
            raise ValueError("sequence parallelism is the Megatron road's, at TP > 1: add --megatron and --tp")

    @property
    def model_parallel(self) -> int:
        """GPUs holding one model replica: TP × PP."""
        return self.tp * self.pp


@dataclass
class ModelShape:
    total: int
    linear: int  # parameters in decoder linears (quantizable, TP-split)
    hidden: int
    ffn: int  # MLP width one token's activations see per layer, on average: a routed layer's is top-k × expert's
    kv_dim: int
    layers: int
    vocab: int
    targets: list = field(default_factory=list)  # (name, m, n) per adapted decoder linear
    expert_targets: list = field(default_factory=list)  # (name, m, n, experts) per adapted experts projection
    adapter_inputs: int = 0  # Σ over layers of the adapter input widths one token passes through (dropout's copies)
    routed_rows: int = 0  # Σ over routed (MoE) layers of the experts each token goes to (top-k)
    router_logits: int = 0  # Σ over routed layers of the experts each token is scored against


def model_shape(config_json_dir: str, target_names) -> ModelShape:
    """Exact counts from a HF config.json (meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_json_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return shape_of(model, cfg, target_names)


def shape_of(model, cfg, target_names) -> ModelShape:
    """Counts of a model already built (on the meta device, say) with its HF config. A fused experts module
    (kasa_ds.core.experts) contributes one expert target per selected projection; its weights stay 16-bit (not
    quantizable linears). Its layer's activations are routed: each token passes top-k experts (``num_experts_per_tok``),
    so its MLP width is top-k × the expert's, beside a shared expert's."""
    linear, targets, experts, inputs, mlp_width, routed, router = 0, [], [], 0, 0, 0, 0
    selects = KaSAConfig(r=1, target_modules=list(target_names)).is_target
    top_k = getattr(cfg, "num_experts_per_tok", 1) or 1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            linear += module.weight.numel()
            mlp_width += module.out_features if name.endswith("up_proj") else 0  # a dense MLP or a shared expert
            if name.rsplit(".", 1)[-1] in target_names:
                targets.append((name, module.out_features, module.in_features))
                inputs += module.in_features
        elif (layout := experts_layout(module)) is not None:
            chosen = targeted_projections(name, layout, selects)
            experts += [(f"{name}.{p}", *layout.shape(p), layout.num_experts) for p in chosen]
            # gate and up share one dropped-out input per routed row, down has its own
            inputs += top_k * (layout.hidden * any(p != "down_proj" for p in chosen)
                               + layout.intermediate * ("down_proj" in chosen))
            mlp_width += top_k * layout.intermediate
            routed, router = routed + top_k, router + layout.num_experts
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    layers = cfg.num_hidden_layers
    return ModelShape(total=sum(p.numel() for p in model.parameters()), linear=linear, hidden=cfg.hidden_size,
                      ffn=round(mlp_width / layers) if mlp_width else cfg.intermediate_size,
                      kv_dim=cfg.hidden_size // heads * kv_heads, layers=layers, vocab=cfg.vocab_size,
                      targets=targets, expert_targets=experts, adapter_inputs=inputs, routed_rows=routed,
                      router_logits=router)


def describe_targets(shape: ModelShape) -> str:
    """"N adapted layers[ and M expert matrices (P experts projections of E experts)]"."""
    text = f"{len(shape.targets)} adapted layers"
    if shape.expert_targets:
        counts = sorted({c for *_, c in shape.expert_targets})
        text += (f" and {sum(c for *_, c in shape.expert_targets):,} expert matrices ({len(shape.expert_targets)} "
                 f"experts projections of {'/'.join(map(str, counts))} experts)")
    return text


def plan(shape: ModelShape, run: RunShape, gpu_gib: Optional[float] = None) -> dict:
    """Bytes per GPU by category, their total and (given ``gpu_gib``) whether it fits."""
    if run.gpus % run.model_parallel:
        raise ValueError(f"tp={run.tp} × pp={run.pp} does not divide gpus={run.gpus}")
    if run.method == "qkasa" and (run.tp > 1 or (run.deepspeed and run.zero != 3)):
        raise ValueError(refusal("bnb4", "tp" if run.tp > 1 else "deepspeed"))
    if shape.layers % run.pp:
        raise ValueError(f"pp={run.pp} does not divide the {shape.layers} layers")
    dp = run.gpus // run.model_parallel
    base, working = base_weight_bytes(shape, run, dp)
    adapter = 0.0  # adapter parameters on this GPU: the sharded factor / tp, this stage's layers' (1/pp)
    for name, m, n in shape.targets:
        col = name.rsplit(".", 1)[-1] in COLUMN_PARALLEL
        adapter += run.r * (m / run.tp if col else m) + run.r * (n if col else n / run.tp) + run.r
    adapter += sum(count * (run.r * (m + n) + run.r) for _, m, n, count in shape.expert_targets)  # never TP-split
    adapter /= run.pp
    params, grads, optimizer = adapter_state_bytes(adapter, run, dp)
    out = {"base_weights": base, "adapter_params": params, "adapter_grads": grads, "optimizer_states": optimizer,
           "activations": activation_bytes(shape, run), "cuda_context_and_slack": 1.0 * GiB}
    if working:
        out["gathered_4bit_layer"] = working
    total = sum(out.values())
    result = {"per_gpu_bytes": out, "total_bytes": total, "data_parallel": dp, "adapter_params_per_gpu": adapter}
    if gpu_gib is not None:
        result["gpu_gib"] = gpu_gib
        result["fits"] = total <= gpu_gib * GiB
    return result


def base_weight_bytes(shape: ModelShape, run: RunShape, dp: int) -> tuple[float, float]:
    """(frozen base bytes held per GPU, bytes of one gathered 4-bit layer while it computes under ZeRO-3)."""
    cb, other = run.compute_bytes, shape.total - shape.linear
    zero3 = run.deepspeed and run.zero == 3
    replicated = working = 0.0
    if run.method == "qkasa":
        partitionable = shape.linear * 0.5 + other * cb  # packed 4-bit linears; 16-bit embeddings, norms, head
        # the per-block scales stay on every GPU (bitsandbytes dequantizes with them), as do the correction factors
        replicated = shape.linear * (1 / 64 + 4 / (64 * 256) if run.double_quant else 4 / 64)
        if run.quant_mode == "low_rank_correction":
            replicated += sum(run.r * (m + n) * 2 for _, m, n in shape.targets)
        if zero3:  # one gathered packed linear and its dequantized 16-bit copy while it computes
            largest = max((m * n for _, m, n in shape.targets), default=0)
            working = largest * (0.5 + cb)
    elif run.megatron:  # vocabulary-parallel embedding and head; with stages, the one holding the larger of them
        partitionable = shape.linear * cb / run.model_parallel
        partitionable += (other if run.pp == 1 else shape.vocab * shape.hidden) * cb / run.tp
    else:
        partitionable = shape.linear * cb / run.tp + other * cb
    if zero3:
        partitionable /= dp
    if run.offload == "all":
        partitionable = 0.0
    return partitionable + replicated, working


def adapter_state_bytes(adapter: float, run: RunShape, dp: int) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer-state) bytes per GPU for ``adapter`` parameters on it."""
    state_bytes = 2 if run.optimizer in ("adamw8bit", "paged_adamw8bit") else 8
    if run.deepspeed:
        split = {0: (1, 1, 1), 1: (1, 1, dp), 2: (1, dp, dp), 3: (dp, dp, dp)}[run.zero]
        optimizer = 0.0 if run.offload in ("optimizer", "all") else adapter * (4 + state_bytes) / split[2]
        return adapter * 2 / split[0], adapter * 2 / split[1], optimizer
    ab = run.adapter_bytes
    return adapter * ab, adapter * ab, adapter * state_bytes


def activation_bytes(shape: ModelShape, run: RunShape) -> float:
    """Activation bytes (GQA's k, v counted as h: repeated) of one micro-batch, or with pipeline stages of the stage
    that holds the most: the first (P micro-batches of its layers in flight) or the last (one, and the loss)."""
    h, i, V, tp, cb = shape.hidden, shape.ffn, shape.vocab, run.tp, run.compute_bytes
    L, in_flight = shape.layers // run.pp, run.pp
    tokens = run.seq_len * run.micro_batch
    split_terms = cb * 5 * h / tp + cb * 4 * i / tp
    sp = tp if run.sequence_parallel else 1  # the tokens outside the TP regions are split too
    per_layer = 2 * (4 * h + cb * h) / sp + split_terms
    # routed layers: each token's top-k rows of h gathered (cb) and the experts' float32 outputs before the
    # weighted sum (4), and the router's float32 softmax over the experts (averaged over the layers)
    per_layer += (shape.routed_rows * h * (cb + 4) + shape.router_logits * 4) / shape.layers
    if run.dropout > 0:  # each adapter keeps its dropped-out input and the 1-byte mask (in_features per token)
        per_layer += (cb + 1) * shape.adapter_inputs / shape.layers
    logits = tokens * V * (cb + 2 * 4) / (tp if run.tp > 1 else 1)
    if run.checkpointing:  # layer inputs, then the larger of: the loss's tensors, one layer recomputed in backward
        backward_grads = cb * (h + 2 * i / tp)  # with it: the incoming gradient and two MLP-width gradients
        kept, recomputed = tokens * cb * h * L / sp, tokens * (per_layer + backward_grads)
        last = kept + max(logits, recomputed)
        return last if run.pp == 1 else max(in_flight * kept + recomputed, last)
    kept = tokens * per_layer * L
    return kept + logits if run.pp == 1 else max(in_flight * kept, kept + logits)


def format_plan(result: dict) -> str:
    lines = [f"  {k:<24} {v / GiB:8.2f} GiB" for k, v in result["per_gpu_bytes"].items()]
    lines.append(f"  {'total per GPU':<24} {result['total_bytes'] / GiB:8.2f} GiB")
    if "fits" in result:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"  → {verdict} a {result['gpu_gib']:g} GiB GPU")
    return "\n".join(lines)


def recipe_estimate(cfg: TrainConfig) -> Optional[dict]:
    """The per-GPU plan of a recipe run without DeepSpeed (one process, or one rank of the Megatron road's TP × PP
    model replica: the same on every data-parallel replica), or None where the planner does not model it (encoders /
    classification, a regex target_modules)."""
    if cfg.model.task != "causal_lm" or isinstance(cfg.kasa.target_modules, str):
        return None
    names = tuple(cfg.kasa.target_modules)
    if cfg.backend == "megatron":
        run = recipe_run(cfg, names, deepspeed=False, megatron=True, tp=cfg.tensor_parallel,
                         pp=cfg.pipeline_parallel, gpus=cfg.tensor_parallel * cfg.pipeline_parallel,
                         sequence_parallel=cfg.sequence_parallel)
    else:
        run = recipe_run(cfg, names, deepspeed=False, zero=0, gpus=1)
    return plan(model_shape(model_dir(cfg.model), names), run, cfg.train.max_memory_gib)


def offload_of(ds_config: Optional[dict]) -> str:
    """The planner's offload setting for a DeepSpeed config: all (parameters offloaded), optimizer, or none."""
    zero = (ds_config or {}).get("zero_optimization", {})
    if zero.get("offload_param", {}).get("device", "none") != "none":
        return "all"
    return "optimizer" if zero.get("offload_optimizer", {}).get("device", "none") != "none" else "none"


def recipe_run(cfg: TrainConfig, target_names, **placement) -> RunShape:
    """The RunShape of a recipe config; ``placement``: deepspeed, zero, gpus, tp."""
    return RunShape(method="qkasa" if cfg.model.quantize else "kasa", r=cfg.kasa.r, targets=tuple(target_names),
                    seq_len=cfg.model.max_length, micro_batch=cfg.train.micro_batch_size,
                    checkpointing=cfg.model.gradient_checkpointing, optimizer=cfg.train.optimizer,
                    quant_mode=cfg.kasa.quant_mode, double_quant=cfg.model.double_quant, dropout=cfg.kasa.dropout,
                    **placement)


def check_recipe_plan(cfg: TrainConfig) -> str:
    """Before anything loads: the planner's estimate of this run against train.max_memory_gib. Returns the line to
    print; raises ValueError naming the knobs when it does not fit."""
    estimate = recipe_estimate(cfg)
    if estimate is None:
        return "max_memory_gib: no planner estimate for this model/task; the limit is enforced while training"
    if not estimate["fits"]:
        knobs = ("raise tensor_parallel or pipeline_parallel" if cfg.backend == "megatron"
                 else "set model.quantize: nf4 or train.optimizer: paged_adamw8bit")
        raise ValueError(f"train.max_memory_gib={cfg.train.max_memory_gib:g}: the planner estimates more "
                         f"(tools/plan_memory.py):\n{format_plan(estimate)}\nlower train.micro_batch_size or "
                         f"model.max_length, set model.gradient_checkpointing: true, or {knobs}")
    return (f"memory plan: {estimate['total_bytes'] / (1 << 30):.2f} GiB estimated, limit "
            f"{cfg.train.max_memory_gib:g} GiB")
