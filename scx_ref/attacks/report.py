"""The privacy table (markdown) and plots (PNG, matplotlib Agg) of a harness result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._files import result_json, write_text_whole
from ..errors import ConfigError, SCXError
from .tables import METRICS, check_result, fmt, markdown_table, text_cell

__all__ = ["METRICS", "main", "markdown_report", "markdown_table", "plot"]


def _bar_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    sets = result["settings"]
    keys = [(k, t) for k, t in METRICS if any(s["metrics"].get(k) is not None for s in sets)]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys)), 4.5))
    width = 0.8 / max(len(sets), 1)
    for j, s in enumerate(sets):
        ax.bar(
            [i + j * width for i in range(len(keys))],
            [_height(s["metrics"].get(k)) for k, _ in keys],
            width,
            label=s["setting"],
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([t for _, t in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("fraction recovered")
    ax.set_title(f"Attacks on the SCX server view ({result['model']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _height(v: Any) -> float:
    """A bar's height: the measured value, NaN (no bar) where the metric was not run (None)."""
    return float("nan") if v is None else float(v)


def _sweep(result: dict[str, Any], level: str, param: str, extra: dict[str, Any]) -> list[tuple[float, Any]]:
    """(parameter value, setting) for the settings of ``level`` whose other knobs equal ``extra``."""
    pts = []
    for s in result["settings"]:
        cfg = s["config"]
        if cfg["level"] != level or any(cfg.get(k) != v for k, v in extra.items()):
            continue
        pts.append((float(cfg[param]), s))
    return sorted(pts, key=lambda p: p[0])


_BETA_KEYS = ("vm_qkv1_bag_recall", "vm_resid1_bag_recall", "vm_attn1_pos_acc", "vm_cache_seq_pos_acc")
_R_KEYS = (
    "vm_qkv1_bag_precision",
    "llm_reorder_exact",
    "llm_reorder_kendall_tau",
    "decoy_link_decoys_rejected",
)


