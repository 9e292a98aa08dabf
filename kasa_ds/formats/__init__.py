"""How a frozen base weight is stored: dense float (:mod:`.dense`) or bitsandbytes 4-bit (:mod:`.bnb4`)."""
