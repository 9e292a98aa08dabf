"""The statistics of the comparisons: mean ± std per method, paired differences with a t-test and McNemar, the learning-rate selection rule."""

from __future__ import annotations

import math
import statistics


def summarize(runs: list[dict]) -> dict:
    table = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"seeds": [r["seed"] for r in mine], "trainable_params": mine[0]["trainable_params"]}
        for key in ("accuracy", "loss"):
            values = [r["final"][key] for r in mine]
            row[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        table[method] = row
    return table


def paired(finals: dict[str, list[dict]], labels: str, base: str = "kasa") -> dict:
    """KaSA minus each other method on the seeds both ran (``finals``: method → its final runs): per-seed accuracy
    differences (mean, 95 % t interval, paired t-test p) and McNemar's exact test on the pooled item predictions."""
    from scipy import stats

    final = {(r["method"], r["seed"]): r for runs in finals.values() for r in runs}
    out = {}
    for other in dict.fromkeys(m for m, _ in final):
        seeds = sorted(s for m, s in final if m == other and (base, s) in final)
        if other == base or not seeds:
            continue
        diffs = [final[base, s]["accuracy"] - final[other, s]["accuracy"] for s in seeds]
        mean = statistics.fmean(diffs)
        row = {"seeds": seeds, "differences": diffs, "mean": mean}
        if len(diffs) > 1:
            sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
            half = stats.t.ppf(0.975, len(diffs) - 1) * sem
            row.update(ci95=[mean - half, mean + half],
                       t_test_p=float(stats.ttest_rel([final[base, s]["accuracy"] for s in seeds],
                                                      [final[other, s]["accuracy"] for s in seeds]).pvalue)
                       if sem > 0 else 1.0)
        if labels:
            b = c = 0
            for s in seeds:
                for x, y, t in zip(final[base, s]["predictions"], final[other, s]["predictions"], labels):
                    b += x == t != y
                    c += y == t != x
            row.update(mcnemar_base_only=b, mcnemar_other_only=c,
                       mcnemar_p=float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0)
        out[other] = row
    return out


def select_rates(runs: list[dict], seed: int) -> dict:
    """Per method, the rate of best validation accuracy at the selection seed (ties: the smaller rate)."""
    chosen = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
        if mine:
            chosen[method] = max(mine, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
    return chosen


def final_runs(result: dict) -> dict[str, list[dict]]:
    out = {}
    for r in result["runs"]:
        if r["lr"] == result["selected_lr"].get(r["method"]) and r["seed"] in result["seeds_of"][r["method"]]:
            out.setdefault(r["method"], []).append(r)
    return {m: sorted(v, key=lambda r: r["seed"]) for m, v in out.items()}

