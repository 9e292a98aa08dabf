"""Shared between tests/placements/test_zero3.py and tests/placements/zero3_worker.py: the same config and seeds."""

CONFIG_KW = dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], beta=0.01, gamma=0.1, init_seed=3)
ADAPTER_SEED = 11
TOKENS_SEED = 5
