"""The SALF probe: where is fine-tuning worth its cost? (docs/salf.md states every formula.)

One forward pass without gradients over a sample of the training data records the L+1 latent
spaces of a model with L blocks: ``h_0`` (the input of block 0, i.e. the embeddings' output) and
``h_{b+1}`` (the output of block ``b``), ``b = 0..L-1``. In each latent space a deviation from
the target is measured:

* causal LM: the task loss of the latent decoded by the model's own output path,
  ``D_s = CE(head(final_norm(h_s)), next tokens)``, token-weighted over the label tokens
  (the response tokens; prompt tokens carry label -100). ``D_L`` is the model's own loss.
* classification: the held-out cross-entropy of a softmax-regression probe on the
  mean-pooled latent (mean over the attention mask), fit on one half of the sample and scored
  on the other, both ways (2-fold cross-fitting), with the L2 strength the best of a small grid.

A power law in depth is fitted to the deviations, ``D^(s) = c + a (s + s0)^(-alpha)``
(``a >= 0``, ``alpha > 0``, ``s0 > 0``); the fitted gain of block ``b`` is
``g_b = D^(b) - D^(b+1)``. The recommended cut ``k*`` maximises the net gain of freezing
blocks ``0..k-1``: ``G(k) = sum_{b<k} (g_b - gbar * w_b)``, the fitted deviation reduction
the frozen prefix delivers beyond its cost share (``gbar`` the mean gain per cost unit,
``w_b`` block ``b``'s cost weight). Blocks ``0..k*-1`` are frozen, ``k*..L-1`` train.

A compute budget ``B`` (fraction of full fine-tuning's backward cost) allows the top
``m_B = max{m : (m + h) / (L + h) <= B}`` blocks, ``h`` the head's backward cost in block units.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import nn

from layerwise.anatomy import Anatomy, unwrap_model
from layerwise.engine.io import write_text
from layerwise.errors import ConfigError, DataError

__all__ = [
    "FORMULA",
    "collect_latents",
    "record_latents",
    "run_probe",
    "fit_power_law",
    "recommend",
    "cost_fractions",
    "budget_blocks",
    "write_outputs",
    "format_table",
]

FORMULA = "D(s) = c + a * (s + s0)^(-alpha), s = 0..L (latent index), a >= 0, alpha > 0, s0 > 0"
LAMBDAS = (1e-2, 1e-1, 3e-1, 1.0)
"""L2 strengths tried for the classification probe (penalty lambda * ||W||^2 on the mean CE)."""


class _StopForward(Exception):
    """Raised after the last block: the head's output is not needed by the probe."""


def _hidden(x):
    return x if torch.is_tensor(x) else x[0]


