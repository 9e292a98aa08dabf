"""Where a base weight lives across ranks: whole here (:mod:`.local`), ZeRO-3 flat shards (:mod:`.zero3`),
tensor-parallel row/column shards (:mod:`.tp`)."""
