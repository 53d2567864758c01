"""The privacy/cost frontier of the named configurations (DESIGN §5.7): for each preset of
:mod:`scx_ref.protocol.presets`, the strongest attack's recovery against what the configuration costs,
whether it is exact, and its DP budget.

Columns and where they come from (nothing is assumed; every number is a measurement or a computation
from the model's weights):

* recovery — ``scx attack --frontier`` (:func:`scx_ref.attacks.harness.run_setting`): the largest pooled
  recovery over every prompt attack and over every generated-token attack, with its 95 % interval, the
  statelessness test, and whether *every* attack is at its frequency-prior baseline;
* cost per request — the protocol's own meters in that run: client flop share (prefill and decode), bytes
  and round trips per prompt and per generated token, the client's per-request state per token;
* latency — ``scx bench --configs …`` (median SCX / plaintext, online and with the offline work);
* exactness — the float64 run's max relative logit error and greedy agreement (harness), and float32
  |ΔPPL|/PPL and greedy agreement (:func:`exactness32`);
* DP — :func:`scx_ref.dp.budget.request_budget` of the configuration's release plan (ε per prompt token,
  basic composition) and the number of un-noised message kinds the plan exposes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_int
from ..dp.budget import request_budget
from ..dp.sensitivity import ModelSensitivities
from ..errors import ConfigError
from ..protocol.config import SCXConfig
from ..protocol.plan import ReleasePlan
from . import catalog
from .tables import check_result, markdown_table, verdict

__all__ = [
    "cheapest_at_baseline",
    "dp_summary",
    "exactness32",
    "frontier_markdown",
    "frontier_report",
    "frontier_rows",
    "merge_results",
    "plot_frontier",
]


def _amount(v: Any, *, allow_inf: bool = False, positive: bool = False) -> bool:
    """A number the frontier can show: an int or float (not a bool), not NaN, >= 0 (> 0 with
    ``positive``), finite unless ``allow_inf`` — with it +inf also as the text ``"inf"``, as result files
    carry it (:func:`~scx_ref._files.result_json`)."""
    if allow_inf and v == "inf":
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return False
    return (v > 0 if positive else v >= 0) and (allow_inf or math.isfinite(v))


def _epsilon(v: Any) -> bool:
    """A DP ε as a result file holds it: a number >= 0, +inf included (un-noised: level permute), written
    as a JSON number or, as ``scx dp --json`` writes it, the text ``"inf"``; or null (not computed)."""
    return v is None or _amount(v, allow_inf=True)


def _check_count(result: dict[str, Any], key: str, least: int) -> None:
    """ConfigError unless ``result[key]`` is an integer (not a bool) >= ``least``."""
    v = result.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ConfigError(f"not an `scx attack --frontier` result: {key} {v!r} is not an integer >= {least}")


def _check_missing(result: dict[str, Any]) -> None:
    """ConfigError unless ``result``'s ``missing`` (when present) is a list of configuration names and its
    ``seconds`` (when present) a number >= 0."""
    missing = result.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise ConfigError(
            f"not an `scx attack --frontier` result: missing {missing!r} is not a list of names"
        )
    if "seconds" in result and not _amount(result["seconds"]):
        raise ConfigError(
            f"not an `scx attack --frontier` result: seconds {result['seconds']!r} is not a number >= 0"
        )


def _check_setting(s: dict[str, Any]) -> None:
    """ConfigError unless the parts of one setting the frontier reads — beyond what
    :func:`~.tables.check_result` checks — have the shape the frontier writes: ``preset`` a name or null;
    ``at_baseline`` verdicts true/false; ``cost`` finite numbers >= 0; ``exactness`` numbers >= 0;
    ``exactness32`` (unless empty) a ``rel_delta_ppl`` number >= 0, a ``greedy_identical`` text and a
    true/false ``pass``; ``dp`` (unless empty) ε numbers >= 0 (or inf) and ``exposures`` a list of texts."""
    where = f"setting {s['setting']!r}"
    preset = s.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{where}: preset {preset!r} is not a configuration name or null")
    if not all(isinstance(v, (bool, np.bool_)) for v in (s.get("at_baseline") or {}).values()):
        raise ConfigError(f"{where}: at_baseline is not an object of true/false verdicts")
    bad = [k for k, v in (s.get("cost") or {}).items() if not _amount(v)]
    if bad:
        raise ConfigError(f"{where}: cost {bad} are not finite numbers >= 0")
    bad = [k for k, v in (s.get("exactness") or {}).items() if not _amount(v, allow_inf=True)]
    if bad:
        raise ConfigError(f"{where}: exactness {bad} are not numbers >= 0")
    e32 = s.get("exactness32")
    if e32 and not (
        _amount(e32.get("rel_delta_ppl"), allow_inf=True)
        and isinstance(e32.get("greedy_identical"), str)
        and isinstance(e32.get("pass", True), bool)
    ):
        raise ConfigError(
            f"{where}: exactness32 has no rel_delta_ppl number >= 0, greedy_identical text and "
            "true/false pass"
        )
    dp = s.get("dp")
    if dp:
        bad = [k for k in ("epsilon_request", "epsilon_prefill") if not _epsilon(dp.get(k))]
        if bad:
            raise ConfigError(f"{where}: dp {bad} are not numbers >= 0 (or inf)")
        exposures = dp.get("exposures", [])
        if not isinstance(exposures, list) or not all(isinstance(e, str) for e in exposures):
            raise ConfigError(f"{where}: dp exposures is not a list of texts")


def _check_bench(bench: Any, what: str = "bench") -> dict[str, Any]:
    """``bench`` after checking it has the shape of an ``scx bench --json`` result as far as the frontier
    table reads it, or ConfigError naming ``what``: an object whose ``meta`` (when present) is an object
    whose ``configs`` (when present) is an object or a list of names, and whose ``rows`` are objects with a
    ``phase`` text, a finite ``ratio_median`` > 0, a finite ``total_ratio_median`` > 0 (when present), and
    for a prefill row an integer ``n`` >= 1."""
    rows = bench.get("rows") if isinstance(bench, dict) else None
    if not isinstance(rows, list):
        raise ConfigError(f"{what}: not an `scx bench --json` result (no list of rows)")
    meta = bench.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"{what}: meta is not an object")
    configs = (meta or {}).get("configs")
    if configs is not None and not (
        isinstance(configs, dict) or (isinstance(configs, list) and all(isinstance(c, str) for c in configs))
    ):
        raise ConfigError(f"{what}: meta.configs is not an object or a list of configuration names")
    for i, row in enumerate(rows):
        ok = isinstance(row, dict) and isinstance(row.get("phase"), str)
        ok = ok and _amount(row.get("ratio_median"), positive=True)
        ok = ok and ("total_ratio_median" not in row or _amount(row["total_ratio_median"], positive=True))
        n = row.get("n") if isinstance(row, dict) else None
        ok = ok and (
            row.get("phase") != "prefill" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)
        )
        if not ok:
            raise ConfigError(
                f"{what}: row {i} is not an `scx bench` row (a phase; for prefill an integer n >= 1; "
                "ratio_median and total_ratio_median finite numbers > 0)"
            )
    out: dict[str, Any] = bench
    return out


def dp_summary(sens: ModelSensitivities, config: SCXConfig, prompt_len: int, tokens: int) -> dict[str, Any]:
    """The configuration's DP budget for one prompt token (basic composition, pure ε) over a request of
    ``prompt_len`` tokens and ``tokens`` generated ones, the prefill's alone, and the plan's exposures
    (un-noised message kinds: outside any DP guarantee)."""
    full = request_budget(sens, config, prompt_len=prompt_len, tokens=tokens, use_pld=False)
    pre = request_budget(sens, config, prompt_len=prompt_len, tokens=0, use_pld=False)
    plan = ReleasePlan.of(config, sens)
    return {
        "epsilon_request": full.epsilon_basic,
        "epsilon_prefill": pre.epsilon_basic,
        "releases_per_token": sum(s.count for s in full.stages),
        "exposures": [str(e) for e in plan.exposures],
    }


def exactness32(
    model: str, config: SCXConfig, tokens: int = 256, prompts: int = 2, new: int = 16
) -> dict[str, Any]:
    """float32 exactness of ``config`` on a registered model: |ΔPPL|/PPL over the first ``tokens`` corpus
    tokens (one window) against the plaintext forward, and greedy agreement of ``prompts`` corpus prompts
    × ``new`` tokens (DESIGN §6: bound 1e-5, greedy identical). ConfigError, before any model loads, unless
    ``tokens`` >= 2, ``prompts`` >= 1 and ``new`` >= 1 are integers (no prompt, or no token generated,
    would report a greedy agreement that compared nothing)."""
    tokens, prompts = check_int(tokens, "tokens", 2), check_int(prompts, "prompts", 1)
    new = check_int(new, "new", 1)
    from ..zoo import load_model
    from ..zoo.corpus import corpus_tokens
    from ..zoo.engines import plain_generate, scx_generate
    from ..zoo.perplexity import PPL_CRITERION, ppl_run

    rec = ppl_run(model, "float32", tokens=tokens, window=tokens, config=config)
    hf, tok, w = load_model(model, "float32")
    ids = corpus_tokens(tokens + prompts * 64, tok, w.config.vocab_size)
    cfg = replace(config, max_length=min(w.config.max_positions, 64))
    plain, scx = plain_generate(hf, w, "float32"), scx_generate(w, "float32", cfg)
    same = 0
    for i in range(prompts):
        prompt = ids[tokens + 64 * i : tokens + 64 * i + 32]
        same += int(plain(prompt, new) == scx(prompt, new))
    return {
        "rel_delta_ppl": rec["rel_delta_ppl"],
        "max_abs_dlogit": rec["max_abs_dlogit"],
        "bound": PPL_CRITERION["float32"],
        "pass": rec["pass"],
        "greedy_identical": f"{same}/{prompts}",
        "tokens": tokens,
    }


#: The baselines of a result that only the victim prompts and the public text decide (the prior's guesses
#: of the prompt): equal in every setting of one sample.
_PROMPT_PRIORS: tuple[str, ...] = ("prompt_pos", "prompt_bag")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One frontier result from several ``scx attack --frontier`` runs of the same model and sample (a
    long frontier run in parts): the control of the first, every configuration once (the first part that
    measured it), in preset order; the commands of every part; ``missing`` what no part measured.
    ConfigError when the parts differ in model, prompts, prompt length, generated tokens, public tokens or
    victims — or in the prior's baselines of the prompt (:data:`_PROMPT_PRIORS`, which only the victims
    and the public text decide: parts of two samples of one size would merge into one table) — or one is
    not shaped as a harness result (:func:`~.tables.check_result`)."""
    from ..protocol.presets import preset_names

    if not parts:
        raise ConfigError("nothing to merge")
    for part in parts:
        check_result(part)
        _check_missing(part)
        for setting in part["settings"]:
            _check_setting(setting)
    keys = ("model", "n_prompts", "prompt_len", "n_new", "public_tokens", "victims")
    first = parts[0]
    for other in parts[1:]:
        diff = [k for k in keys if other.get(k) != first.get(k)]
        if diff:
            raise ConfigError(f"frontier parts differ in {', '.join(diff)}: not one sample")
    # the prompt's prior baselines depend only on the victims and the public text: one sample has one
    prior: dict[str, tuple[float, float]] = {}
    for part in parts:
        for setting in part["settings"]:
            for key in _PROMPT_PRIORS:
                b = (setting.get("baselines") or {}).get(key)
                got = None if b is None else (b.get("k"), b.get("n"))
                if got is not None and prior.setdefault(key, got) != got:
                    raise ConfigError(
                        f"frontier parts differ in the {key} baseline ({prior[key]} and {got} in "
                        f"{setting['setting']!r}): not one sample"
                    )
    order: dict[str | None, int] = {None: -1, **{n: i for i, n in enumerate(preset_names())}}
    seen: dict[str, dict[str, Any]] = {}
    for part in parts:
        for setting in part["settings"]:
            seen.setdefault(setting["setting"], setting)
    settings = sorted(seen.values(), key=lambda r: order.get(r.get("preset"), len(order)))
    missing = sorted({m for part in parts for m in part.get("missing", [])} - set(seen))
    return {
        **first,
        "settings": settings,
        "command": "\n    ".join(str(part.get("command", "?")) for part in parts),
        "seconds": round(sum(float(part.get("seconds", 0.0)) for part in parts), 1),
        "missing": missing,
        "complete": not missing,
        "parts": len(parts),
    }


