#!/usr/bin/env python
"""KaSA fine-tuning recipe: one entry point for a single process and for the DeepSpeed launcher.

    python launch/train.py                                   # embedded default: MiniLM on Rotten Tomatoes, CPU
    python launch/train.py --config configs/x.yaml train.lr=3e-4 kasa.r=16
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --config configs/x.yaml

Steps, in order: validate config → set up processes → tokenizer, data → model → KaSA (truncate + inject) →
resume → eval → train (task loss + KaSA regularizer) with checkpoints → eval → adapter in <output_dir>/adapter.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kasa_ds.train_config import ConfigError, TrainConfig, dump, load_train_config  # noqa: E402  (light imports)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe config (defaults: the embedded MiniLM / Rotten Tomatoes run)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON config")
    p.add_argument("--output_dir", help="where metrics, checkpoints and the adapter go (overrides output_dir)")
    p.add_argument("--resume", help="auto | none | <checkpoint dir> (overrides resume)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for key in ("ds_config", "output_dir", "resume"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    try:
        cfg = load_train_config(args.config, overrides)
        ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)  # launcher / mpirun
        if ranks > 1 and cfg.ds_config is None:
            raise ConfigError(f"{ranks} ranks without --ds_config: nothing would synchronize "
                              "their gradients; pass --ds_config ds_configs/zero0.json (data parallel) or zero2/zero3")
        fingerprint = run_fingerprint(cfg)
        resume_from = find_resume_checkpoint(cfg, fingerprint)
        if cfg.train.max_memory_gib is not None and cfg.ds_config is None:
            check_memory_plan(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = train(cfg, fingerprint, resume_from)
    shutdown_distributed()
    return rc


def shutdown_distributed() -> None:
    """Leave the process group together: a rank exiting with live communicator threads can abort at interpreter
    exit ("terminate called without an active exception") after a run that succeeded.

    DeepSpeed's CPU shared-memory allreduce creates one /dev/shm segment per rank (≈ 66 MiB) and never unlinks it;
    after the barrier every rank has long mapped its peers', so each rank unlinks its own (the mappings stay valid).
    """
    import glob

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
                if path.rsplit("_", 1)[-1] in (str(rank), os.environ.get("LOCAL_RANK", "")):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass


def check_memory_plan(cfg: TrainConfig) -> None:
    """Before anything loads: the planner's estimate of this run must fit train.max_memory_gib."""
    from kasa_ds.memory_plan import format_plan, recipe_estimate

    estimate = recipe_estimate(cfg)
    if estimate is None:
        print("max_memory_gib: no planner estimate for this model/task; the limit is enforced while training")
    elif not estimate["fits"]:
        raise ConfigError(f"train.max_memory_gib={cfg.train.max_memory_gib:g}: the planner estimates more "
                          f"(tools/plan_memory.py):\n{format_plan(estimate)}\nlower train.micro_batch_size or "
                          "model.max_length, set model.gradient_checkpointing: true, model.quantize: nf4 or "
                          "train.optimizer: paged_adamw8bit")
    else:
        print(f"memory plan: {estimate['total_bytes'] / (1 << 30):.2f} GiB estimated, limit "
              f"{cfg.train.max_memory_gib:g} GiB")


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with this run to be resumed (model, method, data, batch geometry)."""
    k = cfg.kasa
    return {"model": cfg.model.path, "task": cfg.model.task, "r": k.r, "alpha": k.alpha,
            "target_modules": k.target_modules, "modules_to_save": k.modules_to_save, "train_data": cfg.data.train,
            "micro_batch_size": cfg.train.micro_batch_size, "seed": cfg.train.seed,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps}


def find_resume_checkpoint(cfg: TrainConfig, fingerprint: dict):
    from kasa_ds import checkpoint

    if cfg.resume == "none":
        return None
    path = checkpoint.latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is not None:
        checkpoint.read_meta(path, fingerprint)  # refuse a mismatched or corrupted checkpoint before any work
    return path


def train(cfg: TrainConfig, fingerprint: dict, resume_from) -> int:
    import torch

    from kasa_ds import apply_kasa, checkpoint, kasa_regularization, save_adapter
    from kasa_ds.adapter_io import adapter_state_dict, load_adapter_state
    from kasa_ds.data import (ClassificationDataset, InstructionDataset, collate, eval_subset, global_batches,
                              load_records, rank_slice)
    from kasa_ds.metrics import MetricsLogger
    from kasa_ds.models import load_model, load_tokenizer
    from kasa_ds.preemption import PREEMPTED_EXIT, StopRequest
    from kasa_ds.single_device import MemoryGuard, autocast, build_optimizer, grad_scaler
    from kasa_ds.utils import progress

    # 1. processes and device; from here SIGUSR1/SIGTERM (preemption) mean "checkpoint after this step and exit"
    stop = StopRequest()
    env = setup_distributed(cfg)
    rank, world, device = env["rank"], env["world"], env["device"]
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump(cfg))
    torch.manual_seed(cfg.train.seed + rank)

    # 2. tokenizer and data
    tokenizer = load_tokenizer(cfg.model)
    if cfg.model.task == "seq_cls":
        make = partial(ClassificationDataset, tokenizer=tokenizer, max_length=cfg.model.max_length,
                       text_field=cfg.data.text_field, label_field=cfg.data.label_field,
                       num_labels=cfg.model.num_labels)
    else:
        make = partial(InstructionDataset, tokenizer=tokenizer, max_length=cfg.model.max_length)
    train_set = make(load_records(cfg.data.train))
    eval_set = make(eval_subset(load_records(cfg.data.eval), cfg.data.max_eval_examples)) if cfg.data.eval else None
    batch_of = partial(collate, pad_id=tokenizer.pad_token_id)

    # 3. model and KaSA. Under ZeRO-3 the model is built partitioned (HfDeepSpeedConfig alive during from_pretrained)
    # and no rank ever holds it whole; with several ranks the truncation work is spread over them.
    ds = read_ds_config(cfg, world) if cfg.ds_config else None
    zero3 = ds is not None and ds.get("zero_optimization", {}).get("stage", 0) == 3
    tp = cfg.tensor_parallel
    if tp > 1 and zero3:
        raise SystemExit("error: tensor_parallel with ZeRO-3 is not supported; use ds_configs/zero2.json (TP + ZeRO-2)")
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay referenced while the model loads)
    kasa_config = cfg.kasa_config()
    model = load_model(cfg.model, tokenizer.pad_token_id, keep_full_precision=kasa_config.in_module_to_save)
    if not zero3:
        model = model.to(device)
    dp_rank, dp_world = rank, world  # which share of each global batch this rank takes (TP ranks share one)
    if tp > 1:
        from deepspeed.utils import groups

        from kasa_ds.tp_integrations import autotp_shard

        model = autotp_shard(model, ds)  # q/k/v/gate/up → LinearLayer, o/down → LinearAllreduce; KaSA follows
        dp_rank, dp_world = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        say(f"tensor parallel: {tp}-way AutoTP × {dp_world} data-parallel replicas")
    truncate = None
    if cfg.kasa.svd_cache:
        from kasa_ds.models import model_dir
        from kasa_ds.svd_cache import SVDCache

        cache = SVDCache(cfg.kasa.svd_cache, model_dir(cfg.model), kasa_config)
        truncate = partial(cache.truncate, show_progress=rank == 0)
    elif torch.distributed.is_initialized() and tp == 1:  # (TP bases: apply_kasa's own collective truncation)
        from kasa_ds.zero import truncate_distributed

        truncate = partial(truncate_distributed, max_gather_bytes=cfg.kasa.max_gather_mb << 20,
                           show_progress=rank == 0)
    report = apply_kasa(model, kasa_config, truncate=truncate, show_progress=rank == 0)
    say(report)
    half = next((dt for key, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                 if ds is not None and ds.get(key, {}).get("enabled")), None)
    if half is not None:  # DeepSpeed keeps float32 master copies and optimizer states of these itself
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(half)
    if zero3:
        from kasa_ds.zero import gathered_adapter_state, prepare_for_zero3

        prepare_for_zero3(model)
        adapter_state = partial(gathered_adapter_state, model)
    elif tp > 1:
        from kasa_ds.tp_shard import gathered_tp_adapter_state

        adapter_state = partial(gathered_tp_adapter_state, model)  # collective: the full adapter on every rank
    else:
        adapter_state = (lambda: adapter_state_dict(model)) if rank == 0 else dict
    start_step = 0
    if resume_from is not None:
        if ds is None:  # under DeepSpeed, engine.load_checkpoint restores the trainable parameters (partitioned)
            load_adapter_state(model, checkpoint.load_tensors(resume_from / "adapter_model.safetensors"))
        start_step = checkpoint.read_meta(resume_from, fingerprint)["step"]
        say(f"resuming from {resume_from} at step {start_step}" + (" (the run is complete: evaluating only; "
            "pass --resume none for a fresh run)" if start_step >= cfg.train.max_steps else ""))

    # 4. optimizer, schedule, engine
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scaler = grad_scaler(device, t.autocast) if ds is None else None
    guard = MemoryGuard(t.max_memory_gib if ds is None else None, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=t))
    engine = None
    if ds is not None:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if resume_from is not None:
        restore_trainer_state(resume_from, engine, optimizer, scheduler, rank, scaler)
    forward = engine if engine is not None else model

    logger = MetricsLogger(output_dir, enabled=rank == 0, tensorboard=cfg.tensorboard)
    evaluate_now = partial(evaluate, forward, eval_set, batch_of, t.micro_batch_size, device, dp_rank, dp_world,
                           cfg.model.task)
    before = evaluate_now() if eval_set is not None else {}
    if before:
        say("eval before: " + fmt(before))
        logger.log("eval", start_step, before, {"when": "before"})

    # 5. train
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * dp_world
    batches = global_batches(len(train_set), global_batch, t.seed, start_step)
    bar = progress(range(start_step, t.max_steps), disable=rank != 0, desc="train", unit="step",
                   initial=start_step, total=t.max_steps)
    model.train()
    window = []
    for step in bar:
        tic = time.perf_counter()
        mine = rank_slice(next(batches), dp_rank, dp_world)
        task_sum = reg_value = 0.0
        for micro in range(t.gradient_accumulation_steps):
            ids = mine[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size]
            batch = {k: v.to(device) for k, v in batch_of([train_set[i] for i in ids]).items()}
            with guard.around_step(step + 1), autocast(device, t.autocast if engine is None else None):
                task_loss = forward(**batch).loss.float()
                reg = kasa_regularization(model).to(task_loss.device).float()
            loss = task_loss + reg
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                with guard.around_step(step + 1):
                    scaled = loss / t.gradient_accumulation_steps
                    (scaler.scale(scaled) if scaler else scaled).backward()
            task_sum += task_loss.item()
            reg_value = reg.item()
        if engine is None:
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        done = step + 1
        record = {"loss": task_sum / t.gradient_accumulation_steps, "kasa_reg": reg_value,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "step_time": time.perf_counter() - tic}
        record["loss"] = mean_over_ranks(record["loss"], device, world)
        window.append(record["loss"])
        logger.log("train", done, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", reg=f"{reg_value:.2e}", refresh=False)
        if done % t.log_every == 0 or done == t.max_steps:
            line = (f"step {done}/{t.max_steps} | loss {sum(window) / len(window):.4f} | kasa_reg {reg_value:.3e} | "
                    f"lr {record['lr']:.2e} | grad_norm {grad_norm:.3f} | {record['step_time']:.2f} s/step")
            if rank == 0:
                bar.write(line)
            window = []
        if eval_set is not None and done % t.eval_every == 0 and done < t.max_steps:
            metrics = evaluate_now()
            logger.log("eval", done, metrics)
            say(f"eval at step {done}: " + fmt(metrics))
            model.train()
        saved = done % t.save_every == 0 or done == t.max_steps
        if saved:
            save_checkpoint(cfg, done, fingerprint, adapter_state, engine, optimizer, scheduler, rank, scaler)
        if done < t.max_steps and stop.agreed(device):  # collective, every step
            if not saved:
                save_checkpoint(cfg, done, fingerprint, adapter_state, engine, optimizer, scheduler, rank, scaler)
            say(f"stopping after step {done} ({stop.reason}): checkpoint saved in {cfg.output_dir}/checkpoints; "
                f"exit {PREEMPTED_EXIT} — run again with resume=auto (the default) to continue")
            logger.close()
            return PREEMPTED_EXIT

    # 6. final eval and adapter
    after = evaluate_now() if eval_set is not None else {}
    if after:
        logger.log("eval", t.max_steps, after, {"when": "after"})
        say("eval before: " + fmt(before) + "\neval after:  " + fmt(after))
    state = adapter_state()  # collective under ZeRO-3
    if rank == 0:
        save_adapter(model, output_dir / "adapter", state=state, base_model_name_or_path=cfg.model.path)
        say(f"adapter written to {output_dir / 'adapter'}")
    logger.close()
    return 0


def setup_distributed(cfg: TrainConfig) -> dict:
    """Initialize torch.distributed when launched with several ranks or DeepSpeed; pick CUDA when present."""
    import warnings
    from datetime import timedelta

    import torch

    # DeepSpeed calls two torch collectives torch 2.13 deprecated, warning on every call: keep the log readable
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.ds_config or world > 1:
        import deepspeed

        cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
        # under mpirun (no RANK in the environment) DeepSpeed discovers ranks through mpi4py and sets the variables
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True,
                                   timeout=timedelta(minutes=cfg.distributed_timeout_minutes))
        world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    rank = torch.distributed.get_rank() if world > 1 or cfg.ds_config else 0
    return {"rank": rank, "world": world, "device": torch.device("cuda", local_rank) if cuda else torch.device("cpu")}


def read_ds_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with batch geometry and clipping taken from the recipe config ("auto" in the JSON)."""
    import json

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


