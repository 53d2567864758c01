"""The one list of what the harness measures (DESIGN §8): each metric's key, its title in the tables, what
it recovers and against which baseline it is judged.

``target``: ``prompt`` (the victim's prompt tokens) or ``generated`` (the tokens SCX generated for it).
``tokens``: which tokens it scores, so that its baseline scores the same ones — ``all``, ``fed`` (of a
generated target: those the decode steps carried, all but the last) or ``next`` (those an LM-head row
predicts: of a generated target all but the first; of the prompt, the prompt's tokens after the first and
then the first generated token). :attr:`Metric.baseline` names that baseline (:func:`judged_against`); a bag
attack's equal-budget prior is recorded beside it (:func:`equal_budget`).
``scoring``: ``pos`` (a token per position, right or wrong), ``bag`` (the multiset of tokens, order
ignored) — or, for the statelessness row, ``stateless`` (greedy top-1 agreement of the server's own
continuation, judged against a server that ignores the prompt). ``attack``: whether the metric is a
recovery rate an attacker achieves (False: a diagnostic such as bag precision, decoys rejected, Kendall τ).

:data:`UNTABLED` lists the keys the harness records in a setting's ``metrics`` that have no row here (so no
table or plot shows them), each with what it is — the omission stated, not silent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

__all__ = ["METRICS", "UNTABLED", "Metric", "attack_metrics", "equal_budget", "judged_against", "metric"]

_R = TypeVar("_R")


@dataclass(frozen=True)
class Metric:
    """One measured quantity of the attack harness (see the module doc)."""

    key: str
    title: str
    target: Literal["prompt", "generated"]
    scoring: Literal["pos", "bag", "stateless", "other"]
    attack: bool = True
    tokens: Literal["all", "fed", "next"] = "all"

    @property
    def baseline(self) -> str:
        """The key of the frequency-prior baseline (in a result's ``baselines``) that scores the tokens
        this metric scores: ``no_prompt_top1`` for the statelessness row; ``generated``,
        ``generated_fed`` or ``generated_next`` for a generated target; ``prompt_next_bag`` (or
        ``prompt_next_pos``) for a prompt metric of the next tokens; else ``prompt_bag`` or ``prompt_pos``
        by scoring. Each guesses as many tokens as it scores (:func:`judged_against`)."""
        if self.scoring == "stateless":
            return "no_prompt_top1"
        if self.target == "generated":
            return "generated" if self.tokens == "all" else f"generated_{self.tokens}"
        if self.tokens == "next":
            return "prompt_next_bag" if self.scoring == "bag" else "prompt_next_pos"
        return "prompt_bag" if self.scoring == "bag" else "prompt_pos"


METRICS: tuple[Metric, ...] = (
    Metric("vm_qkv1_bag_recall", "VM QKV-1 bag", "prompt", "bag"),
    Metric("vm_qkv1_map_bag_recall", "VM QKV-1 bag, MAP", "prompt", "bag"),
    Metric("vm_qkv1_bag_precision", "VM QKV-1 bag precision", "prompt", "other", attack=False),
    Metric("vm_resid1_bag_recall", "VM FFN−O-1 bag", "prompt", "bag"),
    Metric("vm_attn1_pos_acc", "VM attn-1 fingerprint", "prompt", "pos"),
    Metric("vm_cache_seq_pos_acc", "VM mid-cache seq.", "prompt", "pos"),
    Metric("head_next_bag_recall", "LM-head rows → next tokens", "prompt", "bag", tokens="next"),
    Metric("inv_cache_ridge_pos_acc", "inv cache ridge", "prompt", "pos"),
    Metric("inv_cache_mlp_pos_acc", "inv cache MLP", "prompt", "pos"),
    Metric("inv_ffn_ridge_bag_recall", "inv FFN-probe ridge", "prompt", "bag"),
    Metric("inv_ffn_mlp_bag_recall", "inv FFN-probe MLP", "prompt", "bag"),
    Metric("inv_ffn_noisy_bag_recall", "inv FFN-probe ridge, noise-aware", "prompt", "bag"),
    Metric("inv_joint_bag_recall", "inv π₁ group (FFN-1, down-1, QKV-2), joint", "prompt", "bag"),
    Metric("inv_attn_naive_pos_acc", "inv attn naive", "prompt", "pos"),
    Metric("inv_attn_sigma_rec_pos_acc", "inv attn σ-rec", "prompt", "pos"),
    Metric("inv_attn_sorted_pos_acc", "inv attn sorted", "prompt", "pos"),
    Metric("recovered_pos_acc", "best prompt guess", "prompt", "pos"),
    Metric("decoy_link_real_found", "resid. link: real rows found", "prompt", "other", attack=False),
    Metric("decoy_link_decoys_rejected", "resid. link: decoys rejected", "prompt", "other", attack=False),
    Metric(
        "decoy_link1_noised_real_found",
        "resid. link, noised block-1 QKV: real found",
        "prompt",
        "other",
        attack=False,
    ),
    Metric(
        "decoy_link1_noised_decoys_rejected",
        "resid. link, noised block-1 QKV: decoys rejected",
        "prompt",
        "other",
        attack=False,
    ),
    Metric(
        "decoy_blind_link_real_found",
        "blinded link, last block (QKV–FFN): real found",
        "prompt",
        "other",
        attack=False,
    ),
    Metric(
        "decoy_blind_link_decoys_rejected",
        "blinded link, last block (QKV–FFN): decoys rejected",
        "prompt",
        "other",
        attack=False,
    ),
    Metric("llm_reorder_exact", "LLM order exact", "prompt", "other", attack=False),
    Metric("llm_reorder_kendall_tau", "LLM Kendall τ", "prompt", "other", attack=False),
    Metric("vm_gen_seq_acc", "gen: VM gen-mid seq.", "generated", "pos", tokens="fed"),
    Metric("gen_qkv1_map_acc", "gen: QKV-1 row, MAP", "generated", "pos", tokens="fed"),
    Metric("gen_attn1_fp_acc", "gen: attn-1 fingerprint", "generated", "pos", tokens="fed"),
    Metric("gen_head_acc", "gen: LM-head row argmax", "generated", "pos", tokens="next"),
    Metric("gen_joint_acc", "gen: every row of the step, joint", "generated", "pos", tokens="fed"),
    Metric("gen_predict_acc", "gen: continue best prompt guess", "generated", "pos"),
    Metric("stateless_top1", "statelessness: server's best top-1", "generated", "stateless"),
)


#: Metric keys the harness records that :data:`METRICS` leaves out (no table row, no plot), with what each is.
UNTABLED: Mapping[str, str] = MappingProxyType(
    {
        "llm_reorder_recall": (
            "LLM reordering: the fraction of the prompt's tokens (as a multiset) among the n tokens the beam "
            "search keeps of the block-1 bag (decoys included) — a per-prompt mean, no interval or baseline, "
            "recorded since the attack was added but never given a row"
        ),
    }
)


def metric(key: str) -> Metric:
    """The metric called ``key`` (KeyError if none)."""
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(key)


def judged_against(key: str, baselines: Mapping[str, _R]) -> _R | None:
    """The record of a result's ``baselines`` that metric ``key`` is judged against (None if it holds none):
    :attr:`Metric.baseline`, the prior's guess of as many tokens as the metric scores — for a bag attack,
    n guesses, even where the attack guessed on n + r rows, decoys included. Conservative: an attacker that
    tells the real rows from the decoys (the residual link finds every decoy in un-noised blocks) needs
    only n guesses for the same hits, so an attack is "at baseline" only against the n-guess prior; the
    prior with the attack's own guess budget (:func:`equal_budget`) is shown beside it, not judged by.
    KeyError for an unknown ``key``."""
    return baselines.get(metric(key).baseline)


def equal_budget(key: str, baselines: Mapping[str, _R]) -> _R | None:
    """A bag attack's equal-budget baseline where the result holds one (the harness records it, under the
    attack's key, when it scores the attack): the prior's best bag of as many tokens as the attack guessed
    (on decoy rows too), scored against the same tokens — how much of a bag score guesses on decoy rows
    could explain. None for another metric or a result written before these were recorded. KeyError for an
    unknown ``key``."""
    return baselines.get(key) if metric(key).scoring == "bag" else None


def attack_metrics() -> tuple[Metric, ...]:
    """The metrics that are an attacker's recovery rate (judged against a baseline)."""
    return tuple(m for m in METRICS if m.attack)
