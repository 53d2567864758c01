"""What ``nox -s mutation`` mutates and which fast tests run against each module's mutants.

Each target is one mutmut run in its own scratch copy of the repository (``build/mutation/<name>``), so
every module gets its own test selection: only the tests that exercise it, never the slow full-model or
CLI-model checks. mutmut then runs, for each mutant, only the selected tests that call the mutated function.

``explained``: every surviving mutant of this module must be killed by a test or listed in
:mod:`mutation.annotations` as equivalent (the run fails otherwise). It can be turned off for a module that
is being rewritten: its survivors are then reported but not triaged. Every target has it on.

``deselect``: selected tests left out for time (a module's mutants run its covering tests once each, so one
slow test costs minutes); each is named with the faster test that exercises the same code.

``isolation``: mutmut's ``process_isolation``, the process each mutant's worker is forked from. ``fork`` (the
default): mutmut's own process, which has run the whole selection to learn which tests call which function.
``forkserver``: a clean process that has only imported and collected the tests. A module whose tests start
gRPC needs it: a process forked after gRPC has run aborts in gRPC's poller or hangs (stop 84, measured on an
in-process ``scx serve``), while one forked from a process that has only imported gRPC serves and connects.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    """One mutmut run: the module at ``path`` and the tests that run against its mutants."""

    name: str
    path: str
    tests: tuple[str, ...]
    deselect: tuple[str, ...] = ()
    explained: bool = True
    isolation: str = "fork"

    def __post_init__(self) -> None:
        if self.isolation not in ("fork", "forkserver"):
            raise ValueError(f"{self.name}: isolation must be 'fork' or 'forkserver', got {self.isolation!r}")


TARGETS: tuple[Target, ...] = (
    Target(
        "keys",
        "scx_ref/keys.py",
        (
            "tests/test_keys.py",
            "tests/test_keys_vectors.py",
            "properties/test_keys.py",
            "tests/test_keys_mutants.py",
        ),
    ),
    Target(
        "dp_mechanisms",
        "scx_ref/dp/mechanisms.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_accounting.py",
            "properties/test_dp_properties.py",
            "tests/test_dp_mechanisms_mutants.py",
        ),
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "dp_accountants",
        "scx_ref/dp/accountants.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_accounting.py",
            "properties/test_dp_properties.py",
            "tests/test_pld_guard.py",
            "tests/test_dp_model_k_guard.py",
            "tests/test_dp_composition_edges.py",
            "tests/test_dp_accountants_mutants.py",
        ),
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
            "tests/test_transforms_keys_edges.py",
            "tests/test_transform_args.py",
            "tests/test_transforms_and_host_pool_inputs.py",
            "tests/test_reference_transforms_audit.py",
            "tests/test_proofs_statements_are_the_code.py",
            "tests/test_design_statements.py",
            "tests/test_design_conformance.py",
            "tests/test_sampling_generator_and_half_norms.py",
            "properties/test_head_layout.py",
            "properties/test_fused.py",
            "tests/test_transforms_mutants.py",
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
    Target(
        "verify",
        "scx_ref/protocol/verify.py",
        # left out whole: tests/test_verify_soundness_sweep.py (74 s; its MoE cases 4–7 s each) — the
        # adversarial, forgery-audit and memory-safety suites alter the same replies on the tiny models —
        # and tests/test_protocol_hostile_peer.py (62 s: the client's recovery after refusals)
        (
            "tests/test_verify.py",
            "tests/test_verify_forgery_audit.py",
            "tests/test_verify_memory_safety.py",
            "tests/test_verify_degenerate_rows.py",
            "tests/test_verify_honest_edges.py",
            "tests/test_adversarial_server.py",
            "tests/test_real_checks.py",
            "properties/test_verifier.py",
            "properties/test_verifier_kernels.py",
            "tests/test_verify_lock_args.py",
            "tests/test_verify_shape_errors.py",
            # the refusal of a changed reply names its stage and block, the LM head's its stage alone
            "tests/test_client_mutants.py::test_a_changed_reply_is_refused_by_the_check_of_its_stage_and_block",
            "tests/test_verify_mutants.py",
        ),
    ),
    Target(
        "codec",
        "scx_ref/service/codec.py",
        (
            "tests/test_wire_codec_audit.py",
            "tests/test_codec_frames_and_spawn.py",
            "tests/test_service_hostile.py",
            "tests/test_service_slow_reader_and_dtypes.py",
            "tests/test_serve_options_greeting_bounds.py",
            "properties/test_codec.py",
            "properties/test_strategy_sharing_and_teeth.py",
            "tests/test_codec_mutants.py",
        ),
        # left out whole: the gRPC service and RemoteTransport suites (tests/test_serve.py,
        # tests/test_remote_transport_*.py, tests/test_service_eviction_and_shutdown.py) run the codec over
        # real streams, seconds per test; the files below decode and encode the same frames in-process (and
        # tests/test_cli_commands_audit.py's greeting bound is test_serve_options_greeting_bounds.py's)
        deselect=(
            # spawn a server process (1 s and 7 s) and test the launcher, not the codec
            "tests/test_codec_frames_and_spawn.py::test_a_server_that_cannot_start_says_why",
            "tests/test_codec_frames_and_spawn.py::test_health_and_metrics_of_a_server_without_ops",
            # an in-process gRPC SCXService or hostile gRPC server per test (0.2-4 s each, run for every
            # mutant the stream's encode/decode reaches): the frames of
            # test_crafted_frames_get_wire_errors_not_internal_errors are decoded directly by
            # test_structural_mutations_of_valid_frames_decode_or_raise_wire_error and the codec tests above
            # it; test_an_absurd_reply_shape_is_a_wire_error's by
            # test_an_empty_array_with_absurd_dimensions_is_a_wire_error
            "tests/test_service_hostile.py::test_a_client_gone_mid_open_leaves_no_session_behind",
            "tests/test_service_hostile.py::test_a_client_gone_mid_stage_stalls_no_other_stream",
            "tests/test_service_hostile.py::test_crafted_frames_get_wire_errors_not_internal_errors",
            "tests/test_service_hostile.py::test_stalled_raw_connections_block_no_one",
            "tests/test_service_hostile.py::test_a_malformed_greeting_drops_the_stream",
            "tests/test_service_hostile.py::test_an_absurd_reply_shape_is_a_wire_error",
            "tests/test_service_hostile.py::test_a_reply_for_another_message_is_refused",
            "tests/test_service_hostile.py::test_an_oversize_reply_is_a_service_error",
            "tests/test_service_hostile.py::test_an_error_frame_naming_a_class_it_cannot_build",
            # gRPC streams through a proxy (0.3-1.6 s each): every wire dtype round-trips in
            # test_every_wire_dtype_and_shape_round_trips_exactly; the names are checked by (kept)
            # test_a_trailing_newline_in_a_name_or_session_is_a_wire_error
            "tests/test_service_slow_reader_and_dtypes.py::test_a_client_that_never_reads_its_replies",
            "tests/test_service_slow_reader_and_dtypes.py::test_the_proxy_passes_an_honest_session_through",
            "tests/test_service_slow_reader_and_dtypes.py::test_a_reply_in_a_dtype_coarser_than_the_sessions",
        ),
    ),
    Target(
        "keyring",
        "scx_ref/protocol/keyring.py",
        (
            "tests/test_messages_keyring_view.py",
            "tests/test_protocol_parts_inputs.py",
            "tests/test_release_plan.py",
            "tests/test_design_statements.py",
            "tests/test_precompute.py",
            "tests/test_keyring_plan_mutants.py",
        ),
        # left out whole: the verifier's suites (tests/test_verify*.py) draw verify_mix / verify_rows /
        # verify_lock inside full sessions, seconds per test; tests/test_keyring_plan_mutants.py checks
        # those draws directly, test_every_key_of_a_request_has_a_label_of_its_own their labels
        deselect=(
            # 24 s and 2.5 s, decoys and the meter, not the keyring: the keyring tests of the file are kept
            "tests/test_protocol_parts_inputs.py::test_no_message_past_block_one_repeats_a_row",
            "tests/test_protocol_parts_inputs.py::test_local_transport_meters_the_wire_bytes",
        ),
    ),
    Target(
        "plan",
        "scx_ref/protocol/plan.py",
        (
            "tests/test_release_plan.py",
            "tests/test_plan_presets_cost_config.py",
            "tests/test_protocol_plan_config_audit.py",
            "tests/test_design_statements.py",
            "tests/test_dp_request_budget.py",
            "tests/test_frontier.py::test_exposures_of_the_paper_and_the_hardened_configuration",
            "tests/test_frontier.py::test_hardened_plan_blinds_every_generation_linear_stage",
            "tests/test_client_lifecycle.py::test_presets_and_plans_refuse_what_is_not_a_model_or_config",
            "tests/test_keyring_plan_mutants.py",
        ),
        # the rest of tests/test_frontier.py runs attacks on real sessions (a 15 s fixture): the two exposure
        # tests above are its plan checks; tests/test_dp_key_sharing.py (6 s, plan.shared) is covered by
        # test_release_plan.py's shared-release checks
        deselect=(
            # 9 s: test_budget_composes_exactly_the_plan_releases_for_every_preset composes the same releases
            "tests/test_dp_request_budget.py::test_budget_pld_agrees_with_dp_accounting_composition",
        ),
    ),
    Target(
        "prepare",
        "scx_ref/protocol/prepare.py",
        (
            "tests/test_precompute.py",
            "tests/test_precompute_failure_state.py",
            "tests/test_prepare_decoys_pool.py",
            "tests/test_prepare_pool_keyring_audit.py",
            "tests/test_keys_nonces_and_pool.py",
            "tests/test_client_session_end_masks.py",
            "tests/test_prepare_mutants.py",
        ),
    ),
    Target(
        "pool",
        "scx_ref/protocol/pool.py",
        (
            "tests/test_keys_nonces_and_pool.py",
            "tests/test_prepare_decoys_pool.py",
            "tests/test_prepare_pool_keyring_audit.py",
            "tests/test_precompute.py",
            "tests/test_pool_mutants.py",
        ),
    ),
    Target(
        "config",
        "scx_ref/protocol/config.py",
        (
            "tests/test_plan_presets_cost_config.py",
            "tests/test_protocol_plan_config_audit.py",
            "tests/test_beta_precision.py",
            "tests/test_blind_dtype_auto.py",
            "tests/test_api_errors.py",
            "tests/test_wide_default_s70.py",
            "tests/test_config_mutants.py",
        ),
        deselect=(
            # 6-10 s each: a CLI subprocess prints the warning; the message itself is
            # test_beta_precision.py's and test_config_mutants.py's, the printing is not config.py's
            "tests/test_blind_dtype_auto.py::test_scx_verify_prints_the_warning_once_on_its_own_line",
            "tests/test_blind_dtype_auto.py::test_scx_ppl_prints_the_warning_on_its_own_line",
            "tests/test_blind_dtype_auto.py::test_the_sweep_prints_the_warning_on_its_own_line",
            # 6 s: scx bench's pool report; test_wide_replies_are_checked runs the same wide sessions
            "tests/test_wide_default_s70.py::test_scx_bench_pool_reports_float64_mask_bytes",
            # mutmut's trampoline is one more frame between the caller and warn_precision, so the frame a
            # stacklevel names is another under mutation (test_config_mutants.py checks the level passed on)
            "tests/test_beta_precision.py::test_the_warning_points_at_the_caller_stacklevel_frames_up",
        ),
    ),
    Target(
        "transport",
        "scx_ref/protocol/transport.py",
        (
            "tests/test_protocol_view.py",
            "tests/test_messages_keyring_view.py",
            "tests/test_cost.py",
            "tests/test_frontier_verdicts_and_views.py",
            "tests/test_server_request_snapshot.py",
            "tests/test_protocol_parts_inputs.py::test_local_transport_meters_the_wire_bytes",
            "tests/test_transport_mutants.py",
        ),
    ),
    Target(
        "cost",
        "scx_ref/protocol/cost.py",
        (
            "tests/test_cost.py",
            "tests/test_plan_presets_cost_config.py",
            "tests/test_protocol_plan_config_audit.py",
            "tests/test_client_lifecycle.py",
            "tests/test_cost_presets_mutants.py",
        ),
    ),
    Target(
        "presets",
        "scx_ref/protocol/presets.py",
        (
            "tests/test_plan_presets_cost_config.py",
            "tests/test_protocol_plan_config_audit.py",
            "tests/test_dp_request_budget.py",
            "tests/test_frontier_results_and_dp_inf.py",
            "tests/test_cost_presets_mutants.py",
        ),
        deselect=(
            # 6 s: test_budget_composes_exactly_the_plan_releases_for_every_preset builds every preset too
            "tests/test_dp_request_budget.py::test_budget_pld_agrees_with_dp_accounting_composition",
        ),
    ),
    Target(
        "mlp",
        "scx_ref/protocol/mlp.py",
        (
            "properties/test_protocol_edges_and_routing.py",
            "tests/test_verify_honest_edges.py",
            "tests/test_server_checks.py",
        ),
    ),
    Target(
        "checks",
        "scx_ref/_checks.py",
        (
            "tests/test_shared_checks.py",
            "tests/test_real_checks.py",
            "tests/test_foundation_audit.py",
            "tests/test_shared_helpers_inputs.py",
            "tests/test_token_ids.py",
            "tests/test_checks_mutants.py",
        ),
    ),
    Target(
        "files",
        "scx_ref/_files.py",
        ("tests/test_files_whole.py", "tests/test_result_json.py", "tests/test_files_mutants.py"),
    ),
    Target(
        "ops",
        "scx_ref/ops.py",
        (
            "properties/test_ops.py",
            "tests/test_reference_args.py",
            "tests/test_reference_transforms_audit.py",
            "tests/test_ops_sampling_keys_audit.py",
            "tests/test_foundation_audit.py",
            "tests/test_silu_error.py",
            "tests/test_ops_mutants.py",
        ),
        # without tests/test_ops_mutants.py, 282 of the 817 mutants of stop 77's source survive (stop 76 began
        # the triage, stop 77 finished it: attention, the causal mask, the routing's softmax now ops.softmax)
    ),
    Target(
        "sampling",
        "scx_ref/sampling.py",
        (
            "tests/test_sampling.py",
            "tests/test_sampling_generator_and_half_norms.py",
            "tests/test_client_generate_edges.py",
            "tests/test_hf_generate_api.py",
            "tests/test_ops_sampling_keys_audit.py",
            "tests/test_hf_audit_s70.py",
            "tests/test_hf_inputs.py",
            "tests/test_zoo_keys_api_args.py",
            "tests/test_reference_args.py",
            "tests/test_real_checks.py",
            "tests/test_sampling_mutants.py",
        ),
        # its file and line: mutmut's trampoline adds a frame (the level passed on is checked in
        # tests/test_sampling_mutants.py)
        deselect=(
            "tests/test_hf_generate_api.py::"
            "test_sampling_options_with_greedy_decoding_warn_at_the_line_that_calls_generate",
        ),
    ),
    Target(
        "dp_validate",
        "scx_ref/dp/_validate.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_args.py",
            "tests/test_dp_audit.py",
            "tests/test_dp_composition_edges.py",
            "tests/test_dp_request_budget.py",
            "tests/test_pld_guard.py",
            "tests/test_dp_model_k_guard.py",
            "tests/test_real_checks.py",
            "properties/test_dp_properties.py",
            "tests/test_dp_validate_mutants.py",
        ),
        # the model-mode CLI runs the same checks as tests/test_dp.py's budget tests; the torch diameter
        # is the sensitivity module's
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "dp_sensitivity",
        "scx_ref/dp/sensitivity.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_args.py",
            "tests/test_dp_order_bits_and_sensitivities.py",
            "tests/test_dp_composition_edges.py",
            "tests/test_dp_audit.py",
            "tests/test_dp_request_budget.py",
            "tests/test_proofs_statements_are_the_code.py",
            "tests/test_proofs_catch_mutants.py",
            "tests/test_plan_presets_cost_config.py",
            "tests/test_release_plan.py",
            "properties/test_dp_properties.py",
            "properties/test_rmsnorm_bound_and_row_indices.py",
            "tests/test_dp_sensitivity_mutants.py",
        ),
        # the model-mode CLI computes the same model_sensitivities as
        # tests/test_dp.py::test_model_sensitivities_tiny
        deselect=("tests/test_dp.py::test_cli_model_mode_json",),
    ),
    Target(
        "dp_budget",
        "scx_ref/dp/budget.py",
        (
            "tests/test_dp.py",
            "tests/test_dp_args.py",
            "tests/test_dp_audit.py",
            "tests/test_dp_composition_edges.py",
            "tests/test_dp_key_sharing.py",
            "tests/test_dp_request_budget.py",
            "tests/test_dp_budget_mutants.py",
        ),
        # the model-mode CLI composes the same request_budget as tests/test_dp.py's budget tests; the torch
        # diameter is the sensitivity module's
        deselect=(
            "tests/test_dp.py::test_cli_model_mode_json",
            "tests/test_dp.py::test_l1_diameter_exact[torch]",
        ),
    ),
    Target(
        "reference",
        "scx_ref/reference.py",
        (
            "tests/test_reference.py",
            "tests/test_reference_args.py",
            "tests/test_reference_runner_and_hf.py",
            "tests/test_reference_transforms_audit.py",
            "tests/test_weights_and_reference_block_inputs.py",
            "tests/test_forward_hf_edges.py",
            "tests/test_hf.py",
            "tests/test_reference_mutants.py",
        ),
        # 7.5 s: the eager variant runs the same Mixtral reference against generate
        deselect=("tests/test_hf.py::test_scx_greedy_generation_equals_hf_generate[mixtral-sdpa]",),
    ),
    Target(
        "forward",
        "scx_ref/forward.py",
        (
            "tests/test_forward_ops_arrays_inputs.py",
            "tests/test_forward_hf_edges.py",
            "tests/test_reference_runner_and_hf.py",
            "tests/test_weights_and_reference_block_inputs.py",
            "tests/test_nonfinite_model.py",
            "properties/test_torch_parity.py",
            "tests/test_forward_mutants.py",
            "tests/test_is_backend.py",
        ),
    ),
    Target(
        "arrays",
        "scx_ref/arrays.py",
        (
            "tests/test_backend_api_args.py",
            "tests/test_backends_broadcast_and_rmsnorm_range.py",
            "tests/test_backends_edge_inputs_agree.py",
            "tests/test_backends_refusals_and_kernel_chunks.py",
            "tests/test_forward_ops_arrays_inputs.py",
            "tests/test_foundation_audit.py",
            "tests/test_shared_helpers_inputs.py",
            "tests/test_protocol_parts_inputs.py",
            "tests/test_transform_args.py",
            "tests/test_transforms_and_host_pool_inputs.py",
            "tests/test_torch_unsigned_index.py",
            "tests/test_followups_s69.py",
            "tests/test_leftovers_protocol_backends.py",
            "tests/test_torch_backend.py",
            "properties/test_transforms.py",
            "tests/test_arrays_mutants.py",
        ),
        deselect=(
            # 8-70 s each: whole SCX prefills on both backends, which every gather's mutant would run; the
            # gathers, sums and in-place permutations they call are the selected files' direct tests
            "tests/test_torch_backend.py::test_numpy_and_torch_scx_agree_on_the_same_keys",
            # 12 s: every torch dtype's stages, fused and eager, for the global state they leave; the same
            # calls' results are checked by tests/test_backends_edge_inputs_agree.py
            "tests/test_backend_api_args.py::test_backends_leave_global_state_alone",
        ),
    ),
    Target(
        "backend_base",
        "scx_ref/backends/base.py",
        (
            "tests/test_is_backend.py",
            "tests/test_backend_api_args.py",
            "tests/test_backends_edge_inputs_agree.py",
            "tests/test_backends_refusals_and_kernel_chunks.py",
            "tests/test_foundation_audit.py",
            "tests/test_backend_base_mutants.py",
        ),
    ),
    Target(
        "client",
        "scx_ref/protocol/client.py",
        (
            "tests/test_client_after_errors.py",
            "tests/test_client_generate_edges.py",
            "tests/test_client_lifecycle.py",
            "tests/test_client_prefill_after_dead_link.py",
            "tests/test_client_session_end_masks.py",
            "tests/test_adversarial_server.py",
            "tests/test_precompute.py",
            "tests/test_precompute_failure_state.py",
            "tests/test_protocol_errors.py",
            "tests/test_hardened.py",
            "properties/test_protocol.py",
            "tests/test_client_mutants.py",
        ),
        deselect=(
            # 2.5 s and 1.4 s: the dense variant runs the same wide (float64) client paths
            "tests/test_hardened.py::test_float32_and_wide_blinding[moe]",
            "tests/test_hardened.py::test_float32_and_wide_blinding[qwen]",
            # 80 configurations: properties/test_protocol.py runs the levels' prefill and decode against
            # plaintext, test_hardened_preset_is_exact_and_its_view_has_no_clear_stage client attention
            "tests/test_hardened.py::test_every_option_is_exact_in_float64",
        ),
    ),
    Target(
        "service",
        "scx_ref/service/service.py",
        (
            "tests/test_service_hostile.py",
            "tests/test_service_eviction_and_shutdown.py",
            "tests/test_service_slow_reader_and_dtypes.py",
            "tests/test_service_tls_pair_message.py",
            "tests/test_serve_per_peer_cap.py",
            "tests/test_serve_options_greeting_bounds.py",
            "tests/test_server_request_snapshot.py",
            "tests/test_remote_wide_s70.py",
            "tests/test_remote_transport_hostile_server.py",
            "tests/test_remote_transport_lifecycle.py",
            "tests/test_size_caps.py",
            "tests/test_real_checks.py",
            "tests/test_cli_args.py",
            "tests/test_cli_serve.py",
            "tests/test_service_mutants.py",
        ),
        deselect=(
            # 6-7 s each: `scx bench --serve` runs its server in a subprocess, where no mutant is recorded as
            # called; the in-process service's start, refusals and shutdown are the selected files' tests
            "tests/test_cli_serve.py::test_bench_serve_warms_up_untimed_and_shows_progress",
            "tests/test_cli_serve.py::test_bench_serve_stops_its_server_when_a_run_fails",
        ),
        isolation="forkserver",
    ),
    Target(
        "remote",
        "scx_ref/service/remote.py",
        (
            "tests/test_remote_transport_hostile_server.py",
            "tests/test_remote_transport_lifecycle.py",
            "tests/test_remote_wide_s70.py",
            "tests/test_service_hostile.py",
            "tests/test_service_slow_reader_and_dtypes.py",
            "tests/test_serve_per_peer_cap.py",
            "tests/test_size_caps.py",
            "tests/test_client_prefill_after_dead_link.py",
            "tests/test_remote_mutants.py",
        ),
        isolation="forkserver",
    ),
)
