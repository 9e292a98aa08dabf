"""A new placement is one module and one registry line: a toy placement, written here, is picked by the registry,
truncates and wraps its targets, and io/ saves and loads its adapter tensors through it alone. The modules that
name concrete placements are listed: nothing in io/, inject, merge, core, formats or comm."""

import ast
from pathlib import Path

import torch
from torch import nn

from kasa_ds import KaSAConfig, apply_kasa, load_adapter, save_adapter
from kasa_ds import registry
from kasa_ds.core.types import AdapterTensor, Target
from kasa_ds.io.adapter import gathered_adapter_state
from kasa_ds.placements.base import Placement, kasa_linear
from kasa_ds.placements.local import LOCAL

REPO = Path(__file__).resolve().parents[2]


class ToyLinear(nn.Linear):
    """A base kind of its own (think: an FSDP2 DTensor linear); here it just holds its weight whole."""


class ToyPlacement(Placement):
    """Every operation the scheduler and io/ use, with a log of what was asked of it."""

    name = "toy"

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def describe(self, module, name):
        return ((module.out_features, module.in_features), None) if isinstance(module, ToyLinear) else None

    def truncate(self, targets, config, **kwargs):
        self.calls += [("truncate", t.name) for t in targets]
        return LOCAL.truncate(targets, config, show_progress=False)

    def read_on_owner(self, target: Target, owner: int, group=None):
        self.calls.append(("read_on_owner", target.name))
        return LOCAL.read_on_owner(target, owner, group)

    def subtract(self, target: Target, left, right):
        LOCAL.subtract(target, left, right)

    def wrap(self, target, config):
        self.calls.append(("wrap", target.name))
        return kasa_linear(target, config)

    def gather_adapter(self, items: list[AdapterTensor]):
        self.calls += [("gather", item.key) for item in items]
        return super().gather_adapter(items)

    def load_adapter_tensor(self, item: AdapterTensor, value):
        self.calls.append(("load", item.key))
        return value


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(ToyLinear(12, 10), nn.ReLU(), nn.Linear(10, 8))


def test_a_toy_placement_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    toy = ToyPlacement()
    monkeypatch.setattr(registry, "PLACEMENTS", (toy, *registry.PLACEMENTS))  # the one registry line
    config = KaSAConfig(r=2, target_modules=["0", "2"], init_seed=0)
    model = toy_model()
    apply_kasa(model, config, show_progress=False)
    assert model[0].placement is toy and model[2].placement.name == "local"
    # the base is sampled first (the default sample_weight brings the weight to an owner), then truncated and wrapped
    assert toy.calls == [("read_on_owner", "0"), ("truncate", "0"), ("wrap", "0")]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # ΔW ≠ 0: the load below must carry real values
    toy.calls.clear()
    save_adapter(model, tmp_path / "adapter")
    assert toy.calls == [("gather", f"0.{n}") for n in ("lora_A.weight", "lora_B.weight", "lora_diag")]
    fresh = toy_model()
    toy.calls.clear()
    load_adapter(fresh, tmp_path / "adapter", show_progress=False)
    assert [c for c in toy.calls if c[0] == "load"] == [("load", f"0.{n}") for n in
                                                         ("lora_A.weight", "lora_B.weight", "lora_diag")]
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert set(gathered_adapter_state(fresh)) == set(gathered_adapter_state(model))


def test_the_modules_that_name_concrete_placements():
    """Who must change when a placement is added: the registry (its one line) and the backends that build such a
    model (training/: the backends and the Megatron model builder, which exposes fused linears' projections;
    integrations/); the placements package itself. Nothing else."""
    concrete = {"kasa_ds.placements.local", "kasa_ds.placements.zero3", "kasa_ds.placements.tp",
                "kasa_ds.placements.scheduled"}
    naming = set()
    for path in (REPO / "kasa_ds").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if me.startswith("kasa_ds.placements") or me == "kasa_ds.compat":
            continue
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(anchor + [node.module or ""]).strip(".")
                if any(target == c or target.startswith(c + ".") for c in concrete):
                    naming.add(me)
    assert naming == {"kasa_ds.registry", "kasa_ds.training.backends", "kasa_ds.training.megatron_model",
                      "kasa_ds.integrations.transformers"}, naming
