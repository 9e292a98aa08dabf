"""KaSA inside other training stacks: the transformers Trainer and its subclasses (:mod:`.transformers`)."""
