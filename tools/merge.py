#!/usr/bin/env python
"""Merge a KaSA adapter into its base checkpoint, streamed tensor by tensor (the ``kasa-merge`` command).

    python tools/merge.py --base BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR [--dtype bfloat16]
                          [--svd-cache CACHE_DIR] [--max-shard-gb 5]

The code is kasa_ds.io.merged_checkpoint (the merge) and kasa_ds.commands.merge (this command line).
"""

from kasa_ds.commands.merge import main, merge  # noqa: F401 (merge: the function this tool always offered)

if __name__ == "__main__":
    main()