@contextlib.contextmanager
def record_latents(anatomy: Anatomy, stop_after_last: bool = False):
    """Forward hooks on the blocks; yields a list that each forward fills with the L+1 latents.

    ``latents[0]`` is block 0's input (positional or ``hidden_states=``), ``latents[b+1]`` block
    ``b``'s output (the tensor, or the first element of a tuple output).
    """
    blocks = anatomy._current_blocks()
    L = len(blocks)
    latents: list = [None] * (L + 1)

    def pre(module, args, kwargs):
        h = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        latents[0] = h.detach()

    def post(i):
        def hook(module, args, output):
            latents[i + 1] = _hidden(output).detach()
            if stop_after_last and i == L - 1:
                raise _StopForward

        return hook

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        yield latents
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_latents(model: nn.Module, anatomy: Anatomy, batch: dict, stop_after_last: bool = True) -> list[torch.Tensor]:
    """The L+1 latents of one batch (``labels`` are ignored); the head is skipped when ``stop_after_last``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with record_latents(anatomy, stop_after_last) as latents:
        try:
            model(**inputs)
        except _StopForward:
            pass
    if any(h is None for h in latents):
        raise ConfigError("the probe could not record every block's input and output: check the model's `blocks:` path")
    return list(latents)


# --------------------------------------------------------------------------------------------
# Deviation per latent space


def _decoder(model: nn.Module, anatomy: Anatomy):
    root = unwrap_model(model)
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    if head is None:
        raise ConfigError(
            f"{type(root).__name__} has no output embeddings (LM head) to decode latents with: the causal-LM probe needs one"
        )
    norms = anatomy._current("final_norm")

    def decode(h: torch.Tensor) -> torch.Tensor:
        for n in norms:
            h = n(h)
        return head(h)

    return decode


def _probe_deviation(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int, iters: int = 60) -> tuple[float, float]:
    """(D, lambda): 2-fold cross-fitted held-out CE of softmax regression, minimised over :data:`LAMBDAS`.

    The sample is split into two equal halves by a seeded permutation (one example is left out
    when the count is odd). For each fold f (fit on half f, score on the other) and each lambda,
    ``min_{W,b} mean CE(z W + b, y) + lambda ||W||^2`` on features standardised with the fit
    half's mean and std. The 2 x len(LAMBDAS) problems are independent; they are solved together
    by one LBFGS run (strong Wolfe) on the sum of their objectives, which has the same minimiser.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    idx = torch.stack([perm[:half], perm[half : 2 * half]])  # (2, half)
    x = x.double()
    fit_x, fit_y = x[idx], y[idx]  # (2, half, H), (2, half)
    test_x, test_y = x[idx.flip(0)], y[idx.flip(0)]
    mu = fit_x.mean(1, keepdim=True)
    sd = fit_x.std(1, keepdim=True).clamp_min(1e-6)
    a, b = (fit_x - mu) / sd, (test_x - mu) / sd
    lam = torch.tensor(LAMBDAS, dtype=torch.float64)
    G, H = len(LAMBDAS), x.shape[1]
    W = torch.zeros(2, G, H, classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(2, G, 1, classes, dtype=torch.float64, requires_grad=True)

    def ce(feats, labels):  # -> (2, G) mean CE per fold and lambda
        logits = torch.einsum("fnh,fghk->fgnk", feats, W) + bias
        target = labels[:, None, :].expand(2, G, labels.shape[1])
        return nn.functional.cross_entropy(logits.reshape(-1, classes), target.reshape(-1), reduction="none").view(2, G, -1).mean(-1)

    opt = torch.optim.LBFGS([W, bias], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (ce(a, fit_y) + lam * (W * W).sum((-1, -2))).sum()
        loss.backward()
        return loss

    # Tiny problems: one thread avoids thread start-up and spinning costs (large on busy machines).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            held_out = ce(b, test_y).mean(0)  # (G,): both folds, equal sizes
    finally:
        torch.set_num_threads(threads)
    g = int(held_out.argmin())
    return float(held_out[g]), LAMBDAS[g]


# --------------------------------------------------------------------------------------------
# Scaling-law fit, gains, cut, cost


def fit_power_law(dev: list[float]) -> dict:
    """Least-squares fit of ``D(s) = c + a (s + s0)^(-alpha)`` to ``dev[s]``, ``s = 0..L``.

    A grid over (alpha, s0) with (a, c) solved in closed form (``a`` clipped at 0) gives the start of
    ``scipy.optimize.least_squares`` within bounds; the better of the two is kept.
    """
    d = np.asarray(dev, dtype=float)
    s = np.arange(len(d), dtype=float)
    L = len(d) - 1

    def solve_ac(x):
        # Linear least squares for D ~ a*x + c with a >= 0.
        xm, dm = x.mean(), d.mean()
        var = ((x - xm) ** 2).sum()
        a = max(((x - xm) * (d - dm)).sum() / var, 0.0) if var > 0 else 0.0
        return a, dm - a * xm

    best = None
    for alpha in np.geomspace(0.02, 8.0, 50):
        for s0 in np.geomspace(0.1, max(2.0 * L, 1.0), 40):
            x = (s + s0) ** (-alpha)
            a, c = solve_ac(x)
            sse = float(((a * x + c - d) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, a, float(alpha), float(s0), c)
    _, a, alpha, s0, c = best
    scale = max(float(np.ptp(d)), 1e-12)

    def resid(p):
        return (p[3] + p[0] * (s + p[2]) ** (-p[1]) - d) / scale

    lo, hi = [0.0, 1e-3, 1e-2, -np.inf], [np.inf, 20.0, 10.0 * max(L, 1), np.inf]
    p0 = [min(max(a, 1e-9), 1e12), min(max(alpha, 2e-3), 19.9), min(max(s0, 2e-2), 9.9 * max(L, 1)), c]
    r = least_squares(resid, p0, bounds=(lo, hi))
    if r.success and float(((r.fun * scale) ** 2).sum()) < best[0]:
        a, alpha, s0, c = (float(v) for v in r.x)
    fitted = c + a * (s + s0) ** (-alpha)
    ss_res = float(((fitted - d) ** 2).sum())
    ss_tot = float(((d - d.mean()) ** 2).sum())
    return {
        "formula": FORMULA,
        "a": float(a),
        "alpha": float(alpha),
        "s0": float(s0),
        "c": float(c),
        "values": [float(v) for v in fitted],
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
    }


def recommend(fitted: list[float], weights: list[float] | None = None) -> dict:
    """Gains and the cut from fitted deviations ``fitted[0..L]``.

    ``gain[b] = fitted[b] - fitted[b+1]`` (block b, 0-based); ``excess[b] = gain[b] - gbar * w[b]``
    with ``gbar = (fitted[0] - fitted[L]) / sum(w)``; ``net[k] = sum_{b<k} excess[b]`` for
    ``k = 0..L``; ``k* = argmax net`` (the smallest on ties). Blocks ``0..k*-1`` freeze.
    """
    L = len(fitted) - 1
    w = list(weights) if weights is not None else [1.0] * L
    total_w = sum(w) or 1.0
    w = [x * L / total_w for x in w]  # mean 1
    gain = [fitted[b] - fitted[b + 1] for b in range(L)]
    gbar = (fitted[0] - fitted[L]) / L if L else 0.0
    excess = [g - gbar * wb for g, wb in zip(gain, w)]
    net = [0.0]
    for e in excess:
        net.append(net[-1] + e)
    tol = 1e-12 * max(1.0, max(abs(v) for v in fitted))
    k_star = 0
    for k, v in enumerate(net):
        if v > net[k_star] + tol:
            k_star = k
    return {"gain": gain, "mean_gain": gbar, "excess_gain": excess, "net_gain": net, "k_star": k_star}


def head_units(anatomy: Anatomy, task: str) -> float:
    """Backward cost of the head in units of a mean block (per-token parameters as the FLOP proxy).

    Causal LM: the final norm and LM head run on every token: their parameter count (the LM head
    counted even when tied to the input embeddings) over a block's. Classification: the pooler and
    classifier run once per sequence, not per token: 0.
    """
    if task != "causal_lm":
        return 0.0
    root = unwrap_model(anatomy.model)
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    mods = list(anatomy._current("final_norm")) + ([head] if head is not None else [])
    n_head = sum(p.numel() for m in mods for p in m.parameters())
    blocks = anatomy._current_blocks()
    n_block = sum(p.numel() for b in blocks for p in b.parameters()) / max(len(blocks), 1)
    return n_head / max(n_block, 1.0)


def cost_fractions(L: int, h: float) -> list[float]:
    """``f(m) = (m + h) / (L + h)``: backward cost of training the top m blocks (+ head) over full fine-tuning, m = 0..L."""
    return [(m + h) / (L + h) for m in range(L + 1)]


def check_budget(budget: float | None, key: str) -> None:
    """A compute budget is a fraction in (0, 1] of full fine-tuning's backward cost (None: no budget)."""
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"{key}: {budget} must be a fraction in (0, 1] of full fine-tuning's backward cost, e.g. 0.5")


def budget_blocks(fractions: list[float], budget: float) -> int:
    """The most top blocks whose cost fraction fits in ``budget`` (0 when even the head alone does not)."""
    m = 0
    for i, f in enumerate(fractions):
        if f <= budget + 1e-9:
            m = i
    return m


def choose_cut(probe: dict, budget: float | None) -> tuple[int, str]:
    """The cut a run uses: the budget's (L - m_B) when a budget is given, else k*."""
    L = probe["num_blocks"]
    if budget is None:
        return probe["recommendation"]["k_star"], "k*"
    m = budget_blocks(probe["cost"]["fraction_by_trained_blocks"], budget)
    return L - m, f"budget {budget:g}"


# --------------------------------------------------------------------------------------------
@dataclass
class _Acc:
    loss: float = 0.0
    tokens: int = 0


def run_probe(
    model: nn.Module,
    anatomy: Anatomy,
    batches: Iterable[dict],
    task: str,
    *,
    budget: float | None = None,
    seed: int = 0,
    log=None,
) -> dict:
    """Run the probe on ``batches`` (dicts of tensors with ``labels``) and return the probe record.

    The model is put in eval mode for the pass (dropout off) and restored afterwards. Returns
    the dict written as ``probe.json``: ``deviation`` (L+1 values), ``fit``, ``gain``,
    ``recommendation`` and ``cost``.
    """
    t0 = time.perf_counter()
    L = anatomy.num_blocks
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    accs = [_Acc() for _ in range(L + 1)]
    pooled: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    labels_all: list[torch.Tensor] = []
    examples = 0
    tokens = 0
    decode = _decoder(model, anatomy) if task == "causal_lm" else None
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                latents = collect_latents(model, anatomy, batch)
                examples += batch["input_ids"].shape[0]
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(batch["input_ids"])
                tokens += int(mask.sum())
                labels = batch["labels"]
                if task == "causal_lm":
                    target = labels[:, 1:]
                    keep = target != -100
                    n = int(keep.sum())
                    if n == 0:
                        continue
                    for s, h in enumerate(latents):
                        logits = decode(h[:, :-1][keep]).float()
                        accs[s].loss += float(nn.functional.cross_entropy(logits, target[keep], reduction="sum"))
                        accs[s].tokens += n
                else:
                    m = mask.unsqueeze(-1).to(latents[0].dtype)
                    for s, h in enumerate(latents):
                        pooled[s].append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).float().cpu())
                    labels_all.append(labels.cpu())
    finally:
        model.train(was_training)
    if examples == 0:
        raise DataError("the probe got no training examples: raise --samples or check the data")
    lambdas = None
    if task == "causal_lm":
        if accs[0].tokens == 0:
            raise DataError("no probe example has a label token to predict: raise data.max_length or --samples")
        deviation = [a.loss / a.tokens for a in accs]
        kind = "causal-LM loss of the latent decoded by final norm + LM head (nats/token, label tokens)"
    else:
        y = torch.cat(labels_all)
        classes = int(y.max()) + 1
        if examples < 8 or len(set(y.tolist())) < 2:
            raise DataError(
                f"the classification probe needs at least 8 examples of 2+ classes; the sample has {examples} "
                f"with {len(set(y.tolist()))} class(es): raise --samples"
            )
        deviation, lambdas = [], []
        for s in range(L + 1):
            d, lam = _probe_deviation(torch.cat(pooled[s]), y, classes, seed)
            deviation.append(d)
            lambdas.append(lam)
        kind = "held-out CE of a softmax-regression probe on the mean-pooled latent (2-fold cross-fit, nats/example)"
    fit = fit_power_law(deviation)
    blocks = anatomy._current_blocks()
    weights = [float(sum(p.numel() for p in b.parameters())) for b in blocks]
    rec = recommend(fit["values"], weights)
    h = head_units(anatomy, task)
    fractions = cost_fractions(L, h)
    k = rec["k_star"]
    out = {
        "num_blocks": L,
        "task": task,
        "samples": examples,
        "tokens": tokens,
        "label_tokens": accs[0].tokens if task == "causal_lm" else None,
        "deviation_kind": kind,
        "deviation": deviation,
        "probe_l2": lambdas,
        "fit": fit,
        "gain": rec["gain"],
        "mean_gain": rec["mean_gain"],
        "excess_gain": rec["excess_gain"],
        "net_gain": rec["net_gain"],
        "recommendation": {
            "k_star": k,
            "freeze_blocks": list(range(k)),
            "train_blocks": list(range(k, L)),
            "cost_fraction": fractions[L - k],
        },
        "cost": {
            "model": "f(m) = (m + h) / (L + h): backward cost of training the top m blocks and the head over full fine-tuning",
            "head_units": h,
            "fraction_by_trained_blocks": fractions,
        },
    }
    if budget is not None:
        cut, _ = choose_cut(out, budget)
        out["budget"] = {
            "budget": budget,
            "train_top": L - cut,
            "cut": cut,
            "train_blocks": list(range(cut, L)),
            "cost_fraction": fractions[L - cut],
        }
    out["seconds"] = time.perf_counter() - t0
    if log:
        log(format_table(out))
    return out


