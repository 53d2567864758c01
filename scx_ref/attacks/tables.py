"""The attack × setting table (markdown) of a harness or frontier result: one home for the table that the
privacy report (:mod:`.report`) and the frontier report (:mod:`.frontier`) both print."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import catalog

__all__ = ["METRICS", "check_result", "fmt", "markdown_table", "text_cell", "verdict"]

#: (metric key, title) of every measured quantity, in table order (from :mod:`.catalog`).
METRICS: tuple[tuple[str, str], ...] = tuple((m.key, m.title) for m in catalog.METRICS)
#: The keys of the attack metrics (:func:`~.catalog.attack_metrics`): those judged against a baseline.
_ATTACKS = frozenset(m.key for m in catalog.attack_metrics())


def verdict(setting: dict[str, Any], key: str) -> bool | None:
    """Whether attack ``key`` of one stored setting is at its baseline — True only where the setting's own
    numbers allow it; the one rule the table's ✓ and the frontier's "every attack at baseline" read. A
    ``false`` verdict stands (a hand-edited file, another version's: it never reads "at baseline"); an
    attack scored (``rates``) without a verdict is above it (False); a ``true`` verdict is None — no
    measurement — when the attack scored nothing (no rate, or a rate over n = 0 tokens), else it holds
    only if the rate is no higher than the upper bound of the baseline the attack is judged against
    (:func:`~.catalog.judged_against`; kept when the setting holds none). None also when there is neither
    a verdict nor a rate of an attack."""
    stored = (setting.get("at_baseline") or {}).get(key)
    r = (setting.get("rates") or {}).get(key)
    if stored is not None and not stored:
        return False
    if r is None:
        return None
    if stored is None:
        return False if key in _ATTACKS else None
    if r.get("n", 1) == 0:
        return None
    base = catalog.judged_against(key, setting.get("baselines") or {}) if key in _ATTACKS else None
    return base is None or float(r["rate"]) <= float(base["hi"])


def fmt(x: Any) -> str:
    """A table cell: – for None, else the number to two decimals (ConfigError for what is no number)."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not hasattr(x, "__float__"):
        raise ConfigError(f"a table cell must be a number or None, got {x!r}")
    return f"{float(x):.2f}"


def text_cell(x: Any) -> str:
    """``x`` as the text of one markdown table cell: a ``|`` escaped and a line break made a space, so that
    a name cannot split its cell and shift the columns after it."""
    return " ".join(str(x).splitlines()).replace("|", "\\|")


def _number(x: Any) -> bool:
    """A finite int or float (not a bool): a measured value a table can show."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_result(result: Any, full: bool = True) -> dict[str, Any]:
    """``result`` after checking it has the shape an ``scx attack --json`` result has, so that a hand-edited
    or foreign file is refused with a ConfigError naming what is wrong, not a KeyError deep in a table: an
    object whose ``settings`` are objects with a ``setting`` name and a ``metrics`` object of finite numbers
    (or null: a NaN is a broken measurement, not a cell), whose ``rates`` and ``baselines`` (when present)
    hold ``rate``, ``lo``, ``hi`` numbers in [0, 1], whose ``at_baseline`` (when present) is an object of
    true/false verdicts, whose ``statelessness`` (when present) maps each policy to an object with a ``ppl``
    (a number ≥ 0, +inf included, or the text ``"inf"``: strict JSON has no number for an infinite
    perplexity) and a ``top1`` rate in [0, 1] and whose ``per_layer`` (when present) maps each metric to an
    object of block numbers to numbers; whose ``noise_fitting`` (when present) maps numeric β texts to
    objects of the same modes' numbers (or null), ``enumeration`` (when present) maps names to numbers and
    ``search_space`` (when present) is a list of objects with ``stage``, ``layer``, ``rows``, a ``bits``
    number and (when present) an ``order_bits`` number; with ``full`` also the run's ``model``,
    ``n_prompts``, ``prompt_len``, ``n_new``, each setting's ``mechanism`` and ``config`` object (with a
    ``level`` text and ``r1``, ``r2``, ``beta``, ``l_s``, ``l_e`` numbers) and ``identity_roles`` (when
    present) a list of texts. A setting's ``cost`` and ``exactness`` (when present) are objects of numbers,
    its ``dp`` and ``exactness32`` (when present) objects or null (what the frontier table reads of them)."""
    if not isinstance(result, dict) or not isinstance(result.get("settings"), list):
        raise ConfigError("not an `scx attack --json` result: no list of settings")
    if full:
        missing = [k for k in ("model", "n_prompts", "prompt_len", "n_new") if k not in result]
        if missing:
            raise ConfigError(f"not an `scx attack --json` result: no {', '.join(missing)}")
    for i, s in enumerate(result["settings"]):
        where = f"setting {i}"
        if not isinstance(s, dict) or not isinstance(s.get("setting"), str):
            raise ConfigError(f"{where} is not an object with a setting name")
        where = f"setting {s['setting']!r}"
        need = ("metrics", "mechanism", "config") if full else ("metrics",)
        for key in need:
            if key not in s or (key != "mechanism" and not isinstance(s[key], dict)):
                raise ConfigError(f"{where} has no {key} object")
        bad = [k for k, v in s["metrics"].items() if v is not None and not _number(v)]
        if bad:
            raise ConfigError(f"{where}: metrics {bad} are not finite numbers")
        for part in ("rates", "baselines"):
            if s.get(part) is not None and not isinstance(s[part], dict):
                raise ConfigError(f"{where}: {part} is not an object")
            for key, r in (s.get(part) or {}).items():
                ok = isinstance(r, dict) and all(_number(r.get(f)) for f in ("rate", "lo", "hi"))
                if not ok or not all(0.0 <= float(r[f]) <= 1.0 for f in ("rate", "lo", "hi")):
                    raise ConfigError(f"{where}: {part}[{key!r}] is not a rate with lo, hi in [0, 1]")
        _check_setting_parts(s, where, full)
    _check_run_parts(result)
    return result


def _real(x: Any) -> bool:
    """An int or float, not a bool (inf allowed: a statelessness PPL may pass the float64 range)."""
    return not isinstance(x, bool) and isinstance(x, (int, float))


def _ppl(x: Any) -> bool:
    """A statelessness perplexity: a number ≥ 0 (+inf included: exp of a mean NLL past ~709 nats), or the
    text ``"inf"`` (how strict JSON carries +inf, as ``scx dp --json`` writes an infinite ε); not NaN."""
    return x == "inf" or (_real(x) and not math.isnan(x) and x >= 0)


def _block(key: Any) -> bool:
    """A JSON key naming a block: the decimal text of an integer >= 0."""
    return isinstance(key, str) and key.isascii() and key.isdigit()


def _beta(key: Any) -> bool:
    """A JSON key naming a noise-fitting β: the text of a finite number."""
    try:
        return isinstance(key, str) and math.isfinite(float(key))
    except ValueError:
        return False


def _check_setting_parts(s: dict[str, Any], where: str, full: bool) -> None:
    """The optional parts of one setting the tables and the report read (:func:`check_result`)."""
    for key in ("at_baseline", "dp", "exactness32"):
        if key in s and not isinstance(s[key], (dict, type(None))):
            raise ConfigError(f"{where}: {key} is not an object")
    if not all(isinstance(v, (bool, np.bool_)) for v in (s.get("at_baseline") or {}).values()):
        raise ConfigError(f"{where}: at_baseline is not an object of true/false verdicts")
    for key in ("cost", "exactness"):  # an infinite exactness error is written as the text "inf"
        if key in s and not (
            isinstance(s[key], dict) and all(_real(v) or v == "inf" for v in s[key].values())
        ):
            raise ConfigError(f"{where}: {key} is not an object of numbers")
    st = s.get("statelessness")
    if st is not None and not (
        isinstance(st, dict)
        and all(
            isinstance(v, dict) and _ppl(v.get("ppl")) and _number(v.get("top1")) and 0 <= v["top1"] <= 1
            for v in st.values()
        )
    ):
        raise ConfigError(
            f"{where}: statelessness is not an object of policies with a ppl (>= 0 or inf) and a top1 rate"
        )
    pl = s.get("per_layer")
    if pl is not None and not (
        isinstance(pl, dict)
        and all(
            isinstance(d, dict) and all(_block(b) and _number(v) for b, v in d.items()) for d in pl.values()
        )
    ):
        raise ConfigError(f"{where}: per_layer is not an object of metrics by block number")
    if full:
        c = s["config"]
        if not isinstance(c.get("level"), str) or not all(
            _real(c.get(k)) for k in ("r1", "r2", "beta", "l_s", "l_e")
        ):
            raise ConfigError(f"{where}: config has no level text and r1, r2, beta, l_s, l_e numbers")
        roles = s.get("identity_roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{where}: identity_roles is not a list of texts")


def _check_run_parts(result: dict[str, Any]) -> None:
    """The optional run-wide parts the tables and the report read (:func:`check_result`)."""
    nf = result.get("noise_fitting")
    if nf:
        modes = next(iter(nf.values()), None) if isinstance(nf, dict) else None
        if not (
            isinstance(modes, dict)
            and all(
                _beta(b)
                and isinstance(v, dict)
                and v.keys() == modes.keys()
                and all(x is None or _number(x) for x in v.values())
                for b, v in nf.items()
            )
        ):
            raise ConfigError("noise_fitting is not an object of β → the same modes' numbers")
    enum = result.get("enumeration")
    if enum and not (isinstance(enum, dict) and all(_number(v) for v in enum.values())):
        raise ConfigError("enumeration is not an object of numbers")
    space = result.get("search_space")
    if space and not (
        isinstance(space, list)
        and all(
            isinstance(r, dict)
            and all(k in r for k in ("stage", "layer", "rows"))
            and _real(r.get("bits"))
            and _real(r.get("order_bits", 0.0))
            for r in space
        )
    ):
        raise ConfigError("search_space is not a list of objects with stage, layer, rows and bits numbers")


def _cell(setting: dict[str, Any], key: str, intervals: bool) -> str:
    """A metric's cell: the pooled rate, its 95 % interval when asked (and known), a bag attack's
    equal-budget prior (the prior with the attack's guess budget, where recorded: no baseline row shows it;
    :func:`~.catalog.equal_budget`), and a ✓ when the attack is at its baseline (:func:`verdict`); – when
    not run."""
    v = setting["metrics"].get(key)
    if v is None:
        return "–"
    r = (setting.get("rates") or {}).get(key)
    text = fmt(v)
    if intervals and r is not None:
        text += f" [{r['lo']:.2f}, {r['hi']:.2f}]"
    own = catalog.equal_budget(key, setting.get("baselines") or {}) if key in _ATTACKS else None
    if own is not None:
        text += f" (prior {own['rate']:.2f})"
    if verdict(setting, key):
        text += " ✓"
    return text


def _stateless_cell(row: dict[str, Any] | None) -> str:
    """A statelessness cell: PPL / top-1 of one policy (an infinite PPL, a number or the text ``"inf"``,
    as ∞), – where this setting did not run it."""
    if row is None:
        return "–"
    ppl = float(row["ppl"])
    return ("∞" if math.isinf(ppl) else f"{ppl:.1f}") + f" / {row['top1']:.2f}"


def markdown_table(result: dict[str, Any], intervals: bool = False) -> str:
    """Attack × setting table (✓: at the frequency-prior baseline, :func:`verdict`; with ``intervals`` each
    cell's 95 % Wilson interval; "(prior x)": a bag attack's equal-budget prior, shown, not judged by), the
    baselines, the statelessness table, the noise-fitting table and search spaces. ConfigError when
    ``result`` is not shaped as a harness result (:func:`check_result`)."""
    sets = check_result(result, full=False)["settings"]
    names = [text_cell(s["setting"]) for s in sets]
    lines = ["| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(sets)]
    for key, title in METRICS:
        vals = [s["metrics"].get(key) for s in sets]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {title} | " + " | ".join(_cell(s, key, intervals) for s in sets) + " |")
    for key, title in _BASELINES:
        cells = [(s.get("baselines") or {}).get(key) for s in sets]
        if any(c is not None for c in cells):
            shown = [
                "–"
                if c is None
                else f"{c['rate']:.2f}" + (f" [{c['lo']:.2f}, {c['hi']:.2f}]" if intervals else "")
                for c in cells
            ]
            lines.append(f"| *baseline: {title}* | " + " | ".join(shown) + " |")
    out = ["\n".join(lines)]
    st = [s for s in sets if s.get("statelessness")]
    if st:
        # every policy any setting ran, in order of first appearance (a later setting's extra one is a row)
        pols = list(dict.fromkeys(p for s in st for p in s["statelessness"]))
        rows = [
            "| server decodes with | " + " | ".join(text_cell(s["setting"]) for s in st) + " |",
            "|---|" + "---|" * len(st),
        ]
        for p in pols:
            rows.append(
                f"| {text_cell(p)} | "
                + " | ".join(_stateless_cell(s["statelessness"].get(p)) for s in st)
                + " |"
            )
        out.append(
            "Statelessness (token PPL of the true continuation / greedy top-1 agreement):\n\n"
            + "\n".join(rows)
        )
    nf = result.get("noise_fitting") or {}
    if nf:
        modes = list(next(iter(nf.values())))
        rows = ["| β | " + " | ".join(text_cell(m) for m in modes) + " |", "|---|" + "---|" * len(modes)]
        rows += [f"| {text_cell(b)} | " + " | ".join(fmt(v[m]) for m in modes) + " |" for b, v in nf.items()]
        out.append(
            "Block-1 rows N(E[t]) + Laplace(β): top-1 token recovery (fixed vs one-time noise):\n\n"
            + "\n".join(rows)
        )
    if result.get("enumeration"):
        out.append(
            f"Order enumeration (n = {result.get('enumeration_n')}, model likelihood), exact-order rate: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in result["enumeration"].items())
        )
    if result.get("search_space"):
        out.append(
            "Search spaces: "
            + "; ".join(
                f"{r['stage']}[{r['layer']}] {r['rows']} rows → {r['bits']:.0f} bits"
                + (f" (prompt order {r['order_bits']:.0f})" if "order_bits" in r else "")
                for r in result["search_space"]
            )
        )
    return "\n\n".join(out) + "\n"


_BASELINES = (
    ("prompt_pos", "prior, per position"),
    ("prompt_bag", "prior, bag"),
    ("prompt_next_bag", "prior, bag of the next tokens"),
    ("generated", "prior, generated"),
    ("generated_fed", "prior, generated, carried by the steps"),
    ("generated_next", "prior, generated, predicted by the steps"),
    ("no_prompt_top1", "server without the prompt, top-1"),
)