def _line_plot(
    path: Path,
    title: str,
    xlabel: str,
    series: dict[str, tuple[list[float], list[float]]],
    logx: bool = False,
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if logx:
        ax.set_xscale("log")
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction recovered")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(result: dict[str, Any], outdir: str | Path) -> list[Path]:
    """PNGs: attack success per setting (grouped bars); recovery vs Laplace β (engine settings at level
    paper, and the noise-fitting experiment); recovery vs decoy count r; recovery per layer."""
    import matplotlib

    matplotlib.use("Agg")

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    titles = dict(METRICS)
    paths = [out / "attacks_by_setting.png"]
    _bar_plot(result, paths[0])
    series: dict[str, tuple[list[float], list[float]]] = {}
    beta_pts = _sweep(result, "paper", "beta", {"r1": 4, "l_s": 1})
    for k in _BETA_KEYS:
        pts = [(b, s["metrics"][k]) for b, s in beta_pts if s["metrics"].get(k) is not None]
        if pts:
            series[f"SCX paper: {titles[k]}"] = ([p[0] for p in pts], [p[1] for p in pts])
    nf = result.get("noise_fitting") or {}
    for m in next(iter(nf.values()), {}):
        series[f"fitting {m}"] = ([float(b) for b in nf], [nf[b][m] for b in nf])
    if series:
        paths.append(out / "recovery_vs_beta.png")
        _line_plot(
            paths[-1],
            f"Recovery vs Laplace β ({result['model']})",
            "Laplace β (log scale)",
            series,
            logx=True,
        )
    r_pts = _sweep(result, "permute", "r1", {})
    r_pts = [(r, s) for r, s in r_pts if s.get("identity_roles") == ["head"]]
    series = {}
    for k in _R_KEYS:
        pts = [(r, s["metrics"][k]) for r, s in r_pts if s["metrics"].get(k) is not None]
        if len(pts) >= 2:
            series[titles[k]] = ([p[0] for p in pts], [p[1] for p in pts])
    if series:
        paths.append(out / "recovery_vs_decoys.png")
        _line_plot(paths[-1], f"Recovery vs decoys r (level permute, {result['model']})", "decoys r", series)
    series = {}
    for s in result["settings"]:
        for m, d in (s.get("per_layer") or {}).items():
            if s["setting"] in ("plaintext", "paper b=5"):
                series[f"{s['setting']}: {m}"] = ([float(k) for k in d], list(d.values()))
    if series:
        paths.append(out / "recovery_per_layer.png")
        _line_plot(paths[-1], f"Inversion per block ({result['model']})", "block (0-based)", series)
    return paths


def markdown_report(result: dict[str, Any], plots: str | None = None, findings: str = "") -> str:
    """ATTACKS.md: the command, the tables, the per-layer numbers, links to the plots and findings
    (ConfigError when ``result`` is not shaped as a harness result: :func:`~.tables.check_result`)."""
    check_result(result)
    lines = [
        f"# Privacy attacks on SCX, measured ({result['model']})",
        "",
        "Generated by `python -m scx_ref.attacks.report` from the JSON of:",
        "",
        f"    {result.get('command', '?')}",
        "",
        f"{result['n_prompts']} victim prompts × {result['prompt_len']} tokens, {result['n_new']} generated "
        f"tokens each; victims: {result.get('victims', '?')}; {result.get('public_tokens', '?')} public "
        f"tokens; run time {result.get('seconds', '?')} s. Each cell: fraction of the victim's tokens "
        "recovered (positions for *pos* attacks, multiset for *bag* attacks), averaged over prompts; "
        "– = not run / not applicable. Columns add one SCX mechanism at a time after the plaintext control.",
        "",
        "| setting | mechanism | config |",
        "|---|---|---|",
    ]
    for s in result["settings"]:
        c = s["config"]
        off = ",".join(s.get("identity_roles", [])) or "–"
        config = (
            f"level={c['level']} r1={c['r1']} r2={c['r2']} β={c['beta']} l_s={c['l_s']} l_e={c['l_e']}; "
            f"identity perms: {off}"
        )
        lines.append(f"| {text_cell(s['setting'])} | {text_cell(s['mechanism'])} | {text_cell(config)} |")
    lines += ["", markdown_table(result)]
    pl = [s for s in result["settings"] if s.get("per_layer")]
    if pl:
        lines += [
            "Per block (0-based), ridge inversion of the prompt rows: shared cache (after key "
            "sharing) / attention V as seen / attention V sorted (σ-invariant):",
            "",
        ]
        blocks = sorted({int(b) for s in pl for d in s["per_layer"].values() for b in d})
        lines.append("| setting | " + " | ".join(str(b) for b in blocks) + " |")
        lines.append("|---|" + "---|" * len(blocks))
        for s in pl:
            cache = s["per_layer"].get("inv_cache_ridge", {})
            srt = s["per_layer"].get("inv_attn_sorted", {})
            nai = s["per_layer"].get("inv_attn_naive", {})
            cells = [
                f"{fmt(cache.get(str(b)))} / {fmt(nai.get(str(b)))} / {fmt(srt.get(str(b)))}" for b in blocks
            ]
            lines.append(f"| {text_cell(s['setting'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if plots:
        lines += [
            "Plots: "
            + ", ".join(
                f"[{n}]({plots}/{n}.png)"
                for n in (
                    "attacks_by_setting",
                    "recovery_vs_beta",
                    "recovery_vs_decoys",
                    "recovery_per_layer",
                )
            ),
            "",
        ]
    if findings:
        lines += ["## Findings", "", findings.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m scx_ref.attacks.report RESULT.json [--plots DIR] [--findings FILE] [--out FILE]``.
    A file that cannot be read, is not JSON or not shaped as the result it should be exits 2 with
    ``error: ...`` (argparse's usage error), never a traceback; so do ``--merged`` without ``--with`` and
    ``--bench`` with a result that is not a frontier's (each would be ignored). ``--out`` and ``--merged``
    are written whole or not at all (a ``.part`` file renamed into place)."""
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python -m scx_ref.attacks.report",
        description="Render ATTACKS.md from an `scx attack --json` result.",
    )
    p.add_argument("json", type=Path)
    p.add_argument("--plots", default=None, help="plot directory, relative to the output file")
    p.add_argument("--findings", type=Path, default=None, help="markdown file of findings to append")
    p.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    p.add_argument(
        "--write-plots", type=Path, default=None, help="also (re)draw the PNG plots into this directory"
    )
    p.add_argument(
        "--bench",
        type=Path,
        default=None,
        help="a frontier's `scx bench --configs ... --json` latency result",
    )
    p.add_argument(
        "--with",
        dest="more",
        type=Path,
        nargs="+",
        default=[],
        help="more parts of the same frontier run (scx attack --frontier --configs ...): merged with JSON",
    )
    p.add_argument(
        "--merged", type=Path, default=None, help="with --with: write the merged frontier JSON here"
    )
    a = p.parse_args(argv)

    def read(path: Path) -> str:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            p.error(f"{str(path)!r}: cannot read it ({exc})")

    def load(path: Path) -> Any:
        text = read(path)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int past Python's digit limit
            p.error(f"{str(path)!r}: not JSON ({exc})")  # or nesting past the recursion limit
        try:
            return check_result(data)
        except ConfigError as exc:
            p.error(f"{str(path)!r}: {exc}")

    if a.merged and not a.more:
        p.error("--merged: needs --with (without it, nothing is merged)")

    result = load(a.json)
    try:
        if a.more:
            from .frontier import merge_results

            result = merge_results([result, *(load(m) for m in a.more)])
            if a.merged:
                write_text_whole(a.merged, result_json(result, indent=1, default=float))
        if a.bench and result.get("kind") != "frontier":
            p.error(f"--bench: {str(a.json)!r} is not a frontier result (the latency would be ignored)")
        findings = read(a.findings) if a.findings else ""
        if result.get("kind") == "frontier":
            from . import frontier

            bench = frontier.read_bench(a.bench) if a.bench else None
            if a.write_plots:
                rows = frontier.frontier_rows(result, bench)
                frontier.plot_frontier(rows, Path(a.write_plots) / "frontier.png", result["model"])
            text = frontier.frontier_report(result, bench, a.plots, findings)
        else:
            if a.write_plots:
                plot(result, a.write_plots)
            text = markdown_report(result, a.plots, findings)
        if a.out:
            write_text_whole(a.out, text)  # never a half-written file
        else:
            print(text)
    except OSError as exc:
        p.error(f"cannot write: {exc}")
    except SCXError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
