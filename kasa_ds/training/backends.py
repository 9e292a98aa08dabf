"""How the recipe runs its model: a plain process, a DeepSpeed engine (ZeRO 0–3, optionally AutoTP), or megatron-core
tensor parallelism on a Hugging Face checkpoint (``backend: megatron``).

One backend object per run answers what was an if-chain at each site of the training script:
    before_loading  ZeRO-3: the model is then built partitioned (HfDeepSpeedConfig); no rank ever holds it whole
    place        device placement before KaSA, or AutoTP sharding (DeepSpeed)
    prepare      after KaSA: under DeepSpeed half precision the trainable parameters are cast (it keeps fp32 masters)
    build        optimizer, schedule (and engine)
    forward, backward, step, save_state / restore_state (the trainer state in a checkpoint directory)
``dp_rank``/``dp_world`` say which share of each global batch this rank takes (TP ranks of a replica share one).
"""

from __future__ import annotations

import contextlib
import json
import math
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..comm.collectives import all_reduce_mean
from ..core.regularization import kasa_regularization
from ..core.types import AdapterTensor
from ..inject import across_stages
from ..io.adapter import adapter_tensors
from ..placements.tp.autotp import autotp_shard
from ..placements.tp.spec import sharded_factor
from ..registry import by_placement, placement_of
from .checkpoint import DEEPSPEED_DIR
from .config import ConfigError, TrainConfig
from .megatron_model import load_megatron_lm
from .models import load_model, model_dir
from .precision import MemoryGuard, autocast, build_optimizer, grad_scaler, lr_factor
from .processes import ProcessEnv