def _worst(setting: dict[str, Any], target: str) -> tuple[str | None, dict[str, Any] | None]:
    """The attack of ``target`` with the highest pooled recovery (its key and rate record)."""
    best: tuple[str | None, dict[str, Any] | None] = (None, None)
    for m in catalog.attack_metrics():
        r = (setting.get("rates") or {}).get(m.key)
        if m.target != target or m.scoring == "stateless" or r is None:
            continue
        if best[1] is None or r["rate"] > best[1]["rate"]:
            best = (m.key, r)
    return best


def _bench_for(bench: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Latency ratios of configuration ``name`` from an ``scx bench --json`` result (empty if absent). A
    result that lists its named configurations (``meta.configs``) matches only those: its plain
    ``--levels`` rows are a level's default configuration, not the preset of the same name."""
    out: dict[str, Any] = {}
    named = ((bench or {}).get("meta") or {}).get("configs")
    if named is not None and name not in named:
        return out
    for row in (bench or {}).get("rows", []):
        if row.get("config", row.get("level")) != name:
            continue
        phase = row["phase"]
        key = f"{phase}_n{row['n']}" if phase == "prefill" else phase
        out[key] = row
    return out


def _judged(s: dict[str, Any]) -> dict[str, bool]:
    """The verdicts of one setting that "every attack at baseline" ranges over: every attack it scored or
    judged whose :func:`~.tables.verdict` (the rule the table's ✓ reads) is not None — an attack scored
    without a verdict, or with a ``true`` one that its rate contradicts, is above its baseline; a ``true``
    verdict on an attack that scored nothing is no measurement and is left out; a ``false`` one always
    counts."""
    keys = [*(s.get("rates") or {}), *(s.get("at_baseline") or {})]
    out = {k: verdict(s, k) for k in dict.fromkeys(keys)}
    return {k: v for k, v in out.items() if v is not None}


def frontier_rows(result: dict[str, Any], bench: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per configuration of an ``scx attack --frontier`` result (the plaintext control first),
    with the latency ratios of ``bench`` (an ``scx bench --json`` result) merged in by name. ConfigError
    when ``result`` or ``bench`` is not shaped as the result it should be (:func:`~.tables.check_result`,
    :func:`_check_bench`; a setting's ``preset``, ``cost``, ``exactness``, ``exactness32`` and ``dp``).
    ``all_at_baseline``: the setting judged some attack and every attack it scored (``rates``) is at its
    baseline (``at_baseline``) by its own numbers too: one scored but not judged, or judged at it against
    its rate, counts as above it (:func:`_judged`)."""
    check_result(result, full=False)
    for s in result["settings"]:
        _check_setting(s)
    if bench is not None:
        _check_bench(bench)
    rows = []
    for s in result["settings"]:
        p_key, p_rate = _worst(s, "prompt")
        g_key, g_rate = _worst(s, "generated")
        verdicts = _judged(s)
        rows.append(
            {
                "name": s["setting"],
                "summary": s.get("mechanism", "?"),
                "control": s.get("preset") is None,
                "prompt_attack": p_key,
                "prompt": p_rate,
                "generated_attack": g_key,
                "generated": g_rate,
                "stateless": (s.get("rates") or {}).get("stateless_top1"),
                "stateless_baseline": (s.get("baselines") or {}).get("no_prompt_top1"),
                "baseline_prompt": (s.get("baselines") or {}).get("prompt_bag"),
                "baseline_generated": (s.get("baselines") or {}).get("generated"),
                "all_at_baseline": bool(verdicts) and all(verdicts.values()),
                "above_baseline": sorted(k for k, v in verdicts.items() if not v),
                "cost": s.get("cost", {}),
                "exactness": s.get("exactness", {}),
                "exactness32": s.get("exactness32"),
                "dp": s.get("dp"),
                "bench": _bench_for(bench, s["setting"]),
            }
        )
    return rows


def _use_bench(rows: list[dict[str, Any]]) -> bool:
    """Whether every row of ``rows`` has a benchmarked prefill (then latency orders them; one measure for
    all rows, never latency for some and flop shares for others)."""
    return bool(rows) and all(any(k.startswith("prefill") for k in r["bench"]) for r in rows)


def _cost_key(row: dict[str, Any], use_bench: bool) -> float:
    """What "cheapest" orders by: with ``use_bench``, the prefill latency ratio at the longest benchmarked n
    with the offline work counted (``total_ratio_median``: a pool entry per request); else the client's
    share of the request's flops, online and offline together."""
    if use_bench:
        prefills = [v for k, v in row["bench"].items() if k.startswith("prefill")]
        longest = max(prefills, key=lambda r: r["n"])
        return float(longest.get("total_ratio_median", longest["ratio_median"]))
    c = row["cost"]
    return float(c.get("client_flop_share", math.inf)) + float(c.get("offline_flop_share", 0.0))


def cheapest_at_baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cheapest configuration (not the control) at which every attack is at its baseline, or None.
    Cheapest: by the benchmarked latency when every such configuration was benchmarked, else by the
    client's flop share; ties go to the earlier row (the presets' order: cheaper options first)."""
    ok = [r for r in rows if not r["control"] and r["all_at_baseline"]]
    use_bench = _use_bench(ok)
    return min(ok, key=lambda r: _cost_key(r, use_bench)) if ok else None


def _rate(r: dict[str, Any] | None) -> str:
    return "–" if r is None else f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _eps(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    return "∞" if math.isinf(v) else f"{v:.3g}"


def frontier_markdown(rows: list[dict[str, Any]]) -> str:
    """The frontier table (markdown): recovery, cost, exactness and DP per configuration."""
    head = (
        "| configuration | best prompt attack | best generated-token attack | statelessness: server top-1 "
        "(no prompt) | every attack at baseline | client flops online (offline): prefill / decode | "
        "bytes per prompt · per token | round trips per prompt · per token | client state / token | "
        "latency prefill · decode | "
        "exactness f64 · f32 | ε per token (prefill · request) | exposures |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        c, e, dp, b = r["cost"], r["exactness"], r["dp"] or {}, r["bench"]
        st = r["stateless"]
        stb = r["stateless_baseline"]
        state = "–" if st is None else f"{st['rate']:.2f} ({stb['rate']:.2f})" if stb else f"{st['rate']:.2f}"
        verdict = (
            "–"
            if r["control"]
            else ("**yes**" if r["all_at_baseline"] else f"no ({len(r['above_baseline'])})")
        )
        lat = _latency(b)
        e32 = r["exactness32"]
        ex = f"{float(e.get('max_rel_logit_err', 'nan')):.0e}"  # float(): +inf may be the text "inf"
        if e32:
            fail = "" if e32.get("pass", True) else " ✗"
            ex += f" · {float(e32['rel_delta_ppl']):.1e}{fail} ({e32['greedy_identical']})"
        lines.append(
            f"| {r['name']} | {_rate(r['prompt'])} {_short(r['prompt_attack'])} | "
            f"{_rate(r['generated'])} {_short(r['generated_attack'])} | {state} | {verdict} | "
            f"{_pct(c.get('client_flop_share_prefill'))} ({_pct(c.get('offline_flop_share_prefill'))}) / "
            f"{_pct(c.get('client_flop_share_decode'))} ({_pct(c.get('offline_flop_share_decode'))}) | "
            f"{_bytes(c.get('bytes_per_prompt'))} · {_bytes(c.get('bytes_per_token'))} | "
            f"{c.get('round_trips_per_prompt', 0):.0f} · {c.get('round_trips_per_token', 0):.0f} | "
            f"{_bytes(c.get('client_state_bytes_per_token'))} | {lat} | {ex} | "
            f"{_eps(dp.get('epsilon_prefill'))} · {_eps(dp.get('epsilon_request'))} | "
            f"{len(dp.get('exposures', [])) if dp else '–'} |"
        )
    return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.0f} %"


def _short(key: str | None) -> str:
    return "" if key is None else f"({_title(key)})"


def _title(key: str) -> str:
    """The catalog's title of attack ``key``; the key itself for one the catalog does not know (a result
    written by another version)."""
    try:
        return catalog.metric(key).title
    except KeyError:
        return key


def _bytes(v: Any) -> str:
    if v is None:
        return "–"
    v = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GB"


def _latency(bench: dict[str, Any]) -> str:
    if not bench:
        return "–"
    pre = [v for k, v in bench.items() if k.startswith("prefill")]
    parts = []
    if pre:
        longest = max(pre, key=lambda r: r["n"])
        parts.append(f"{longest['ratio_median']:.2f}× (n={longest['n']})")
    if "decode" in bench:
        parts.append(f"{bench['decode']['ratio_median']:.2f}×")
    return " · ".join(parts)


def plot_frontier(rows: list[dict[str, Any]], path: str | Path, model: str = "") -> Path:
    """Recovery (the strongest prompt and generated-token attack, 95 % intervals) against cost, with the
    frequency-prior baseline band; PNG. Two panels: the ordering cost of :func:`cheapest_at_baseline`
    (latency or client flop share), and the bytes per generated token (log scale), where the guard blocks'
    round trips show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pts = [r for r in rows if not r["control"] and r["prompt"] is not None]
    use_bench = _use_bench(pts)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)

    def ordering(r: dict[str, Any]) -> float:
        return _cost_key(r, use_bench)

    def per_token(r: dict[str, Any]) -> float:
        return max(float(r["cost"].get("bytes_per_token", 0.0)), 1.0)

    first = (
        "prefill latency ratio with the offline mask derivation (SCX / plaintext)"
        if use_bench
        else "client flop share, online + offline"
    )
    panels: tuple[tuple[Callable[[dict[str, Any]], float], str], ...] = (
        (ordering, first),
        (per_token, "bytes per generated token (log)"),
    )
    base = [r["baseline_prompt"] for r in pts if r["baseline_prompt"]]
    for ax, (cost, label) in zip(axes, panels, strict=True):
        for target, marker, color in (("prompt", "o", "tab:red"), ("generated", "s", "tab:blue")):
            sel = [r for r in pts if r[target] is not None]
            xs = np.array([cost(r) for r in sel])
            ys = np.array([r[target]["rate"] for r in sel])
            # clipped at 0: intervals stored before wilson() clamped its rounding may miss p by 1e-17
            lo = np.clip(ys - np.array([r[target]["lo"] for r in sel]), 0.0, None)
            hi = np.clip(np.array([r[target]["hi"] for r in sel]) - ys, 0.0, None)
            ax.errorbar(
                xs, ys, yerr=[lo, hi], fmt=marker, color=color, capsize=3, label=f"strongest {target} attack"
            )
            for x, y, r in zip(xs, ys, sel, strict=True):
                if target == "prompt":
                    ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if base:
            ax.axhspan(
                0,
                max(b["hi"] for b in base),
                color="grey",
                alpha=0.2,
                label="frequency-prior baseline (95 %)",
            )
        ax.set_xlabel(label)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("fraction of tokens recovered")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Recovery vs cost, {model}".rstrip(", "))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _verdict_text(rows: list[dict[str, Any]]) -> str:
    best = cheapest_at_baseline(rows)
    if best is None:
        lines = ["**No configuration reaches the baseline on every attack.** What stays above it:", ""]
        for r in rows:
            if not r["control"]:
                above = ", ".join(_title(k) for k in r["above_baseline"]) or "–"
                lines.append(f"- {r['name']}: {above}")
        return "\n".join(lines)
    c = best["cost"]
    ok = [r for r in rows if not r["control"] and r["all_at_baseline"]]
    measure = "prefill latency with the offline work" if _use_bench(ok) else "the client's flop share"
    return (
        f"**Cheapest configuration with every attack at its baseline (by {measure}): `{best['name']}`** "
        f"({best['summary']}) — "
        f"client flop share {_pct(c.get('client_flop_share_prefill'))} online + "
        f"{_pct(c.get('offline_flop_share_prefill'))} offline at prefill, "
        f"{_pct(c.get('client_flop_share_decode'))} + {_pct(c.get('offline_flop_share_decode'))} "
        "per decode step, "
        f"{_bytes(c.get('bytes_per_prompt'))} and {c.get('round_trips_per_prompt', 0):.0f} round trips per "
        f"prompt, {_bytes(c.get('bytes_per_token'))} and {c.get('round_trips_per_token', 0):.0f} round trips "
        f"per generated token; latency {_latency(best['bench'])}."
    )


