"""Run every attack on SCX server views, one mechanism varied at a time, against a plaintext control.

Views come from the real protocol engine (:class:`~scx_ref.protocol.Client` → :class:`LocalTransport` with
``record_view=True``). A mechanism is switched off by a key schedule whose permutations of that role are
the identity (:class:`AblatedKeys`); the *plaintext control* switches every permutation off, with no
decoys and no noise (level ``permute``, r = 0): the server sees the plaintext rows, so each attack must
succeed there. Scoring uses the victim's true tokens; the attacks never see them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backends.numpy_backend import NumpyBackend
from ..keys import KeySchedule, Label
from ..protocol import Client, LocalTransport, SCXConfig, Server, ServerView
from ..transforms import laplace_noise
from ..weights import ModelWeights
from . import bruteforce, decoy_detect, inversion, llm_reorder, statelessness, vocab_match
from ._model import forward_trace
from ._view import open_meta, shared_caches, stage_array

__all__ = ["AblatedKeys", "Setting", "default_settings", "noise_fitting", "run_all", "run_setting"]

Array = npt.NDArray[Any]
Progress = Callable[[str], None]


class AblatedKeys(KeySchedule):
    """A key schedule whose permutations of the roles in ``identity`` (label[0]: ``tok``, ``head``,
    ``lock``) are the identity — to switch one SCX mechanism off in the real engine."""

    def __init__(self, master: bytes, nonce: bytes, identity: frozenset[str]) -> None:
        super().__init__(master, nonce)
        self.identity = identity
        self._m = master

    def for_nonce(self, nonce: bytes) -> AblatedKeys:
        return AblatedKeys(self._m, nonce, self.identity)

    def permutation(self, label: Label, n: int) -> npt.NDArray[np.int64]:
        if str(label[0]) in self.identity:
            return np.arange(n, dtype=np.int64)
        return super().permutation(label, n)


@dataclass(frozen=True)
class Setting:
    """One configuration: the engine's SCXConfig and the permutation roles switched off."""

    name: str
    mechanism: str
    config: SCXConfig
    identity: frozenset[str] = frozenset()


_ALL = frozenset({"tok", "head", "lock"})


def default_settings(quick: bool = False) -> list[Setting]:
    """Plaintext control, then one mechanism added at a time, a β sweep and guard sizes."""
    s = [
        Setting("plaintext", "none (control)", SCXConfig(level="permute", r1=0, r2=0, r_lock=0), _ALL),
        Setting(
            "tok-perm",
            "token permutation",
            SCXConfig(level="permute", r1=0, r2=0, r_lock=0),
            frozenset({"head"}),
        ),
        Setting("+decoys", "+ decoys r=4", SCXConfig(level="permute", r1=4, r2=4), frozenset({"head"})),
        Setting("+head-perm", "+ head-dim permutation", SCXConfig(level="permute", r1=4, r2=4)),
        Setting("paper b=5", "+ Laplace β=5 (block 1)", SCXConfig(level="paper", r1=4, r2=4, beta=5.0)),
    ]
    if not quick:
        s += [
            Setting("paper b=1", "Laplace β=1", SCXConfig(level="paper", r1=4, r2=4, beta=1.0)),
            Setting("paper b=20", "Laplace β=20", SCXConfig(level="paper", r1=4, r2=4, beta=20.0)),
            Setting("guards 2", "guards l_s=l_e=2 (β=5)", SCXConfig(level="paper", r1=4, r2=4, l_s=2, l_e=2)),
        ]
    return s


def _engine_view(
    weights: ModelWeights, ids: Array, setting: Setting, n_new: int, seed: int, public: Array
) -> tuple[ServerView, list[int]]:
    backend = NumpyBackend(weights, np.float64)
    master = hashlib.sha256(f"scx-attack-{seed}".encode()).digest()
    nonce = hashlib.sha256(f"nonce-{seed}".encode()).digest()[:16]
    keys = AblatedKeys(master, nonce, setting.identity)
    link = LocalTransport(Server(backend), record_view=True)
    client = Client(backend, keys, setting.config, public_tokens=public)
    gen = client.generate(ids, n_new, link)
    return link.view, gen


