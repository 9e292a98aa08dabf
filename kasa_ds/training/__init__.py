"""The recipe library: config, data, models, checkpoints, metrics, preemption, precision, memory planner, backends,
and the :class:`~kasa_ds.training.recipe.Recipe` object that launch/train.py runs."""
