"""On-disk formats: PEFT-format adapters (:mod:`.adapter`), atomic directories (:mod:`.files`), streamed HF
safetensors checkpoints (:mod:`.hf_checkpoint`), the precomputed-truncation cache (:mod:`.svd_cache`)."""
