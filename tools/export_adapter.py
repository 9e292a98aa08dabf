#!/usr/bin/env python
"""Export the PEFT-format KaSA adapter of a run or checkpoint, or its exact rank-2r LoRA (``kasa-export``).

    python tools/export_adapter.py outputs/run [--out my-adapter]
    python tools/export_adapter.py outputs/run --as-lora --base /models/llama --out my-lora

The code is kasa_ds.commands.export.
"""

from kasa_ds.commands.export import export, export_lora, main  # noqa: F401 (the functions this tool always offered)

if __name__ == "__main__":
    main()
