"""KaSA initialization time: kasa_ds vs PEFT's KaSA variant on the same randomly initialized Llama, in one run.

Both start from identical weights; runs are interleaved (PEFT, kasa_ds, PEFT, ...) and the medians compared. The
error of each is the largest relative Frobenius error of a truncated weight against the float64 full-SVD truncation
of the original weight.

    python tools/bench_init.py                       # hidden 1024, ff 2816, 4 layers, 7 targets, r = 16
    python tools/bench_init.py --smoke               # tiny shapes, one repeat (what the tests run)
    python tools/bench_init.py --zero3               # + DeepSpeed ZeRO-3 at 1 and 2 ranks, and a 70B projection
    python tools/bench_init.py --zero3 --quant nf4   # the same with a 4-bit base partitioned by ZeRO-3 (QKaSA)

--zero3 launches real DeepSpeed jobs (CPU accelerator on a machine without GPUs): the model is built partitioned
(HfDeepSpeedConfig + zero.Init), then initialized by PEFT's KaSA (``get_peft_model``: it gathers each weight and runs
a full SVD on every rank, one weight after another) or by kasa_ds (each weight gathered to one owner, owners work
concurrently, factors broadcast). The machine's cores are split evenly over the ranks of each run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(hidden: int, ff: int, layers: int, heads: int, kv_heads: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def init_peft(model, r: int, solver: str):
    from peft import KasaConfig, LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                            kasa_config=KasaConfig()))


def init_kasa_ds(model, r: int, solver: str):
    from kasa_ds import KaSAConfig, apply_kasa

    apply_kasa(model, KaSAConfig(r=r, alpha=2 * r, target_modules=TARGETS, svd_solver=solver), show_progress=False)
    return model


def truncated_weights(model) -> dict[str, torch.Tensor]:
    """Target name (as in the base model) → its base weight, for a PEFT- or kasa_ds-adapted model."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("base_layer.weight"):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
            out[key] = p.detach()
    return out


def max_rel_error(weights: dict[str, torch.Tensor], references: dict[str, torch.Tensor]) -> float:
    return max(((weights[k].double() - ref).norm() / ref.norm()).item() for k, ref in references.items())


LLAMA_70B = dict(hidden=8192, ff=28672, layers=80, heads=64, kv_heads=8)