class PlainBackend:
    """One process (the recipe refuses several ranks without DeepSpeed): torch or bitsandbytes AdamW, autocast with
    loss scaling, gradient clipping, the memory guard."""

    distributed_truncation = False
    loss_scale_skipped = False  # the last step was skipped by float16 loss scaling (an overflow, not a divergence)

    def __init__(self, cfg: TrainConfig, env: ProcessEnv) -> None:
        self.cfg, self.env = cfg, env
        self.dp_rank, self.dp_world = env.rank, env.world

    def before_loading(self) -> None:
        pass

    def load(self, section, pad_token_id: int, keep) -> nn.Module:
        """The base model as this backend needs it loaded (kasa_ds.training.models.load_model)."""
        return load_model(section, pad_token_id, keep_full_precision=keep)

    def place(self, model: nn.Module) -> nn.Module:
        return model.to(self.env.device)

    def prepare(self, model: nn.Module) -> None:
        pass

    def build(self, model: nn.Module) -> None:
        t = self.cfg.train
        self.model = self.forward = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, t.optimizer, t.lr, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, cfg=t))
        self.scaler = grad_scaler(self.env.device, t.autocast)
        self.guard = MemoryGuard(t.max_memory_gib, self.env.device)

    def forward_backward(self, batches: list[dict], weights: list[float], step: int) -> tuple[list[float], float]:
        """One step's micro-batches, forward and backward, one after the other; micro-batch k's loss is
        weights[k]·task_k + the KaSA regularizer (averaged over the micro-batches by :meth:`backward`). Returns
        every micro-batch's task loss and the regularizer's value (the whole model's)."""
        losses, reg_value = [], 0.0
        for batch, weight in zip(batches, weights):
            with self.forward_context(step):
                task_loss = self.forward(**batch).loss.float()
                reg = kasa_regularization(self.model).to(task_loss.device).float()
            self.backward((task_loss * weight if weight else 0.0) + reg, step)
            losses.append(task_loss.item())
            reg_value = self.whole_model(reg.item())
        return losses, reg_value

    def forward_context(self, step: int):
        stack = contextlib.ExitStack()
        stack.enter_context(self.guard.around_step(step))
        stack.enter_context(autocast(self.env.device, self.cfg.train.autocast))
        return stack

    def backward(self, loss: torch.Tensor, step: int) -> None:
        with self.guard.around_step(step):
            scaled = loss / self.cfg.train.gradient_accumulation_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def step(self) -> float:
        """Clip, step, schedule; returns the gradient norm before clipping. A non-finite norm (without loss
        scaling, which skips such steps itself) skips the step: the weights never take a NaN update."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm).item()
        self.loss_scale_skipped = False
        if not self.scaler and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when the scaled gradients overflowed
            self.scaler.update()
            self.loss_scale_skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def whole_model(self, value: float) -> float:
        """A per-rank sum over the model's layers (the regularizer) as the whole model has it: the same here."""
        return value

    def save_state(self, directory) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:  # float16 autocast: the loss scale is training state too
            state["grad_scaler"] = self.scaler.state_dict()
        torch.save(state, directory / "trainer_state.pt")

    def restore_state(self, directory) -> None:
        state = torch.load(directory / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


class DeepSpeedBackend(PlainBackend):
    """A DeepSpeed engine: ZeRO stage, precision and offload from the JSON, batch geometry and clipping from the
    recipe; ``tensor_parallel > 1`` shards the model with AutoTP before KaSA (then ZeRO ≤ 2 across replicas)."""

    def __init__(self, cfg: TrainConfig, env: ProcessEnv) -> None:
        super().__init__(cfg, env)
        self.ds = deepspeed_config(cfg, env.world)
        self.zero_stage = self.ds.get("zero_optimization", {}).get("stage", 0)
        self.zero3 = self.zero_stage == 3
        self._norm: Optional[float] = None
        if cfg.tensor_parallel > 1 and self.zero3:
            raise ConfigError("tensor_parallel with ZeRO-3 is not supported; use ds_configs/zero2.json (TP + ZeRO-2)")
        self.distributed_truncation = env.world > 1 and cfg.tensor_parallel == 1  # TP bases: their own collective
        self._skipped = 0  # the engine's count of loss-scale skips, as of the last step
        self.half = next((dt for key, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                          if self.ds.get(key, {}).get("enabled")), None)

    def before_loading(self) -> None:
        """ZeRO-3: HfDeepSpeedConfig alive while from_pretrained runs builds the model partitioned (zero.Init); a 4-bit
        base partitions itself as it streams in (``load``), from a skeleton zero.Init must not touch."""
        if self.zero3 and not self.cfg.model.quantize:
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(self.ds)  # must stay referenced while the model lives

    def load(self, section, pad_token_id: int, keep) -> nn.Module:
        """ZeRO-3 with a 4-bit base: streamed in module by module, partitioned as it comes (packed bytes stored in
        the engine's parameter dtype, which its casts then leave as they are)."""
        return load_model(section, pad_token_id, keep_full_precision=keep, zero3=self.ds if self.zero3 else None,
                          half=self.half)

    def place(self, model: nn.Module) -> nn.Module:
        if not self.zero3:
            model = model.to(self.env.device)
        if self.cfg.tensor_parallel > 1:
            from deepspeed.utils import groups

            model = autotp_shard(model, self.ds)  # q/k/v/gate/up → LinearLayer, o/down → LinearAllreduce
            self.dp_rank, self.dp_world = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        return model

    def prepare(self, model: nn.Module) -> None:
        if self.half is not None:  # DeepSpeed keeps float32 master copies and optimizer states of these itself
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(self.half)

    def build(self, model: nn.Module) -> None:
        import deepspeed

        t = self.cfg.train
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, t.optimizer, t.lr, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, cfg=t))
        self.forward, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                                                config=self.ds)

    def forward_context(self, step: int):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, step: int) -> None:
        self.forward.backward(loss)
        if self.zero_stage == 0 and self.forward.is_gradient_accumulation_boundary():
            self._norm = grad_norm(self.params)  # ZeRO-0's plain optimizer reports none; the gradients are reduced
        self.forward.step()  # DeepSpeed steps the optimizer at the accumulation boundary only

    def step(self) -> Optional[float]:
        """The engine stepped at the accumulation boundary; a float16 overflow it skipped is reported as such.
        Returns the gradient norm before clipping: the engine's, or the one measured at the boundary (ZeRO-0)."""
        skipped = getattr(self.forward, "skipped_steps", 0)
        self.loss_scale_skipped = skipped > self._skipped
        self._skipped = skipped
        norm = self.forward.get_global_grad_norm()
        norm = self._norm if norm is None else norm
        return None if norm is None else float(norm)

    def save_state(self, directory) -> None:
        self.forward.save_checkpoint(str(directory), tag=DEEPSPEED_DIR, exclude_frozen_parameters=True)

    def restore_state(self, directory) -> None:
        self.forward.load_checkpoint(str(directory), tag=DEEPSPEED_DIR, load_module_strict=False)


