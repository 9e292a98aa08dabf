"""Shared between tests/test_zero3.py and tests/distributed/zero3_worker.py (same config, same randomization)."""

import torch

CONFIG_KW = dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], beta=0.01, gamma=0.1, init_seed=3)
ADAPTER_SEED = 11
TOKENS_SEED = 5


def randomize(model, seed: int) -> None:
    """Non-zero ΔU (else ΔW = 0 and the logits test nothing), same values on every rank and in one process."""
    from kasa_ds import kasa_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in kasa_layers(model):
            for _, p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
