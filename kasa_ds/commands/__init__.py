"""The console commands (``[project.scripts]`` in pyproject.toml): each module parses one command line and calls the
library. ``launch/train.py`` and ``tools/*.py`` are thin wrappers over them with the same command lines."""