def lr_factor(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    progress_ = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress_)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def evaluate(forward, dataset, batch_of, batch_size, device, rank, world, task) -> dict:
    """Loss (and accuracy for seq_cls) over the whole eval set; each rank takes a strided share, sums all-reduced."""
    import torch

    model = getattr(forward, "module", forward)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·weight, weight, correct (NCCL: on the GPU)
    # every rank runs the same number of forwards (ZeRO-3 forwards are collectives); a rank whose share has run out
    # evaluates example 0 with weight 0
    idx = list(range(rank, len(dataset), world))
    n_batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    with torch.no_grad():
        for b in range(n_batches):
            ids = idx[b * batch_size:(b + 1) * batch_size]
            weight = 1.0 if ids else 0.0
            batch = {k: v.to(device) for k, v in batch_of([dataset[i] for i in (ids or [0])]).items()}
            out = forward(**batch)
            if task == "seq_cls":
                n = batch["labels"].numel() * weight
                correct = (out.logits.argmax(-1) == batch["labels"]).sum().item() * weight
                totals += torch.tensor([out.loss.item() * n, n, correct], dtype=torch.float64, device=device)
            else:
                n = (batch["labels"][:, 1:] != -100).sum().item() * weight  # tokens with loss after the shift
                totals += torch.tensor([out.loss.item() * n, n, 0.0], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    if task == "seq_cls":
        return {"loss": loss, "accuracy": (totals[2] / totals[1]).item()}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def mean_over_ranks(value: float, device, world: int) -> float:
    if world == 1:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(t)
    return (t / world).item()


def save_checkpoint(cfg, step, fingerprint, adapter_state, engine, optimizer, scheduler, rank, scaler=None) -> None:
    import json

    import torch

    from kasa_ds import checkpoint

    tmp = checkpoint.begin(cfg.output_dir, step)
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
    else:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if scaler is not None:  # float16 autocast: the loss scale is training state too
            state["grad_scaler"] = scaler.state_dict()
        torch.save(state, tmp / "trainer_state.pt")
    torch.save(torch.get_rng_state(), tmp / f"rng_state_rank{rank}.pt")
    state = adapter_state()  # collective under ZeRO-3
    if rank == 0:  # the checkpoint directory is also a PEFT adapter (tools/export_adapter.py copies it out)
        checkpoint.save_tensors(tmp / "adapter_model.safetensors", state)
        (tmp / "adapter_config.json").write_text(json.dumps(
            cfg.kasa_config().to_peft_dict(cfg.model.path, "SEQ_CLS" if cfg.model.task == "seq_cls" else "CAUSAL_LM"),
            indent=2))
    checkpoint.commit(tmp, {"step": step, "fingerprint": fingerprint}, keep=cfg.train.keep_checkpoints)


def restore_trainer_state(path: Path, engine, optimizer, scheduler, rank: int, scaler=None) -> None:
    import torch

    if engine is not None:
        engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False)
    else:
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
    rng = path / f"rng_state_rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))


def fmt(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


if __name__ == "__main__":
    sys.exit(main())
