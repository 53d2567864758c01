"""The `scx` subcommands that run a model (bench, bench-serve, generate, ppl, serve, verify: one module each,
dispatched by :mod:`scx_ref.cli`) and what they share (``_args``: argument types; ``bench_stats``: the bench's
intervals). `scx dp` and `scx attack` live beside their libraries (:mod:`scx_ref.dp.cli`,
:mod:`scx_ref.attacks.cli`)."""
