"""Load a 4-bit base partitioned by ZeRO-3, one module at a time: no rank ever holds the whole model, in 4 or 16 bits.

    skeleton   the model is built from config.json with its parameters on the meta device (no memory; buffers such
               as rotary frequencies are real), every quantized linear swapped for a meta Linear4bit;
    stream     module by module, each rank reads that module's tensors from the safetensors files (only those),
               quantizes a linear's weight to NF4/FP4 with its packed bytes stored as ``quant_storage`` elements
               (the engine's parameter dtype: ZeRO-3 partitions them like any weight and its casts leave them be),
               and hands the module to ``deepspeed.zero.Init(module=...)``, which keeps this rank's 1/N slice;
    hold       each rank then holds 1/N of every weight (packed 4-bit for the linears) plus the small quantization
               state of every 4-bit weight (absmax per 64 values, replicated: bitsandbytes needs it to dequantize),
               and, while a module loads, that one module whole.

Every rank reads and quantizes every module the same way (bitsandbytes quantization is deterministic), and ZeRO-3
broadcasts rank 0's copy as it partitions, so all ranks agree. ``HeldBytes`` records what a rank holds as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..formats.bnb4 import is_4bit, linear_4bit, quantized
from ..io.hf_checkpoint import list_tensors, read_tensor


@dataclass
class HeldBytes:
    """Base-weight bytes one rank holds while loading: partitions kept, plus the module loading now (peak)."""
    peak: int = 0
    largest_module: int = 0  # the most bytes one module took while whole (16-bit read + its 4-bit form)
    quant_state: int = 0  # replicated quantization state of every 4-bit weight
    events: list = field(default_factory=list)

    def note(self, model: nn.Module, loading: int) -> None:
        held = sum(local_bytes(p) for p in unique_parameters(model)) + self.quant_state
        self.largest_module = max(self.largest_module, loading)
        self.peak = max(self.peak, held + loading)


def local_bytes(p: torch.Tensor) -> int:
    """Bytes of a parameter this rank holds: its ZeRO-3 partition, or the tensor itself (0 on the meta device)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel() * p.ds_tensor.element_size()
    return 0 if p.device.type == "meta" else p.numel() * p.element_size()


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def quant_state_bytes(weight: torch.Tensor) -> int:
    """The per-block scales of a 4-bit weight (absmax, and its own scales under double quantization): 1/64 of the
    values as uint8 (+ float32 per 256 blocks) with double quantization, float32 per 64 values without. The 16- and
    256-entry code tables are shared constants, not counted."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return 0
    tensors = [state.absmax, state.offset] + ([state.state2.absmax] if state.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def load_partitioned_4bit(model_dir: str, build: Callable[[], nn.Module], ds_config: dict, quant_type: str,
                          double_quant: bool, compute_dtype: torch.dtype, quant_storage: torch.dtype,
                          dtype: torch.dtype, device: torch.device, keep: Callable[[str], bool] = lambda n: False,
                          held: Optional[HeldBytes] = None) -> nn.Module:
    """The model ``build()`` makes (called with parameters on the meta device), every linear but heads and
    ``keep(name)`` 4-bit, every parameter ZeRO-3 partitioned under ``ds_config``. Collective: every rank calls it."""
    import deepspeed
    from accelerate import init_empty_weights

    rng = torch.get_rng_state()
    with init_empty_weights(include_buffers=False):
        model = build()
    torch.set_rng_state(rng)  # parameters missing from the checkpoint (a new head) draw as from_pretrained's do
    for name, module in list(model.named_modules()):
        if quantized(name, module, keep):
            model.set_submodule(name, _meta_4bit(module, quant_type, double_quant, compute_dtype, quant_storage))
    tensors = list_tensors(model_dir)
    held = held if held is not None else HeldBytes()
    loaded: dict[int, nn.Parameter] = {}  # id of a meta parameter → its loaded, partitioned replacement (tied)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        loading, missing = 0, []
        for pname, param in own:
            if id(param) in loaded:
                module._parameters[pname] = loaded[id(param)]
                continue
            key = _checkpoint_key(f"{name}.{pname}" if name else pname, tensors)
            if key is None:  # not in the checkpoint: initialized below, as from_pretrained initializes it
                missing.append(pname)
                module._parameters[pname] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                         requires_grad=param.requires_grad)
                loaded[id(param)] = module._parameters[pname]
                continue
            tensor = read_tensor(model_dir, tensors[key], key).to(device=device)
            loading += tensor.numel() * tensor.element_size()
            if is_4bit(module) and pname == "weight":
                new = _quantize_into(module, tensor, quant_type, double_quant, compute_dtype, quant_storage)
                held.quant_state += quant_state_bytes(new)
                loading += new.numel() * new.element_size()
            else:
                new = nn.Parameter(tensor.to(dtype), requires_grad=param.requires_grad)
            module._parameters[pname] = new
            loaded[id(param)] = new
        if missing:
            if len(missing) < len(own):
                raise KeyError(f"{name}: {missing} missing from the checkpoint in {model_dir}, its other tensors not")
            with torch.no_grad():
                model._init_weights(module)
        held.note(model, loading)
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
        held.note(model, 0)
    for module in model.modules():  # buffers of modules without parameters (rotary embeddings)
        for bname, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                module._buffers[bname] = buffer.to(device)
    return model


def _meta_4bit(linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
               quant_storage: torch.dtype) -> nn.Module:
    from bitsandbytes.nn import Linear4bit

    return Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                      quant_storage=quant_storage, device="meta")


def _quantize_into(module: nn.Module, weight: torch.Tensor, quant_type: str, double_quant: bool,
                   compute_dtype: torch.dtype, quant_storage: torch.dtype) -> nn.Parameter:
    """The Params4bit of ``weight`` with the module's settings (the module keeps CPU-canonical layout)."""
    q = linear_4bit(module, weight, quant_type, double_quant, compute_dtype, quant_storage)
    if hasattr(q, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False  # bitsandbytes' canonical layout (formats.bnb4.training_layout_)
    return q.weight


def _checkpoint_key(name: str, tensors: dict) -> Optional[str]:
    """The checkpoint's name for parameter ``name``: the same, or without a head model's base prefix; None."""
    return next((c for c in (name, name.split(".", 1)[-1]) if c in tensors), None)
