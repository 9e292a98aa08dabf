#!/usr/bin/env python
"""Precompute the KaSA truncation of a HF checkpoint once (the ``kasa-precompute-svd`` command; one process,
torchrun or mpirun); the recipe (kasa.svd_cache) and tools/merge.py then skip the SVDs.

    python tools/precompute_svd.py --model DIR --kasa-r 16 --targets q_proj,k_proj,v_proj,o_proj --out CACHE

The code is kasa_ds.io.svd_cache (write_svd_cache) and kasa_ds.commands.precompute_svd (this command line).
"""

from kasa_ds.commands.precompute_svd import main

if __name__ == "__main__":
    main()
