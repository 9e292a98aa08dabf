"""Communication building blocks: rank queries and owner collectives, the owner schedule, megatron-style mappings."""
