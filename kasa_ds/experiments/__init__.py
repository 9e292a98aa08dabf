"""The evidence tools as a package, one job per module: ``socialiqa`` (data), ``methods`` (which adapter each compared
method puts on a model), ``split_model`` (cached frozen prefix for CPU runs), ``runs`` (training runs, resumable),
``stats`` (paired tests, selection rule), ``report`` and ``plots``; ``compare_llm`` and ``compare_methods`` are the two
runners that ``tools/compare_llm.py`` and ``tools/compare_methods.py`` call."""