def validate_probe(probe: dict, num_blocks: int, source: str) -> None:
    """A probe record made for another depth cannot choose a cut for this model."""
    for key in ("num_blocks", "deviation", "recommendation", "cost"):
        if key not in probe:
            raise ConfigError(f"'{source}' is not a probe.json (no '{key}'): write one with `layerwise probe --output DIR`")
    if probe["num_blocks"] != num_blocks:
        raise ConfigError(
            f"'{source}' was made for a model with {probe['num_blocks']} blocks but this model has {num_blocks} blocks: "
            f"run `layerwise probe` on this model or set method.probe=null"
        )


def load_probe(path: str | Path, num_blocks: int) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"probe file '{path}' does not exist: write one with `layerwise probe --output DIR` or set method.probe=null")
    try:
        probe = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"probe file '{path}' is not valid JSON ({exc.__class__.__name__}): write it again with `layerwise probe`") from None
    if not isinstance(probe, dict):
        raise ConfigError(f"probe file '{path}' is not a probe.json: write one with `layerwise probe --output DIR`")
    validate_probe(probe, num_blocks, str(path))
    return probe


# --------------------------------------------------------------------------------------------
# Output


def format_table(probe: dict) -> str:
    L = probe["num_blocks"]
    k = probe["recommendation"]["k_star"]
    fit = probe["fit"]
    fr = probe["cost"]["fraction_by_trained_blocks"]
    cut_b = probe.get("budget", {}).get("cut")
    lines = [
        f"deviation: {probe['deviation_kind']}",
        f"fit: {fit['formula']}",
        f"     a={fit['a']:.4g} alpha={fit['alpha']:.4g} s0={fit['s0']:.4g} c={fit['c']:.4g}  R^2={fit['r2']:.3f}",
        "",
        f"{'latent':>6} {'where':<16} {'D':>9} {'D_fit':>9} | {'block':>5} {'gain':>9} {'excess':>9} {'net(k)':>9} {'cost(train b..)':>15}",
    ]
    for s in range(L + 1):
        where = "embeddings" if s == 0 else f"after block {s - 1}"
        left = f"{s:>6} {where:<16} {probe['deviation'][s]:>9.4f} {fit['values'][s]:>9.4f} |"
        if s < L:
            mark = []
            if s == k:
                mark.append("<- k*")
            if cut_b is not None and s == cut_b:
                mark.append("<- budget")
            right = (
                f" {s:>5} {probe['gain'][s]:>9.4f} {probe['excess_gain'][s]:>9.4f} {probe['net_gain'][s]:>9.4f} "
                f"{fr[L - s]:>15.2f} {' '.join(mark)}"
            )
        else:
            right = f" {'':>5} {'':>9} {'':>9} {probe['net_gain'][s]:>9.4f} {fr[0]:>15.2f}" + (" <- k* (head only)" if k == L else "")
        lines.append(left + right)
    rec = probe["recommendation"]
    lines.append("")
    lines.append(
        f"recommended cut k*={k}: freeze blocks 0..{k - 1}, train blocks {k}..{L - 1} + head "
        f"(backward cost {rec['cost_fraction']:.2f} of full; head = {probe['cost']['head_units']:.2f} block units)"
        if 0 < k < L
        else (f"recommended cut k*=0: train every block {0}..{L - 1} (cost 1.00)" if k == 0 else f"recommended cut k*={L}: train the head only")
    )
    if "budget" in probe:
        b = probe["budget"]
        lines.append(
            f"budget {b['budget']:g}: train the top {b['train_top']} blocks ({b['cut']}..{L - 1}), cost {b['cost_fraction']:.2f} of full"
        )
    lines.append(f"probe: {probe['samples']} examples, {probe['seconds']:.1f} s")
    return "\n".join(lines)


