"""scx_models: the full-model runs that check SCX end to end (DESIGN §6) and their results.

Built on the library: the models, corpus, engines and perplexity come from :mod:`scx_ref.zoo` (the one
registry of model names); this package adds the long runs that write ``models/results/*.json``
(``python -m scx_models.runs``) and the README tables rendered from them (``python -m scx_models.report``).
"""
