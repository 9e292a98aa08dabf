"""Shared between tests/placements/test_zero3.py and its workers (zero3_worker.py, zero3_experts_worker.py): the same
configs and seeds."""

CONFIG_KW = dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], beta=0.01, gamma=0.1, init_seed=3)
ADAPTER_SEED = 11
TOKENS_SEED = 5

EXPERTS_CONFIG_KW = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                         beta=0.01, gamma=0.1, init_seed=3)
EXPERTS_LR = 0.5  # SGD: large enough that 3 steps visibly move the loss; no AdamW (it turns rounding into ±lr steps)
EXPERTS_STEPS = 3


def adapted_base_parameters(model) -> dict:
    """{name: parameter} of every adapted base weight: each KaSA linear's, and each adapted experts module's fused
    parameters."""
    from kasa_ds.core.experts import expert_layers, parameter_name
    from kasa_ds.core.layer import kasa_layers

    out = {f"{n}.weight": m.base_layer.weight for n, m in kasa_layers(model)}
    for n, m in expert_layers(model):
        for p in m.lora:
            name = parameter_name(m.layout, p)
            out[f"{n}.{name}"] = getattr(m.base_layer, name)
    return out