class MegatronBackend(PlainBackend):
    """megatron-core tensor and pipeline parallelism on a Hugging Face checkpoint (kasa_ds.training.megatron_model):
    ``tensor_parallel`` × ``pipeline_parallel`` ranks hold one model replica (megatron's parallel_state groups), data
    parallel across the replicas. Adapter gradients are averaged over the data-parallel replicas (a few packed
    all-reduces, not one per tensor) and clipped by the whole model's norm (a sharded factor's squares summed over
    its TP group, the stages' sums added). The optimizer state is saved whole, like the adapter: a checkpoint resumes
    at any TP and PP size (with the same data-parallel size: the global batch)."""

    OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer_moments.safetensors", "scheduler.json"
    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, cfg: TrainConfig, env: ProcessEnv) -> None:
        from megatron.core import parallel_state

        super().__init__(cfg, env)
        if cfg.sequence_parallel and env.device.type != "cuda":
            raise ConfigError("sequence_parallel: true runs on CUDA only (megatron-core's sequence-parallel layers "
                              "allocate their buffers on the GPU); set sequence_parallel: false on this machine")
        if env.world % (cfg.tensor_parallel * cfg.pipeline_parallel):
            raise ConfigError(f"tensor_parallel={cfg.tensor_parallel} × pipeline_parallel={cfg.pipeline_parallel} does "
                              f"not divide the {env.world} ranks")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                                     pipeline_model_parallel_size=cfg.pipeline_parallel)
        self.pipeline_group = (parallel_state.get_pipeline_model_parallel_group() if cfg.pipeline_parallel > 1
                               else None)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank, self.dp_world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def load(self, section, pad_token_id: int, keep) -> nn.Module:
        model = load_megatron_lm(model_dir(section), dtype=getattr(torch, section.dtype), device=self.env.device,
                                 sequence_parallel=self.cfg.sequence_parallel)
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def place(self, model: nn.Module) -> nn.Module:
        return model  # built on its device, already split

    def forward_backward(self, batches: list[dict], weights: list[float], step: int) -> tuple[list[float], float]:
        """With pipeline stages, the step's micro-batches go through the stages together, each stage working on
        another micro-batch (:meth:`MegatronCausalLM.pipelined_forward_backward`); without, one after the other."""
        if self.pipeline_group is None:
            return super().forward_backward(batches, weights, step)
        k = self.cfg.train.gradient_accumulation_steps
        with self.forward_context(step):
            losses, reg = self.model.pipelined_forward_backward(
                batches, [w / k for w in weights], 1.0 / k, lambda: kasa_regularization(self.model).float())
        return losses, self.whole_model(reg)

    def step(self) -> float:
        """Average over the data-parallel replicas, clip by the global norm, step; a non-finite norm skips the step
        (the same decision on every rank: the norm is the same everywhere)."""
        all_reduce_mean([p.grad for p in self.params if p.grad is not None], self.dp_group)
        norm = model_parallel_grad_norm(self.model, self.pipeline_group)
        self.loss_scale_skipped = False
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        clip = self.cfg.train.max_grad_norm
        if clip and norm > clip:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def whole_model(self, value: float) -> float:
        """Summed over the pipeline stages (each holds its own layers' terms)."""
        if self.pipeline_group is None:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(total, group=self.pipeline_group)
        return total.item()

    def save_state(self, directory) -> None:
        """AdamW's moments gathered to the TP=1 layout (collective over each TP group) and over the pipeline stages,
        written by rank 0 with the step count and the schedule."""
        state, items = self.optimizer.state, adapter_tensors(self.model)
        moments: dict[str, torch.Tensor] = {}
        for kind in self.MOMENTS:
            views = [AdapterTensor(item.key, state[item.param][kind], item.layer, item.name) for item in items]
            for placement, group in by_placement(views):
                moments.update({f"{key}:{kind}": value for key, value in placement.gather_adapter(group).items()})
        moments = across_stages(self.model, moments)
        if dist.get_rank() == 0:
            save_file(moments, str(directory / self.OPTIMIZER_FILE))
            steps = {state[item.param]["step"].item() for item in items}
            (directory / self.SCHEDULER_FILE).write_text(json.dumps(
                {"optimizer_step": steps.pop(), "lr": [g["lr"] for g in self.optimizer.param_groups],
                 "scheduler": self.scheduler.state_dict()}))

    def restore_state(self, directory) -> None:
        """Each of this stage's moments cut to this rank's shard by its placement (the checkpoint's TP and PP sizes do
        not matter)."""
        moments = load_file(str(directory / self.OPTIMIZER_FILE))
        saved = json.loads((directory / self.SCHEDULER_FILE).read_text())
        for item in adapter_tensors(self.model):
            place = placement_of(item)
            self.optimizer.state[item.param] = {
                "step": torch.tensor(float(saved["optimizer_step"])),
                **{kind: place.load_adapter_tensor(item, moments[f"{item.key}:{kind}"]).to(item.param)
                   for kind in self.MOMENTS}}
        for group, lr in zip(self.optimizer.param_groups, saved["lr"]):
            group["lr"] = lr  # the scheduler sets it at its next step only
        self.scheduler.load_state_dict(saved["scheduler"])