def frontier_report(
    result: dict[str, Any], bench: dict[str, Any] | None = None, plots: str | None = None, findings: str = ""
) -> str:
    """FRONTIER.md: the command, the verdict, the frontier table, the attack table with 95 % intervals and
    the statelessness table, links to the plot and the findings (ConfigError when ``result`` is not shaped
    as a harness result: :func:`~.tables.check_result`, or its counts are not integers: ``n_prompts`` and
    ``prompt_len`` >= 1, ``n_new`` >= 0; or ``missing`` is not a list of names: :func:`frontier_rows`; or
    ``plots`` is not a text or None, or ``findings`` not a text)."""
    if (plots is not None and not isinstance(plots, str)) or not isinstance(findings, str):
        raise ConfigError(
            f"plots must be a text or None and findings a text, got {type(plots).__name__} and "
            f"{type(findings).__name__}"
        )
    check_result(result)
    for key, least in (("n_prompts", 1), ("prompt_len", 1), ("n_new", 0)):
        _check_count(result, key, least)
    _check_missing(result)
    rows = frontier_rows(result, bench)
    lines = [
        f"# The privacy/cost frontier of SCX, measured ({result['model']})",
        "",
        "Generated by `python -m scx_ref.attacks.report` from the JSON of:",
        "",
        f"    {result.get('command', '?')}",
        "",
    ]
    if bench is not None:
        lines += [
            "and the latency ratios of:",
            "",
            f"    {(bench.get('meta') or {}).get('command', '?')}",
            "",
        ]
    lines += [
        f"{result['n_prompts']} victim prompts × {result['prompt_len']} tokens, {result['n_new']} generated "
        f"tokens each ({max(result['n_new'] - 1, 0)} decode steps); victims: {result.get('victims', '?')}; "
        f"{result.get('public_tokens', '?')} public tokens for the attacker; "
        f"run time {result.get('seconds', '?')} s. "
        "Recovery: the fraction of tokens recovered, pooled over prompts, with its 95 % Wilson interval; "
        "✓ = at the frequency-prior baseline (no higher than the baseline's upper bound; for a bag attack "
        'the prior of n guesses; "(prior x)" in its cell, where the run recorded it: the prior with as many '
        "guesses as the attack made, decoy rows included, shown, not judged by).",
        "",
    ]
    if result.get("missing"):
        lines += [
            f"**Incomplete run:** not measured: {', '.join(result['missing'])} (the verdict covers only the "
            "configurations below).",
            "",
        ]
    lines += [
        _verdict_text(rows),
        "",
        frontier_markdown(rows),
        "Every attack (✓: at its baseline; – not run: the configuration never sends that message):",
        "",
        markdown_table(result, intervals=True),
    ]
    if plots:
        lines += [f"Plot: [recovery vs cost]({plots}/frontier.png)", ""]
    if findings:
        lines += ["## Findings", "", findings.strip(), ""]
    return "\n".join(lines)


def read_bench(path: str | Path) -> dict[str, Any]:
    """The ``scx bench --json`` result at ``path`` (a path or its text), checked to have the shape the
    frontier table reads (:func:`_check_bench`), or :class:`~scx_ref.errors.ConfigError` naming ``--bench``
    (also for a file that cannot be read or is not JSON, and for a ``path`` that is neither)."""
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"--bench: a path must be a text or a Path, got {type(path).__name__}")
    path = Path(path)
    try:
        bench: Any = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--bench {str(path)!r}: cannot read it ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--bench {str(path)!r}: not JSON ({exc})") from None
    return _check_bench(bench, f"--bench {str(path)!r}")