def _bag_scores(pred: Any, truth: Any) -> dict[str, float]:
    hit = sum((Counter(int(t) for t in pred) & Counter(int(t) for t in truth)).values())
    return {"recall": hit / max(len(truth), 1), "precision": hit / max(len(pred), 1)}


@dataclass
class Context:
    """Model, public text, and the attacker's fitted tools (shared by every setting)."""

    weights: ModelWeights
    public: Array
    lm: llm_reorder.LanguageModel | None
    inverters: dict[str, Any] = field(default_factory=dict)
    middle_ref: dict[int, Array] = field(default_factory=dict)


def _public_trace(ctx: Context, window: int = 64) -> list[Any]:
    return [
        forward_trace(ctx.weights, ctx.public[s : s + window], logits=False)
        for s in range(0, len(ctx.public) - window + 1, window)
    ]


def fit_tools(ctx: Context, layers: Sequence[int], mlp: bool = True, epochs: int = 300) -> None:
    """Fit the inverters on public text: per middle block, on [K|V] cache rows (after key sharing), on
    plain V rows, on sorted V rows (σ-invariant) and on FFN-stage rows; keep public V columns for
    σ recovery."""
    traces = _public_trace(ctx)
    toks = np.concatenate([ctx.public[s * 64 : s * 64 + 64] for s in range(len(traces))])
    for layer in layers:
        kv = np.concatenate(
            [
                np.concatenate(
                    [t.k[layer].reshape(len(t.k[layer]), -1), t.v[layer].reshape(len(t.v[layer]), -1)], 1
                )
                for t in traces
            ]
        )
        v = np.concatenate([t.v[layer].reshape(len(t.v[layer]), -1) for t in traces])
        h = np.concatenate([t.h[layer] for t in traces])
        ctx.middle_ref[layer] = v
        ctx.inverters[f"kv{layer}/ridge"] = inversion.fit_inverter(kv, toks, ctx.weights, "ridge", lam=10.0)
        ctx.inverters[f"v{layer}/ridge"] = inversion.fit_inverter(v, toks, ctx.weights, "ridge", lam=10.0)
        ctx.inverters[f"vsorted{layer}/ridge"] = inversion.fit_inverter(
            inversion.sorted_rows(v), toks, ctx.weights, "ridge", lam=10.0
        )
        ctx.inverters[f"ffn{layer}/ridge"] = inversion.fit_inverter(h, toks, ctx.weights, "ridge", lam=10.0)
        if mlp:
            ctx.inverters[f"kv{layer}/mlp"] = inversion.fit_inverter(
                kv, toks, ctx.weights, "mlp", epochs=epochs
            )
            ctx.inverters[f"ffn{layer}/mlp"] = inversion.fit_inverter(
                h, toks, ctx.weights, "mlp", epochs=epochs
            )


