"""Privacy attacks on the server's view of SCX (DESIGN §5.4, §8).

Every attack consumes only what the server sees — its recorded
:class:`~scx_ref.protocol.transport.ServerView`, its plaintext weights, the keys the protocol shares —
plus public text disjoint from the victim prompts. Ground truth (the victim's tokens) is used only to
*score* an attack, never by it.

Modules: :mod:`.bruteforce` (search-space sizes, order enumeration), :mod:`.inversion` (ridge / MLP
inverters, σ recovery), :mod:`.llm_reorder` (likelihood beam search), :mod:`.vocab_match`
(permutation-invariant vocabulary matching, noisy block-1 rows included), :mod:`.statelessness` (paper
Table 5), :mod:`.decoy_detect` (invariant checks), :mod:`.harness` (builds every view through the real
protocol engine — :func:`~.harness.server_view`, the plaintext control and the ablations included — and
runs everything), :mod:`.report` (table and plots), :mod:`.cli` (``scx attack``). Messages and pool rows
are selected by :class:`~scx_ref.stages.Stage` members.
"""

from __future__ import annotations

__all__: list[str] = []
