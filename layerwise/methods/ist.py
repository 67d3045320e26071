"""``ist``: Importance-aware Sparse Tuning (Yao et al., arXiv 2410.11772, EMNLP 2024 Findings).

A per-layer ``peft`` adapter (LoRA by default; DoRA and IA3 too) of which only a few layers
train at each step, chosen by a learned per-layer importance score:

* ``scores`` start at 0; a HIGHER score means a LESS important layer.
* Every step, ``update_layers`` (default ``max(1, L // 4)``) layers are sampled without
  replacement with probabilities proportional to ``sigmoid(-score)``; only their adapter
  parameters (and the task head that ``peft`` trains, if any) train in that step.
* Every ``probe_every`` steps (not at step 0) the importance loop runs on one batch of
  ``importance_batch_size`` examples: ``probes`` times, ``suppress_layers`` (default
  ``max(1, L // 2)``) layers are sampled with probabilities proportional to ``sigmoid(score)``
  and their adapter output is scaled by ``suppress_scale``; the loss is taken in eval mode
  without grad and the scaling is restored exactly. With rewards ``r_k = exp(-loss_k)`` and
  advantages ``A_k = r_k - mean(r)``, each suppressed layer ``i`` of probe ``k`` gets
  ``s[i] += score_lr * A_k * p_i * (1 - p_i)`` with ``p = sigmoid(s)`` taken before the loop.

Beyond the official code: backward stops at the lowest selected layer (the engine freezes
everything else, so nothing below it is saved for backward), the probe batch can come from
the held-out split, probe time and forward passes are counted and logged, scores are logged
per step and drawn as a heat map (``importance.png``), and scores plus the probe stream's
position are part of :meth:`Ist.state_dict`. See ``docs/ist.md``.

L here is the number of blocks that hold adapter parameters (all of them with the default
target modules).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Literal

import torch
from peft.tuners.ia3.layer import IA3Layer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from layerwise.errors import ConfigError
from layerwise.methods.adapters import AdapterConfig, inject
from layerwise.methods.base import Method, Plan, seeded_generator
from layerwise.methods.registry import register

# Tags mixed into the seeds so the selection, suppression and probe-data streams are independent.
_SELECT, _SUPPRESS, _PROBE_DATA = 0x157, 0x5FF, 0xDA7A


@dataclass
class IstConfig(AdapterConfig):
    name: str = "ist"
    default_lr: ClassVar[float] = 0.01
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    adapter: Literal["lora", "dora", "ia3"] = "lora"
    """The per-layer PEFT module, injected with ``peft``."""
    feedforward_modules: list[str] | None = None
    """ia3 only: target modules whose INPUT is scaled; None = peft's default (or none when target_modules is set)."""
    update_layers: int | None = None
    """Layers whose adapters train per step; None = max(1, L // 4)."""
    probe_every: int = 10
    """Steps between importance loops (never at step 0); 0 turns the loop off (uniform random layers)."""
    probes: int = 3
    """Suppression probes per importance loop."""
    suppress_layers: int | None = None
    """Layers suppressed per probe; None = max(1, L // 2)."""
    suppress_scale: float = 0.25
    """Factor on a suppressed layer's adapter output."""
    score_lr: float = 10.0
    """Rate of the score update."""
    importance_batch: Literal["train", "heldout"] = "train"
    """Where the probe batch comes from: a separate seeded stream over the training split, or the held-out split."""
    importance_batch_size: int = 16
    """Examples in the probe batch."""
    optimizer_state: Literal["retain", "keep", "reset"] = "retain"
    """Optimizer state of layers not selected in a step: retain = stays where it is, untouched (one
    optimizer over all adapter parameters, as the official code); keep = stashed off the device until
    the layer is selected again; reset = dropped. Overrides train.optimizer_state for this method."""
    adapter_lr_scale: float = 1.0
    """Multiplier on train.lr for the layers' adapter parameters; the head that peft trains keeps
    train.lr. A layer's adapters train in about update_layers/L of the steps, so under Adam they move
    about that fraction as far as LoRA's at the same lr; L/update_layers restores the expected
    movement without raising the head's lr (which trains every step). 1 = the official code."""
    heatmap: bool = True
    """Write ``importance.png`` (score per layer x step) into the run folder."""

    def validate(self) -> None:
        super().validate()
        for key in ("probes", "importance_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("update_layers", "suppress_layers"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"method.{key} must be at least 1 (or null for the default), got {v}")
        if self.probe_every < 0:
            raise ConfigError(f"method.probe_every must be 0 (off) or more, got {self.probe_every}")
        if not (self.adapter_lr_scale > 0 and math.isfinite(self.adapter_lr_scale)):
            raise ConfigError(f"method.adapter_lr_scale must be a finite number > 0, got {self.adapter_lr_scale}")
        if self.suppress_scale < 0 or not math.isfinite(self.suppress_scale):
            raise ConfigError(f"method.suppress_scale must be a finite number >= 0, got {self.suppress_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.feedforward_modules is not None and self.adapter != "ia3":
            raise ConfigError("method.feedforward_modules applies to adapter: ia3 only")


@register
class Ist(Method):
    name = "ist"
    Config = IstConfig
    adapter_only = True
    switching = trainer_ok = True

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        self.optimizer_state = config.optimizer_state
        self.model = None
        self.layers: list[int] = []  # block index of each IST layer
        self._layer_params: list[list[torch.nn.Parameter]] = []
        self._layer_modules: list[list[BaseTunerLayer]] = []
        self._setup_for = None
        self.scores = torch.zeros(0, dtype=torch.float64)
        self._current: tuple[int, tuple[int, ...]] | None = None  # (step, selected blocks)
        self._probe_iter: Iterator[dict] | None = None  # injected probe batches (tests, custom loops)
        self._probe_epoch = 0
        self._probe_pos = 0
        self.probe_seconds = 0.0
        self.probe_forwards = 0
        self.probe_rounds = 0
        self.skipped_rounds = 0
        self.history: dict[str, list] = {"steps": [], "scores": [], "selected": []}

    # -- setup ---------------------------------------------------------------------------
    def prepare(self, model):
        model = inject(model, self.config, self.task, kind=self.config.adapter, feedforward_modules=self.config.feedforward_modules)
        self.adapter_params = {id(p) for p in model.parameters() if p.requires_grad}
        self.model = model
        self._setup()  # checks layer counts now, before anything is written
        return model

    def _setup(self) -> None:
        if self._setup_for is self.anatomy:
            return
        blocks = self.anatomy._current_blocks()
        layers, params, modules = [], [], []
        for b in range(self.num_blocks):
            ps = [p for p in self.anatomy.block_parameters(b) if id(p) in self.adapter_params]
            if not ps:
                continue
            ms = [m for m in blocks[b].modules() if isinstance(m, BaseTunerLayer)]
            for m in ms:
                if not isinstance(m, (LoraLayer, IA3Layer)):
                    raise ConfigError(f"ist cannot suppress adapter modules of type {type(m).__name__}: use adapter lora, dora or ia3")
            layers.append(b)
            params.append(ps)
            modules.append(ms)
        if not layers:
            raise ConfigError("ist found no adapter parameters in any block: check method.target_modules")
        L = len(layers)
        for key in ("update_layers", "suppress_layers"):
            v = getattr(self.config, key)
            if v is not None and v > L:
                raise ConfigError(f"method.{key}={v} exceeds the {L} layers that hold adapters: use 1..{L}")
        if len(self.scores) != L:
            self.scores = torch.zeros(L, dtype=torch.float64)
        self.layers, self._layer_params, self._layer_modules = layers, params, modules
        self._layer_param_ids = {id(p) for ps in params for p in ps}
        self._setup_for = self.anatomy

    @property
    def num_layers(self) -> int:
        self._setup()
        return len(self.layers)

    @property
    def update_count(self) -> int:
        return self.config.update_layers or max(1, self.num_layers // 4)

    @property
    def suppress_count(self) -> int:
        return self.config.suppress_layers or max(1, self.num_layers // 2)

    def attach(self, trainer) -> None:
        super().attach(trainer)
        self.model = trainer.model

    def lr_scale(self, p) -> float:
        """``adapter_lr_scale`` for the layers' adapter parameters, 1 for the rest (the head)."""
        self._setup()
        return float(self.config.adapter_lr_scale) if id(p) in self._layer_param_ids else 1.0

    def lr_scales(self) -> tuple[float, ...]:
        return (1.0, float(self.config.adapter_lr_scale))

    def set_probe_batches(self, batches: Iterable[dict]) -> None:
        """Use these batches for the importance loop instead of the run's data (tests, custom loops)."""
        self._probe_iter = iter(batches)

    def data_ready(self, model) -> None:
        # Refused before training rather than at the first importance loop: the Trainer hands its callbacks no held-out data.
        if self.config.importance_batch == "heldout" and self.context.eval_loader is None and self._probe_iter is None:
            raise ConfigError("method.importance_batch=heldout needs a held-out split, which transformers.Trainer does not give "
                              "its callbacks: use importance_batch=train, or call method.set_probe_batches(...) before training")

    # -- selection -----------------------------------------------------------------------
    def select(self, step: int) -> tuple[int, ...]:
        """Block indices trained at ``step``: a pure function of (seed, step, current scores)."""
        self._setup()
        weights = torch.sigmoid(-self.scores)
        idx = torch.multinomial(weights, self.update_count, replacement=False, generator=seeded_generator(self.seed, _SELECT, step))
        return tuple(sorted(self.layers[i] for i in idx.tolist()))

    def sample_suppressed(self, step: int, probe: int) -> list[int]:
        """Indices (into ``self.layers``) suppressed by probe ``probe`` of the loop at ``step``."""
        weights = torch.sigmoid(self.scores)
        g = seeded_generator(self.seed, _SUPPRESS, step, probe)
        return sorted(torch.multinomial(weights, self.suppress_count, replacement=False, generator=g).tolist())

    def plan(self, step: int) -> Plan:
        if self._current is None or self._current[0] != step:
            self._current = (step, self.select(step))
        return Plan(self._current[1], embeddings=False, head=True)

    def extra_forward_examples(self, step: int) -> int:
        """The importance loop's probe forwards, on the steps where it runs."""
        every = self.config.probe_every
        return self.config.probes * self.config.importance_batch_size if every and step > 0 and step % every == 0 else 0

    def before_step(self, step: int) -> None:
        every = self.config.probe_every
        if every and step > 0 and step % every == 0:
            self.importance_loop(step)
        self._current = (step, self.select(step))
        self.history["steps"].append(step)
        self.history["scores"].append(self.scores.tolist())
        self.history["selected"].append(list(self._current[1]))

    # -- importance loop -----------------------------------------------------------------
    @contextlib.contextmanager
    def suppress(self, layer_indices: Iterable[int], scale: float | None = None):
        """Scale the adapter output of the given IST layers by ``scale``; restore exactly on exit.

        LoRA and DoRA: the ``scaling`` factor on the low-rank product (for DoRA the magnitude
        vector is left alone, so only the low-rank branch is scaled). IA3: the learned vector
        ``l`` is pulled towards the identity, ``l <- 1 + scale * (l - 1)``, which scales the
        adapter's deviation from the frozen model. Original values are saved and put back.
        """
        self._setup()
        scale = self.config.suppress_scale if scale is None else scale
        saved_scaling: list[tuple[dict, dict]] = []
        saved_vectors: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for i in layer_indices:
                    for m in self._layer_modules[i]:
                        if isinstance(m, LoraLayer):
                            saved_scaling.append((m.scaling, dict(m.scaling)))
                            for key in m.scaling:
                                m.scaling[key] = m.scaling[key] * scale
                        elif isinstance(m, IA3Layer):
                            for vec in m.ia3_l.values():
                                saved_vectors.append((vec, vec.detach().clone()))
                                vec.sub_(1.0).mul_(scale).add_(1.0)
            yield
        finally:
            with torch.no_grad():
                # Reverse order, so a module listed twice still ends at its first saved value.
                for scaling, original in reversed(saved_scaling):
                    scaling.update(original)
                for vec, original in reversed(saved_vectors):
                    vec.copy_(original)

    def probe_loss(self, batch: dict, suppressed: list[int]) -> float:
        """Loss on ``batch`` with ``suppressed`` layers' adapters scaled down (eval mode, no grad)."""
        with self.suppress(suppressed), torch.no_grad(), self._autocast():
            loss = self.model(**batch).loss
        self.probe_forwards += 1
        return float(loss.float())

    def importance_loop(self, step: int) -> None:
        self._setup()
        t0 = time.perf_counter()
        batch = self._to_device(self.next_probe_batch())
        p = torch.sigmoid(self.scores)
        sets, losses = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for k in range(self.config.probes):
                    s_k = self.sample_suppressed(step, k)
                    sets.append(s_k)
                    losses.append(self.probe_loss(batch, s_k))
        finally:
            self.model.train(was_training)
        if all(math.isfinite(x) for x in losses):
            self.update_scores(sets, losses, p)
            self.probe_rounds += 1
        else:
            self.skipped_rounds += 1
        self.probe_seconds += time.perf_counter() - t0

    def update_scores(self, suppressed: list[list[int]], losses: list[float], p: torch.Tensor | None = None) -> None:
        """``s[i] += score_lr * A_k * p_i * (1 - p_i)`` for every layer i suppressed in probe k,
        with ``A_k = exp(-loss_k) - mean_j exp(-loss_j)`` and ``p = sigmoid(s)`` from before the update."""
        p = torch.sigmoid(self.scores) if p is None else p
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        for s_k, r_k in zip(suppressed, rewards):
            a_k = r_k - mean
            for i in s_k:
                self.scores[i] += self.config.score_lr * a_k * float(p[i]) * (1.0 - float(p[i]))

    # -- probe data ----------------------------------------------------------------------
    def next_probe_batch(self) -> dict:
        if self._probe_iter is not None:
            return next(self._probe_iter)
        ctx = self.context
        if ctx is None or ctx.train_loader is None:
            raise RuntimeError(
                "ist: the importance loop needs probe batches: run it through `layerwise train` (which sets "
                "method.context) or call method.set_probe_batches(...)"
            )
        if self.config.importance_batch == "heldout":
            if ctx.eval_loader is None:
                raise ConfigError("method.importance_batch=heldout needs a held-out split")
            loader = ctx.eval_loader
        else:
            loader = ctx.train_loader(0)
        ds, collate = loader.dataset, loader.collate_fn
        n, bs = len(ds), self.config.importance_batch_size
        if n <= bs:
            idx = list(range(n))
        else:
            if self._probe_pos + bs > n:
                self._probe_epoch += 1
                self._probe_pos = 0
            g = seeded_generator(self.seed, _PROBE_DATA, self._probe_epoch, self.config.importance_batch == "heldout")
            order = torch.randperm(n, generator=g)
            idx = order[self._probe_pos : self._probe_pos + bs].tolist()
            self._probe_pos += bs
        getitems = getattr(ds, "__getitems__", None)
        examples = getitems(idx) if callable(getitems) else [ds[i] for i in idx]
        return collate(examples)

    def _to_device(self, batch: dict) -> dict:
        device = self._device()
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _device(self):
        if self.trainer is not None:
            return self.trainer.device
        if self.context is not None and self.context.device is not None:
            return self.context.device
        return next(self.model.parameters()).device

    def _autocast(self):
        return self.trainer.autocast() if self.trainer is not None else contextlib.nullcontext()

    # -- reporting -----------------------------------------------------------------------
    def log_values(self) -> dict:
        return {
            "ist_layers": list(self.layers),
            "ist_scores": self.scores.tolist(),
            "ist_selected": list(self._current[1]) if self._current else [],
            "ist_probe_seconds": self.probe_seconds,
            "ist_probe_forwards": self.probe_forwards,
        }

    def finish(self, output) -> dict:
        counts = {b: 0 for b in self.layers}
        for sel in self.history["selected"]:
            for b in sel:
                counts[b] = counts.get(b, 0) + 1
        train_seconds = getattr(getattr(self.trainer, "totals", None), "seconds", 0.0) or 0.0
        extra = {
            "layers": list(self.layers),
            "final_scores": self.scores.tolist(),
            "selection_counts": {str(b): c for b, c in counts.items()},
            "probe_rounds": self.probe_rounds,
            "probe_rounds_skipped": self.skipped_rounds,
            "probe_forwards": self.probe_forwards,
            "probe_seconds": self.probe_seconds,
            "probe_fraction_of_train_seconds": self.probe_seconds / train_seconds if train_seconds else None,
        }
        if output is not None and self.history["steps"]:
            # Every step's scores (those its selection used: after that step's importance loop, if any) and selection.
            with open(Path(output) / "importance.jsonl", "w") as f:
                for step, sc, sel in zip(self.history["steps"], self.history["scores"], self.history["selected"]):
                    f.write(json.dumps({"step": step, "scores": sc, "selected": sel}) + "\n")
            extra["per_step"] = "importance.jsonl"
            if self.config.heatmap:
                path = Path(output) / "importance.png"
                self.draw_heatmap(path)
                extra["heatmap"] = path.name
        return {"ist": extra}

    def draw_heatmap(self, path: Path) -> None:
        """Scores (layer x step) above the per-step selection, as a PNG (Agg canvas, no global backend change)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = self.history["steps"]
        scores = torch.tensor(self.history["scores"], dtype=torch.float64).T.numpy()  # layer x step
        chosen = torch.zeros(len(self.layers), len(steps))
        row = {b: i for i, b in enumerate(self.layers)}
        for j, sel in enumerate(self.history["selected"]):
            for b in sel:
                chosen[row[b], j] = 1.0
        fig = Figure(figsize=(max(7.5, min(16.0, len(steps) / 25)), 2 + 0.5 * max(4, len(self.layers))))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        extent = (steps[0] - 0.5, steps[-1] + 0.5, self.layers[0] - 0.5, self.layers[-1] + 0.5)
        lim = float(abs(scores).max()) or 1.0
        im = ax1.imshow(scores, aspect="auto", origin="lower", cmap="coolwarm", vmin=-lim, vmax=lim, extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=ax1, label="score\n(high = less important)")
        ax1.set_ylabel("layer (block)")
        ax1.set_title("IST layer importance scores")
        im2 = ax2.imshow(chosen.numpy(), aspect="auto", origin="lower", cmap="Greys", vmin=0, vmax=1, extent=extent, interpolation="nearest")
        fig.colorbar(im2, ax=ax2, label="trained", ticks=[0, 1])
        ax2.set_ylabel("layer (block)")
        for ax in (ax1, ax2):
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax2.set_xlabel("step")
        ax2.set_title("layers trained per step")
        fig.tight_layout()
        fig.savefig(path, dpi=100)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Scores, probe-data stream position and counters. Selection and suppression draws are pure
        functions of (seed, step, scores), so this is all a resume needs to continue identically."""
        return {
            "seed": self.seed,
            "layers": list(self.layers),
            "scores": self.scores.tolist(),
            "probe_epoch": self._probe_epoch,
            "probe_pos": self._probe_pos,
            "probe_seconds": self.probe_seconds,
            "probe_forwards": self.probe_forwards,
            "probe_rounds": self.probe_rounds,
            "skipped_rounds": self.skipped_rounds,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._setup()
        if list(state["layers"]) != self.layers:
            raise ValueError(f"ist state is for layers {state['layers']}, this model has adapter layers {self.layers}")
        self.seed = state.get("seed", self.seed)
        self.scores = torch.tensor(state["scores"], dtype=torch.float64)
        self._probe_epoch = state["probe_epoch"]
        self._probe_pos = state["probe_pos"]
        self.probe_seconds = state.get("probe_seconds", 0.0)
        self.probe_forwards = state.get("probe_forwards", 0)
        self.probe_rounds = state.get("probe_rounds", 0)
        self.skipped_rounds = state.get("skipped_rounds", 0)
        self.history = {k: list(v) for k, v in state.get("history", {"steps": [], "scores": [], "selected": []}).items()}
        self._current = None
