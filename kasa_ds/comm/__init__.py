"""Communication: processes (launcher rank, process group, barriers), owner collectives, the owner schedule, and
megatron-style tensor-parallel mappings. Used by the placements, the recipe, the Megatron road and the tools."""