def zero3_worker(method: str, a, out: str) -> None:
    """One DeepSpeed rank: build the model partitioned (16-bit, or with --quant the 4-bit base streamed in from
    --base), time the KaSA initialization, rank 0 writes the seconds (for kasa_ds also the owners' solve seconds
    summed over the matrices, from apply_kasa's report)."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from kasa_ds import KaSAConfig, apply_kasa
    from kasa_ds.comm.processes import init_processes
    from kasa_ds.placements.scheduled import truncate_scheduled
    from kasa_ds.training.partitioned_4bit import load_partitioned_4bit

    _, world = init_processes(deepspeed=True, backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3}}
    config = LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=False)
    if a.quant:
        f32 = torch.float32
        model = load_partitioned_4bit(a.base, lambda: LlamaForCausalLM(config), ds, a.quant, True, f32, f32, f32,
                                      torch.device("cpu"))
    else:
        keep = HfDeepSpeedConfig(ds)  # noqa: F841
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = LlamaForCausalLM(config)
    torch.distributed.barrier()
    tic = time.perf_counter()
    report = None
    if method == "peft" and a.quant:
        serial_dequantized_svds(model)
    elif method == "peft":
        init_peft(model, a.r, a.solver)
    else:
        report = apply_kasa(model, KaSAConfig(r=a.r, alpha=2 * a.r, target_modules=TARGETS, svd_solver=a.solver),
                            truncate=lambda ts, c: truncate_scheduled(ts, c, show_progress=False),
                            show_progress=False)
    torch.distributed.barrier()
    seconds = time.perf_counter() - tic
    if torch.distributed.get_rank() == 0:
        solves = sum(layer.seconds for layer in report.layers) if report is not None else None
        Path(out).write_text(json.dumps({"seconds": seconds, "world": world, "threads": torch.get_num_threads(),
                                         "solve_seconds": solves}))


def serial_dequantized_svds(model) -> None:
    """The PEFT-style baseline for a partitioned 4-bit base: every rank gathers every target, dequantizes it and runs
    a full float32 SVD, one weight after another (what a per-layer init without an owner schedule does)."""
    import bitsandbytes.functional as bnbF
    import deepspeed

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            with deepspeed.zero.GatheredParameters([module.weight], modifier_rank=None):
                weight = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            torch.linalg.svd(weight, full_matrices=False)


def run_zero3(a) -> dict:
    import os
    import shutil
    import subprocess
    import tempfile

    cores = os.cpu_count() or 1
    results = {}
    shape = ["--hidden", str(a.hidden), "--ff", str(a.ff), "--layers", str(a.layers), "--heads", str(a.heads),
             "--kv-heads", str(a.kv_heads), "--r", str(a.r), "--solver", a.solver]
    if a.quant:  # the ranks stream the 4-bit base in from a checkpoint of the same random model
        base = tempfile.mkdtemp(prefix="bench-init-base-")
        build_model(a.hidden, a.ff, a.layers, a.heads, a.kv_heads).save_pretrained(base)
        shape += ["--quant", a.quant, "--base", base]
    # the machine's cores split over the ranks of each run; then kasa_ds once more at 1 rank with the cores one rank
    # of the 2-rank run has: N ranks against 1 at the same cores per rank (the scaling of the schedule itself)
    half = max(1, cores // 2)
    runs = [(f"{method}@{world}", world, method, max(1, cores // world)) for world in (1, 2)
            for method in ("peft", "kasa_ds")] + [(f"kasa_ds@1x{half}threads", 1, "kasa_ds", half)]
    for key, world, method, threads in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                   "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
            cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port",
                   str(29400 + world), __file__, "--zero3-worker", method, "--out", str(out), *shape]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} at {world} ranks failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            row = json.loads(out.read_text())
            results[key] = row["seconds"]
            if row["solve_seconds"] is not None:
                results[f"{key}:solves"] = row["solve_seconds"]
    return results


def project_70b(a) -> dict:
    """Seconds to initialize KaSA on a 70B Llama on P ranks, from per-matrix costs measured here.

    The float32 Gram solver is timed on this machine for the 70B matrix shapes divided by 8 in each dimension
    (1024×1024, 128×1024 (k/v), 3584×1024, 1024×3584); its cost model m·n·k + 4k³ (Gram + eigh) then scales each to
    full size (×512). kasa_ds on P ranks takes the largest per-rank load of kasa_ds.comm.schedule.assign_owners over the 560 matrices;
    PEFT-style takes the sum (every rank does every matrix). Gathers are left out (a few seconds at NVLink speed for
    140 GB), and so is the GPU's speed-up over this CPU, which divides both columns alike.
    """
    from kasa_ds.core.truncation import tail_factors
    from kasa_ds.comm.schedule import WorkItem, assign_owners, svd_cost

    h, ff, kv = LLAMA_70B["hidden"], LLAMA_70B["ff"], LLAMA_70B["hidden"] * LLAMA_70B["kv_heads"] // LLAMA_70B["heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (ff, h),
              "up_proj": (ff, h), "down_proj": (h, ff)}
    seconds_per_cost = []
    for m, n in set(shapes.values()):
        w = torch.randn(m // 8, n // 8)
        tail_factors(w, a.r, "gram")
        tic = time.perf_counter()
        tail_factors(w, a.r, "gram")
        seconds_per_cost.append((time.perf_counter() - tic) / svd_cost(w.shape))
    rate = statistics.median(seconds_per_cost)
    items = [WorkItem(f"{layer}.{name}", shape, 2 * shape[0] * shape[1]) for layer in range(LLAMA_70B["layers"])
             for name, shape in shapes.items()]
    total = sum(svd_cost(i.shape) for i in items) * rate
    out = {"seconds_per_matrix_unit": rate, "peft_style_seconds": total}
    for p in (8, 64, 512):
        loads = [0.0] * p
        for asg in assign_owners(items, p):
            loads[asg.owner] += svd_cost(items[asg.index].shape) * rate
        out[f"kasa_ds_seconds@{p}"] = max(loads)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ff", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--solver", default="auto", help="kasa_ds svd_solver")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--zero3", action="store_true", help="also time ZeRO-3 at 1 and 2 ranks and project to 70B")
    p.add_argument("--quant", choices=["nf4", "fp4"], help="with --zero3: a 4-bit base partitioned by ZeRO-3 (QKaSA); "
                   "the baseline gathers, dequantizes and SVDs every weight on every rank")
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--zero3-worker", choices=["peft", "kasa_ds"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.zero3_worker:
        return zero3_worker(a.zero3_worker, a, a.out)
    if a.smoke:
        a.hidden, a.ff, a.layers, a.heads, a.kv_heads, a.r, a.repeats = 64, 176, 1, 4, 4, 4, 1

    base = build_model(a.hidden, a.ff, a.layers, a.heads, a.kv_heads)
    from kasa_ds.core.truncation import reference_world

    references = {n: reference_world(m.weight, a.r) for n, m in base.named_modules()
                  if n.rsplit(".", 1)[-1] in TARGETS}
    times: dict[str, list[float]] = {"peft": [], "kasa_ds": []}
    errors: dict[str, float] = {}
    for rep in range(a.repeats):
        for label, init in (("peft", init_peft), ("kasa_ds", init_kasa_ds)):
            model = copy.deepcopy(base)
            tic = time.perf_counter()
            adapted = init(model, a.r, a.solver)
            times[label].append(time.perf_counter() - tic)
            if rep == 0:
                errors[label] = max_rel_error(truncated_weights(adapted), references)
            del model, adapted
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {"hidden": a.hidden, "ff": a.ff, "layers": a.layers, "targets": len(TARGETS), "r": a.r,
                   "matrices": len(references), "solver": a.solver, "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "median_seconds": med, "all_seconds": times, "max_rel_error_vs_fp64": errors,
        "speedup_kasa_ds_over_peft": med["peft"] / med["kasa_ds"],
    }
    print(f"KaSA init, Llama hidden={a.hidden} ff={a.ff} layers={a.layers}, {len(references)} matrices, r={a.r}, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'method':10s} {'seconds':>9s} {'max rel err vs fp64':>20s}")
    for label in ("peft", "kasa_ds"):
        print(f"{label:10s} {med[label]:9.3f} {errors[label]:20.2e}")
    print(f"speedup kasa_ds / PEFT: {result['speedup_kasa_ds_over_peft']:.2f}x")
    if a.zero3:
        result.update(report_zero3(a))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


def report_zero3(a) -> dict:
    """ZeRO-3 at 1 and 2 ranks against the PEFT-style baseline, and the 70B projection, printed and returned."""
    result = {}
    z = run_zero3(a)
    result["zero3_seconds"] = z
    what = f"{a.quant.upper()} 4-bit base streamed in partitioned; baseline: serial dequantize + SVD on every " \
        "rank" if a.quant else "model built partitioned"
    print(f"\nDeepSpeed ZeRO-3 ({what}), seconds:")
    print(f"{'ranks':>5s} {'PEFT-style' if a.quant else 'PEFT KaSA':>10s} {'kasa_ds':>9s} {'PEFT/kasa_ds':>13s}")
    for world in (1, 2):
        print(f"{world:5d} {z[f'peft@{world}']:10.2f} {z[f'kasa_ds@{world}']:9.2f} "
              f"{z[f'peft@{world}'] / z[f'kasa_ds@{world}']:12.2f}x")
    print(f"kasa_ds 2 ranks vs 1 rank: {z['kasa_ds@1'] / z['kasa_ds@2']:.2f}x (the machine's cores split over the ranks)")
    same = next((k for k in z if k.startswith("kasa_ds@1x") and ":" not in k), None)
    if same:
        print(f"kasa_ds 2 ranks vs 1 rank at {same.split('x')[1].removesuffix('threads')} thread(s) per rank either "
              f"way: {z[same] / z['kasa_ds@2']:.2f}x (N = 2)")
        # where the 2-rank run's time goes: the owners' solves (apply_kasa's per-matrix seconds) split over the
        # ranks, and everything else (gathers to the owners, broadcasts, rewriting the shards, waiting)
        s1, s2 = z[f"{same}:solves"], z["kasa_ds@2:solves"]
        print(f"  solves summed over the matrices: {s1:.2f} s at 1 rank, {s2:.2f} s at 2 ranks (each solve "
              f"{s2 / s1:.2f}x slower while two ranks and gloo's copies share the cores); the 2-rank run spent "
              f"{z['kasa_ds@2'] - s2 / 2:.2f} s of its {z['kasa_ds@2']:.2f} s outside its half of them")
    proj = project_70b(a)
    result["projection_70b"] = proj
    print("\nProjection, Llama-70B (80 layers, hidden 8192, ff 28672, 8 kv heads; 560 matrices, r="
          f"{a.r}), seconds of this machine's compute:")
    print(f"  PEFT-style (every rank does every SVD): {proj['peft_style_seconds']:.0f}")
    for pp in (8, 64, 512):
        s_ = proj[f"kasa_ds_seconds@{pp}"]
        print(f"  kasa_ds on {pp:3d} ranks: {s_:8.1f}  ({proj['peft_style_seconds'] / s_:.0f}x)")
    return result


if __name__ == "__main__":
    main()