def plot(probe: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = probe["num_blocks"]
    k = probe["recommendation"]["k_star"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True)
    s = list(range(L + 1))
    ax1.plot(s, probe["deviation"], "o", label="deviation D_s (measured)")
    ax1.plot(s, probe["fit"]["values"], "-", label="power-law fit")
    ax1.set_ylabel("deviation (nats)")
    ax1.set_title(f"SALF probe: latent s = input of block s; cut k*={k}")
    ax2.bar([b + 0.5 for b in range(L)], probe["gain"], width=0.8, label="fitted gain of block b (between latents b and b+1)")
    ax2.axhline(probe["mean_gain"], color="gray", lw=0.8, ls=":", label="mean gain")
    ax2.set_ylabel("gain (nats)")
    ax2.set_xlabel("latent index s (block b spans s=b..b+1)")
    for ax in (ax1, ax2):
        ax.axvline(k, color="red", ls="--", label=f"k*={k}: blocks < {k} frozen")
        if "budget" in probe:
            ax.axvline(probe["budget"]["cut"], color="orange", ls="-.", label=f"budget {probe['budget']['budget']:g} cut")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(probe: dict, folder: str | Path) -> dict:
    """``probe.json`` and ``probe.png`` in ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "probe.json", json.dumps(probe, indent=2))
    plot(probe, folder / "probe.png")
    return {"json": str(folder / "probe.json"), "png": str(folder / "probe.png")}


def sample_batches(loader_factory, samples: int):
    """Batches from ``loader_factory(0)`` holding the first ``samples`` examples (the last batch trimmed)."""
    left = samples
    for batch in loader_factory(0):
        if left <= 0:
            break
        n = batch["input_ids"].shape[0]
        if n > left:
            batch = {k: v[:left] for k, v in batch.items()}
            n = left
        left -= n
        yield batch
