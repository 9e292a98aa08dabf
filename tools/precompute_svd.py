"""Precompute the KaSA truncation of a HF checkpoint once; launch/train.py (kasa.svd_cache) and tools/merge.py
reuse it and skip the SVDs.

The safetensors files are read tensor by tensor (headers first, then only the weights a rank owns); the weights are
spread over the ranks by SVD cost (kasa_ds.comm.schedule.assign_owners) and every rank writes the factors of its own
weights; the index records a digest of each weight's stored bytes, so the cache is refused for another model of the
same layout. One process, torch.distributed or MPI:

    python tools/precompute_svd.py --model DIR --kasa-r 16 --targets q_proj,k_proj,v_proj,o_proj --out CACHE
    torchrun --nproc_per_node 8 tools/precompute_svd.py --model DIR --kasa-r 16 --targets ... --out CACHE
    mpirun -np 8 python tools/precompute_svd.py ...                           (rank discovery through mpi4py)

The code is kasa_ds.io.svd_cache (write_svd_cache) and kasa_ds.commands.precompute_svd (this command line).
"""

from kasa_ds.commands.precompute_svd import main

if __name__ == "__main__":
    main()
