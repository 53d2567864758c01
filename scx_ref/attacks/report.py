"""The privacy table (markdown) and plots (PNG, matplotlib Agg) of a harness result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS", "markdown_table", "plot"]

# (metric key, column title): what each attack recovers; 1.0 = every token
METRICS = (
    ("vm_qkv1_bag_recall", "VM QKV-1 bag"),
    ("vm_resid1_bag_recall", "VM FFN−O-1 bag"),
    ("vm_attn1_pos_acc", "VM attn-1 fingerprint"),
    ("vm_cache_seq_pos_acc", "VM mid-cache seq."),
    ("vm_gen_seq_acc", "VM gen-mid seq."),
    ("inv_cache_ridge_pos_acc", "inv cache ridge"),
    ("inv_cache_mlp_pos_acc", "inv cache MLP"),
    ("inv_ffn_ridge_bag_recall", "inv FFN-mid ridge"),
    ("inv_attn_naive_pos_acc", "inv attn naive"),
    ("inv_attn_sigma_rec_pos_acc", "inv attn σ-rec"),
    ("inv_attn_sorted_pos_acc", "inv attn sorted"),
    ("decoy_link_decoys_rejected", "decoys rejected"),
    ("llm_reorder_exact", "LLM order exact"),
    ("llm_reorder_kendall_tau", "LLM Kendall τ"),
)


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    """Attack × setting table, the statelessness table, the noise-fitting table and search spaces."""
    sets = result["settings"]
    lines = ["| attack | " + " | ".join(s["setting"] for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for key, title in METRICS:
        vals = [s["metrics"].get(key) for s in sets]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {title} | " + " | ".join(_fmt(v) for v in vals) + " |")
    out = ["\n".join(lines)]
    st = [s for s in sets if "statelessness" in s]
    if st:
        pols = list(st[0]["statelessness"])
        rows = [
            "| server decodes with | " + " | ".join(s["setting"] for s in st) + " |",
            "|---|" + "---|" * len(st),
        ]
        for p in pols:
            rows.append(
                f"| {p} | "
                + " | ".join(
                    f"{s['statelessness'][p]['ppl']:.1f} / {s['statelessness'][p]['top1']:.2f}" for s in st
                )
                + " |"
            )
        out.append(
            "Statelessness (token PPL of the true continuation / greedy top-1 agreement):\n\n"
            + "\n".join(rows)
        )
    nf = result.get("noise_fitting") or {}
    if nf:
        modes = list(next(iter(nf.values())))
        rows = ["| β | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        rows += [f"| {b} | " + " | ".join(_fmt(v[m]) for m in modes) + " |" for b, v in nf.items()]
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
                for r in result["search_space"]
            )
        )
    return "\n\n".join(out) + "\n"


def plot(result: dict[str, Any], outdir: str | Path) -> list[Path]:
    """Two PNGs: attack success per setting (grouped bars) and recovery vs β (noise fitting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    sets = result["settings"]
    keys = [(k, t) for k, t in METRICS if any(k in s["metrics"] for s in sets)]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys)), 4.5))
    width = 0.8 / max(len(sets), 1)
    for j, s in enumerate(sets):
        ax.bar(
            [i + j * width for i in range(len(keys))],
            [s["metrics"].get(k, 0.0) for k, _ in keys],
            width,
            label=s["setting"],
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([t for _, t in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("fraction recovered")
    ax.set_title(f"Attacks on the SCX server view ({result['model']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p1 = out / "attacks_by_setting.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    paths = [p1]
    nf = result.get("noise_fitting") or {}
    if nf:
        fig, ax = plt.subplots(figsize=(6, 4))
        betas = [float(b) for b in nf]
        for m in next(iter(nf.values())):
            ax.plot(betas, [nf[b][m] for b in nf], marker="o", label=m)
        ax.set_xlabel("Laplace β")
        ax.set_ylabel("top-1 token recovery")
        ax.set_title("Block-1 rows under noise: fixed vs one-time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p2 = out / "noise_fitting.png"
        fig.savefig(p2, dpi=120)
        plt.close(fig)
        paths.append(p2)
    return paths
