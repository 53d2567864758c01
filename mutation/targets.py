"""What ``nox -s mutation`` mutates and which fast tests run against each module's mutants.

Each target is one mutmut run in its own scratch copy of the repository (``build/mutation/<name>``), so
every module gets its own test selection: only the tests that exercise it, never the slow full-model or
CLI-model checks. mutmut then runs, for each mutant, only the selected tests that call the mutated function.

``explained``: every surviving mutant of this module must be killed by a test or listed in
:mod:`mutation.annotations` as equivalent (the run fails otherwise). It can be turned off for a module that
is being rewritten: its survivors are then reported but not triaged. Every target has it on.

``deselect``: selected tests left out for time (a module's mutants run its covering tests once each, so one
slow test costs minutes); each is named with the faster test that exercises the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    tests: tuple[str, ...]
    deselect: tuple[str, ...] = ()
    explained: bool = True


TARGETS: tuple[Target, ...] = (
    Target(
        "keys",
        "scx_ref/keys.py",
        ("tests/test_keys.py", "tests/test_keys_vectors.py", "properties/test_keys.py"),
    ),
    Target(
        "dp_mechanisms",
        "scx_ref/dp/mechanisms.py",
        ("tests/test_dp.py", "tests/test_dp_accounting.py", "properties/test_dp_properties.py"),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "dp_accountants",
        "scx_ref/dp/accountants.py",
        ("tests/test_dp.py", "tests/test_dp_accounting.py", "properties/test_dp_properties.py"),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "dp_permutation",
        "scx_ref/dp/permutation.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_args.py",
            "tests/test_dp_order_bits_and_sensitivities.py",
            "tests/test_dp_permutation_mutants.py",
        ),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "transforms",
        "scx_ref/transforms.py",
        (
            "properties/test_transforms.py",
            "properties/test_torch_parity.py",
            "tests/test_proof_links.py",
            "tests/test_errors.py",
            "tests/test_transform_checks.py",
            "tests/test_keys_vectors.py",
        ),
    ),
    Target(
        "server",
        "scx_ref/protocol/server.py",
        (
            "tests/test_server_checks.py",
            "tests/test_protocol_errors.py",
            "tests/test_limits.py",
            "tests/test_cost.py",
            "tests/test_other_clients.py",
            "tests/test_races.py",
            "tests/test_hardened.py",
            "tests/test_batching.py",
            "properties/test_protocol.py",
        ),
        deselect=(
            # ~1 min on real presets; tests/test_server_checks.py's
            # test_handle_batch_equals_handle_for_several_sessions runs the same handle_batch paths (several
            # sessions, one tile, two middle-block groups) in under a second
            "tests/test_batching.py::test_batched_middle_blocks_equal_unbatched_bit_for_bit",
            # 20 s: the dense variant checks the same wide (float64) server paths
            "tests/test_hardened.py::test_float32_and_wide_blinding[moe]",
            # 80 configurations, 20 s: test_hardened_preset_is_exact_and_its_view_has_no_clear_stage runs
            # client attention and the server's gen_o / gen_head; properties/test_protocol.py the rest
            "tests/test_hardened.py::test_every_option_is_exact_in_float64",
            # the torch backend's own thread safety, not the server's
            "tests/test_races.py::test_torch_rope_table_grows_safely_under_concurrent_calls",
            "tests/test_races.py::test_concurrent_sessions_with_verification_share_one_sketch_cache[torch]",
        ),
    ),
    Target(
        "limits",
        "scx_ref/protocol/limits.py",
        ("tests/test_limit_fields.py", "tests/test_limits.py", "tests/test_protocol_errors.py"),
    ),
    Target(
        "bench_stats",
        "scx_ref/commands/bench_stats.py",
        (
            "tests/test_bench_stats.py",
            "tests/test_bench_median_intervals.py",
            "tests/test_bench_stats_mutants.py",
        ),
    ),
    Target(
        "decoys",
        "scx_ref/protocol/decoys.py",
        (
            "tests/test_prepare_decoys_pool.py",
            "tests/test_unigram_decoys.py",
            "tests/test_unigram_wiring.py",
            "tests/test_decoy_recurrence.py",
            "tests/test_protocol_parts_inputs.py",
            "tests/test_zoo_engine_decoys.py",
            "tests/test_decoys_mutants.py",
        ),
        deselect=(
            # 5 s (an SCXModel on a tiny model): tests/test_unigram_decoys.py's
            # test_the_client_draws_its_pool_text_from_the_unigram checks the same unigram draw of the pool
            "tests/test_unigram_wiring.py::test_scx_model_draws_its_pool_text_from_the_unigram_given",
            # not re-entrant: its prefills open sessions of a fixed nonce on the module's cached Server, so
            # mutmut's second in-process run (stats, then the clean run) is refused "nonce already opened";
            # test_a_secret_pool_moves_to_its_next_epoch_when_its_rows_run_out checks the same epoch move
            "tests/test_decoy_recurrence.py::test_precompute_builds_the_next_epoch_ahead_of_the_request",
        ),
    ),
    Target(
        "attack_stats",
        "scx_ref/attacks/stats.py",
        (
            "tests/test_attack_stats_and_report.py",
            "tests/test_attack_measures.py",
            "tests/test_attack_api_args.py",
            "tests/test_frontier.py",
            "tests/test_attack_stats_mutants.py",
        ),
    ),
)