@torch.no_grad()
def model_parallel_grad_norm(model: nn.Module, pipeline_group=None) -> float:
    """The L2 norm of the adapter gradients as one unsplit model has them: TP-sharded factors' squares are summed
    over the TP group (one all-reduce), replicated ones counted once, and the stages' totals summed over
    ``pipeline_group``; the same value on every rank."""
    grads = [(item, item.param.grad) for item in adapter_tensors(model) if item.param.grad is not None]
    device = grads[0][1].device if grads else torch.device("cpu")
    sharded, replicated = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    group = None
    for item, grad in grads:
        spec = getattr(item.layer, "spec", None)
        if spec is not None and spec.tp_size > 1 and item.name == sharded_factor(spec):
            sharded += grad.double().square().sum()
            group = spec.group
        else:
            replicated += grad.double().square().sum()
    if group is not None:  # every rank holds the same layers: all of them take part
        dist.all_reduce(sharded, group=group)
    total = sharded + replicated
    if pipeline_group is not None:
        dist.all_reduce(total, group=pipeline_group)
    return float(total.sqrt())


@torch.no_grad()
def grad_norm(params: list[torch.Tensor]) -> Optional[float]:
    """The L2 norm of the parameters' gradients (None when none has one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else None


def make_backend(cfg: TrainConfig, env: ProcessEnv) -> PlainBackend:
    if cfg.backend == "megatron":
        return MegatronBackend(cfg, env)
    return DeepSpeedBackend(cfg, env) if cfg.ds_config else PlainBackend(cfg, env)


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with batch geometry and clipping taken from the recipe config ("auto" in the JSON)."""
    with open(cfg.ds_config) as f:
        ds = json.load(f)
    t = cfg.train
    if cfg.tensor_parallel > 1:
        size = ds.setdefault("tensor_parallel", {}).setdefault("autotp_size", cfg.tensor_parallel)
        if size != cfg.tensor_parallel:
            raise ConfigError(f"{cfg.ds_config}: tensor_parallel.autotp_size={size} disagrees with the recipe's "
                              f"tensor_parallel={cfg.tensor_parallel}; set one of them")
        if world % cfg.tensor_parallel:
            raise ConfigError(f"tensor_parallel={cfg.tensor_parallel} does not divide the {world} ranks")
    wanted = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps,
              "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world,
              "gradient_clipping": t.max_grad_norm}
    if cfg.tensor_parallel > 1:  # DeepSpeed derives it from the data-parallel size once AutoTP has set its groups
        wanted.pop("train_batch_size")
        ds.pop("train_batch_size", None)
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{cfg.ds_config}: {key}={ds[key]} disagrees with the recipe ({value}); set it to "
                              "\"auto\" and choose it in the YAML (train.*)")
        ds[key] = value
    return ds