def run_setting(
    ctx: Context,
    setting: Setting,
    prompts: Sequence[Array],
    n_new: int,
    seed: int = 0,
    sequential: bool = True,
    reorder: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every attack on the views of ``prompts`` under ``setting``; metrics averaged over prompts."""
    w = ctx.weights
    acc: dict[str, list[float]] = {}
    tables: list[dict[str, dict[str, float]]] = []

    def put(key: str, value: float) -> None:
        acc.setdefault(key, []).append(float(value))

    for pi, ids in enumerate(prompts):
        ids = np.asarray(ids, dtype=np.int64)
        view, gen = _engine_view(w, ids, setting, n_new, seed + pi, ctx.public)
        meta = open_meta(view)
        n, L = int(meta["n"]), w.config.n_layers
        _, middle, _ = setting.config.blocks(L)
        # vocabulary matching, block 1 QKV (bag) and attention (fingerprints)
        m0 = view.select(stage="qkv", layer=0)[0]
        t_qkv, _ = vocab_match.match_block1_qkv(m0.arrays["x"], w, bool(m0.meta.get("normalized", False)))
        put("vm_qkv1_bag_recall", _bag_scores(t_qkv, ids)["recall"])
        t_att, _ = vocab_match.match_block1_attn(
            stage_array(view, "attn", 0, "k"), stage_array(view, "attn", 0, "v"), w
        )
        put("vm_attn1_pos_acc", float(np.mean(t_att == ids)))
        t_res, d_res = vocab_match.match_block1_residual(
            stage_array(view, "o", 0), stage_array(view, "ffn", 0), w
        )
        put("vm_resid1_bag_recall", _bag_scores(t_res[d_res < 1e-6], ids)["recall"])
        if middle:
            ell = middle.start
            caches = shared_caches(view, w)
            kk, vv = caches[ell]
            target = np.concatenate([kk.reshape(n, -1), vv.reshape(n, -1)], axis=1)
            inv = ctx.inverters.get(f"kv{ell}/ridge")
            for kind in ("ridge", "mlp"):
                key = f"kv{ell}/{kind}"
                if key in ctx.inverters:
                    pred = ctx.inverters[key].predict(target)[:, 0]
                    put(f"inv_cache_{kind}_pos_acc", float(np.mean(pred == ids)))
            if sequential:

                def ranker(t: Array, inv: Any = inv) -> Array:
                    sims = inv.embed(t[None, :]) @ inv.table.T
                    return np.argsort(-sims[0])

                rec, _ = vocab_match.match_sequential(target, w, ell, "kv", ranker=ranker if inv else None)
                put("vm_cache_seq_pos_acc", float(np.mean(rec == ids)))
                steps = len(view.select(stage="gen_mid"))
                if steps:
                    gx = np.concatenate([stage_array(view, "gen_mid", ell, step=s) for s in range(steps)])
                    xinv = None
                    g_rec, _ = vocab_match.match_sequential(gx, w, ell, "x", prefix=rec, ranker=xinv)
                    put("vm_gen_seq_acc", float(np.mean(g_rec == np.asarray(gen[:steps]))))
            # attention stage of the first middle block: naive / σ-recovered / sorted inversion
            v_obs = stage_array(view, "attn", ell, "v").reshape(n, -1)
            if f"v{ell}/ridge" in ctx.inverters:
                put(
                    "inv_attn_naive_pos_acc",
                    float(np.mean(ctx.inverters[f"v{ell}/ridge"].predict(v_obs)[:, 0] == ids)),
                )
                idx = inversion.recover_column_permutation(v_obs, ctx.middle_ref[ell])
                put(
                    "inv_attn_sigma_rec_pos_acc",
                    float(np.mean(ctx.inverters[f"v{ell}/ridge"].predict(v_obs[:, idx])[:, 0] == ids)),
                )
                srt = ctx.inverters[f"vsorted{ell}/ridge"].predict(inversion.sorted_rows(v_obs))[:, 0]
                put("inv_attn_sorted_pos_acc", float(np.mean(srt == ids)))
                f_rows = stage_array(view, "ffn", ell)
                for kind in ("ridge", "mlp"):
                    if f"ffn{ell}/{kind}" in ctx.inverters:
                        pred = ctx.inverters[f"ffn{ell}/{kind}"].predict(f_rows)[:, 0]
                        put(f"inv_ffn_{kind}_bag_recall", _bag_scores(pred, ids)["recall"])
            # decoy detection by residual linking, at the first middle block
            _, _, fr = decoy_detect.residual_links(
                stage_array(view, "qkv", ell),
                stage_array(view, "o", ell),
                stage_array(view, "ffn", ell),
                w,
                ell,
                bool(view.select(stage="qkv", layer=ell)[0].meta.get("normalized")),
            )
            rows = len(fr)
            put("decoy_link_real_found", fr.sum() / n)
            put("decoy_link_decoys_rejected", 1.0 if rows == n else (rows - fr.sum()) / (rows - n))
        # LLM-assisted reordering of the block-1 bag (decoys included; n is public)
        if reorder and ctx.lm is not None:
            order = llm_reorder.beam_reorder(t_qkv, n, ctx.lm, beam=4)
            sc = llm_reorder.order_scores(order, ids)
            put("llm_reorder_exact", sc["exact"])
            put("llm_reorder_kendall_tau", sc["kendall_tau"])
            put("llm_reorder_recall", sc["recall"])
        if len(gen) >= 2 and middle:
            tables.append(statelessness.statelessness_table(view, w, ids, gen, recovered=t_att))
        if progress:
            progress(f"{setting.name} prompt {pi}")
    out: dict[str, Any] = {
        "setting": setting.name,
        "mechanism": setting.mechanism,
        "config": setting.config.to_dict(),
        "identity_roles": sorted(setting.identity),
        "metrics": {k: float(np.mean(v)) for k, v in acc.items()},
    }
    if tables:
        out["statelessness"] = {
            pol: {m: float(np.mean([t[pol][m] for t in tables])) for m in tables[0][pol]} for pol in tables[0]
        }
    return out


def noise_fitting(
    weights: ModelWeights, public: Array, victim: Array, beta: float, seed: int = 0, mlp_epochs: int = 300
) -> dict[str, float]:
    """The paper's fixed- vs one-time-noise fitting attack on block-1 rows N(E[t]) + α: inverters fitted
    on public rows under the same noise process, and the Laplace maximum-likelihood vocabulary match.
    ``fixed``: one noise row reused for every row (train and victim); ``one-time``: fresh noise per row."""
    from .vocab_match import match_block1_qkv, normalized_table

    rng = np.random.default_rng(seed)
    tab = normalized_table(weights)
    d = tab.shape[1]
    fixed = laplace_noise((1, d), beta, rng)
    out: dict[str, float] = {}
    for mode in ("fixed", "one-time"):

        def enc(ids: Array, mode: str = mode) -> Array:
            noise = fixed if mode == "fixed" else laplace_noise((len(ids), d), beta, rng)
            return np.asarray(tab[ids] + noise)

        xtr, xte = enc(public), enc(victim)
        for kind in ("ridge", "mlp"):
            inv = inversion.fit_inverter(xtr, public, weights, kind, lam=10.0, epochs=mlp_epochs, seed=seed)
            out[f"{mode}/{kind}"] = float(np.mean(inv.predict(xte)[:, 0] == victim))
        out[f"{mode}/vocab-ml"] = float(np.mean(match_block1_qkv(xte, weights, True)[0] == victim))
    return out


def run_all(
    ctx: Context,
    prompts: Sequence[Array],
    settings: Sequence[Setting],
    n_new: int = 4,
    enum_prompts: Sequence[Array] = (),
    progress: Progress | None = None,
    mlp_epochs: int = 300,
    sequential: bool = True,
) -> dict[str, Any]:
    """Every setting, the noise-fitting experiment (β sweep), order enumeration for tiny n, and the
    search-space table. Returns a JSON-ready dict."""
    w = ctx.weights
    results = [
        run_setting(ctx, s, prompts, n_new, sequential=sequential, progress=progress) for s in settings
    ]
    victim = np.concatenate([np.asarray(p) for p in prompts])
    fitting = {
        str(b): noise_fitting(w, ctx.public, victim, b, mlp_epochs=mlp_epochs) for b in (1.0, 5.0, 10.0)
    }
    if progress:
        progress("noise fitting")
    enum: dict[str, float] = {}
    if ctx.lm is not None and enum_prompts:
        rng = np.random.default_rng(1)
        for r in (0, 2):
            hits = []
            for p in enum_prompts:
                bag = np.concatenate([p, ctx.public[rng.integers(0, len(ctx.public), size=r)]])
                hits.append(bruteforce.enumerate_orders(bag, len(p), ctx.lm) == [int(t) for t in p])
            enum[f"r={r}"] = float(np.mean(hits))
        if progress:
            progress("enumeration")
    n0 = len(prompts[0])
    view, _ = _engine_view(w, np.asarray(prompts[0]), settings[-1], 0, 99, ctx.public)
    return {
        "model": w.config.name,
        "n_prompts": len(prompts),
        "prompt_len": n0,
        "n_new": n_new,
        "settings": results,
        "noise_fitting": fitting,
        "enumeration": enum,
        "enumeration_n": len(enum_prompts[0]) if len(enum_prompts) else 0,
        "search_space": bruteforce.stage_search_spaces(view, w.config)[:8],
    }
