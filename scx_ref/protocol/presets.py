"""Named SCX configurations (DESIGN §5.7): the one list that ``scx attack``, ``scx bench``, ``scx dp`` and
the frontier read, from the paper's default to the hardened configurations.

A preset is a function of the model's block count (``no sharing`` means every block is a guard block, so
its l_s depends on the model; no guard is larger than the model, so a preset's l_s and l_e are the guard
sizes the protocol and the DP budget run — :func:`~scx_ref.protocol.config.guard_blocks` clamps larger
ones). Each one says in ``protects`` what it is *designed* to hide; the frontier (``scx attack``,
:mod:`scx_ref.attacks.frontier`) measures whether it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .._checks import check_int
from ..errors import ConfigError
from .config import SCXConfig

__all__ = ["PAPER_CONFIG", "PRESETS", "Preset", "preset", "preset_names"]


@dataclass(frozen=True)
class Preset:
    """A named configuration: ``build(n_layers)`` gives its :class:`SCXConfig`."""

    name: str
    summary: str
    protects: str
    build: Callable[[int], SCXConfig]

    def config(self, n_layers: int) -> SCXConfig:
        """The configuration on a model of ``n_layers`` blocks (an integer >= 1, Python or numpy, not a
        bool; ConfigError naming ``n_layers`` otherwise)."""
        n_layers = check_int(n_layers, "n_layers", error=ConfigError)
        if n_layers < 1:
            raise ConfigError(f"n_layers: a model has at least one block, got {n_layers}")
        return self.build(n_layers)


#: The paper's configuration, its generation flow included: the first guard blocks' attention of each
#: step on the server under a one-time P (``gen_attention="server"``; SCXConfig's default computes it on
#: the client). The presets were measured so (README, models/results/FRONTIER.md).
#: The attack harness's mechanism ablation starts from it too (one home for "the paper's configuration").
PAPER_CONFIG = SCXConfig(level="paper", r1=4, r2=4, beta=5.0, gen_attention="server")
_BASE = PAPER_CONFIG


def _client_attention(cfg: SCXConfig) -> SCXConfig:
    """``cfg`` with every guard block's attention the client's, at prefill and in generation."""
    return replace(cfg, attention="client", gen_attention="client")


def _no_share(cfg: SCXConfig, n_layers: int) -> SCXConfig:
    """Every block a guard block: l_e as given, l_s the rest (at least 1)."""
    return replace(cfg, l_s=max(n_layers - cfg.l_e, 1))


def _hardened(beta: float, n_layers: int) -> SCXConfig:
    """The hardened configuration at ``beta`` on an ``n_layers`` model: level blind, the guard blocks'
    attention the client's, W_o and the LM head blinded at each step, every block a guard block. (A
    function the presets call, not a closure made at import: what runs is what ``mutation.run`` mutates.)"""
    cfg = _client_attention(replace(_BASE, level="blind", beta=beta, gen_linear="server"))
    return _no_share(cfg, n_layers)


PRESETS: tuple[Preset, ...] = (
    Preset(
        "permute",
        "level permute, decoys r = 4, guards 1/1",
        "row order and head-dim order only; no noise anywhere",
        lambda L: replace(_BASE, level="permute"),
    ),
    Preset(
        "paper",
        "level paper β = 5, guards 1/1 (the paper's configuration)",
        "block 1's QKV rows (noise) and the guard blocks' caches (locked)",
        lambda L: _BASE,
    ),
    Preset(
        "paper-g2",
        "level paper β = 5, guards 2/2",
        "as paper, two guard blocks at each end",
        # at most the model's blocks (the sizes run: a larger guard would be clamped to the model)
        lambda L: replace(_BASE, l_s=min(2, L), l_e=min(2, L)),
    ),
    Preset(
        "blind",
        "level blind β = 5, guards 1/1",
        "every linear stage's rows (noise); attention stage and shared caches still clear",
        lambda L: replace(_BASE, level="blind"),
    ),
    Preset(
        "client-attn",
        "level blind β = 5, guards 1/1, client-side guard attention",
        "as blind, and the guard blocks' attention never leaves the client",
        lambda L: _client_attention(replace(_BASE, level="blind")),
    ),
    Preset(
        "client-attn-g4",
        "level blind β = 5, guards 4/4, client-side guard attention",
        "as client-attn with four guard blocks at each end (22 of 30 blocks still key-shared on SmolLM2)",
        lambda L: _client_attention(replace(_BASE, level="blind", l_s=min(4, L), l_e=min(4, L))),
    ),
    Preset(
        "no-share",
        "level blind β = 5, every block a guard, server-side attention",
        "as blind, and no key sharing: the server never holds a valid cache",
        lambda L: _no_share(replace(_BASE, level="blind"), L),
    ),
    Preset(
        "hardened",
        "level blind β = 5, every block a guard, client attention, W_o and LM head blinded each step",
        "every message the server receives is one-time blinded (DESIGN §5.7)",
        lambda L: _hardened(5.0, L),
    ),
    Preset(
        "hardened-b20",
        "hardened with β = 20 (blinded stages in float64)",
        "as hardened, 4× the noise",
        lambda L: _hardened(20.0, L),
    ),
    Preset(
        "hardened-b100",
        "hardened with β = 100 (blinded stages in float64)",
        "as hardened, 20× the noise",
        lambda L: _hardened(100.0, L),
    ),
)


def preset_names() -> tuple[str, ...]:
    """The names of :data:`PRESETS`, in order (cheapest, weakest first)."""
    return tuple(p.name for p in PRESETS)


def preset(name: str) -> Preset:
    """The preset called ``name``; ConfigError for an unknown name."""
    for p in PRESETS:
        if p.name == name:
            return p
    raise ConfigError(f"unknown configuration {name!r}; choose one of {', '.join(preset_names())}")
