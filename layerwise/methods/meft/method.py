"""``meft``: memory-efficient fine-tuning with reversible adapters (Liao, Tan, Monz; NeurIPS 2023).

Adapters turn the pretrained blocks into two-stream reversible couplings (see
:mod:`layerwise.methods.meft.reversible` and ``docs/meft.md``)::

    y1 = lam * x1 + F(x2);   y2 = beta * x2 + G(y1)

========  =====  =====  ============================================  ===========================  =====
variant   lam    beta   F                                             G                            swap
========  =====  =====  ============================================  ===========================  =====
1         0.1    1      pretrained block, adapter parallel to FFN     adapter                      yes
2         1      0.1    adapter                                       block, parallel FFN adapter  yes
3         0.1    0.1    attention sub-block, adapter after out proj   FFN sub-block, parallel ad.  no
========  =====  =====  ============================================  ===========================  =====

Both streams start as the input of the lowest reversible block. The output of the stack is the
mean of the two streams for encoders (BERT family) and ``main + 0.1 * other`` for decoders (Llama
family), where ``main`` is the stream that carries the pretrained computation (the second for
MEFT1/3, the first for MEFT2) -- the paper's ``0.1 * first + second`` for OPT with MEFT1.

Blocks below ``reversible_layers`` run as ordinary frozen blocks (no graph, no stored
activations). Only the adapters and (for classification) the task head train. Backward
reconstructs the inputs of each block from its outputs; ``anchor_every`` stores the exact streams
every k blocks so reconstruction chains stay short (float32 error grows about 10x per block).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from layerwise.errors import ConfigError, ModelError
from layerwise.methods.base import Method, Plan
from layerwise.methods.meft.reversible import Adapter, ReversibleStack, RevLayer
from layerwise.methods.registry import register

#: Default anchor spacing by precision and variant, chosen from the measurements in docs/meft.md:
#: float32 MEFT1/2 every 2 blocks (gradients within ~3e-6 of autograd on MiniLM and SmolLM2),
#: MEFT3 (error ~100x per block) and bf16 autocast every block (nothing reconstructed is used).
DEFAULT_ANCHOR_EVERY = {("fp32", 1): 2, ("fp32", 2): 2, ("fp32", 3): 1, ("bf16", 1): 1, ("bf16", 2): 1, ("bf16", 3): 1}
COUPLINGS = {1: (0.1, 1.0, True), 2: (1.0, 0.1, True), 3: (0.1, 0.1, False)}


@dataclass
class MeftConfig:
    name: str = "meft"
    default_lr: ClassVar[float] = 0.003
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    variant: int = 1
    """1, 2 or 3: the paper's MEFT1/2/3 couplings."""
    r: int = 16
    """Adapter bottleneck width."""
    dropout: float = 0.1
    """Dropout inside the adapters."""
    reversible_layers: list[int] | None = None
    """Blocks that are reversible: a contiguous range ending at the top block; None = all. Blocks below run ordinary and frozen."""
    anchor_every: int | None = None
    """Store the exact streams every k reversible blocks (0 = only the output, as in the paper; 1 = no reconstruction). None: 2 for MEFT1/2 in float32, else 1 (MEFT3, bf16 autocast); see docs/meft.md."""
    max_reconstruction_error: float | None = 1e-4
    """Bound on the relative error of reconstructed block inputs, measured at every anchor each step; None = no bound."""
    on_error: Literal["anchor", "stop"] = "anchor"
    """When the bound is exceeded: halve anchor_every for the following steps (anchor) or stop the run (stop)."""
    check: bool = False
    """Also store every block's inputs to measure the reconstruction error at every block (costs memory; diagnostics)."""
    reversible_backward: bool = True
    """False: same network, ordinary autograd (stores all activations); for comparisons."""
    train_head: bool | None = None
    """Train the task head; None = yes for classification, no for causal LM (adapters only)."""
    coupling: Literal["auto", "paper", "centered"] = "auto"
    """paper: the paper's couplings as written. centered: a pretrained residual sub-network R in F or G is
    used as R(x) - lam * x (F) or R(y) - beta * y (G), so the scaled stream adds only the difference of the
    two streams (still exactly invertible); keeps a pre-LN residual decoder near its pretrained function.
    auto: paper for encoders (post-LN), centered for decoders (docs/meft.md, "Quality")."""

    def validate(self) -> None:
        if self.variant not in COUPLINGS:
            raise ConfigError(f"method.variant must be 1, 2 or 3 (MEFT1/2/3), got {self.variant}")
        if self.r < 1:
            raise ConfigError(f"method.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.anchor_every is not None and self.anchor_every < 0:
            raise ConfigError(f"method.anchor_every must be 0 (no anchors) or a positive number of blocks, got {self.anchor_every}")
        if self.max_reconstruction_error is not None and self.max_reconstruction_error <= 0:
            raise ConfigError("method.max_reconstruction_error must be positive (or null for no bound)")
        if self.coupling not in ("auto", "paper", "centered"):
            raise ConfigError(f"method.coupling must be auto, paper or centered, got {self.coupling!r}")
        if self.reversible_layers is not None and not self.reversible_layers:
            raise ConfigError("method.reversible_layers must name at least one block (or be null for all blocks)")


# ------------------------------------------------------------------------------------------
# Architecture-specific sub-blocks. ``attn(layer, x, aux, adapter)`` is the attention sub-block
# with an optional sequential adapter after the output projection; ``ffn(layer, a, adapter)``
# the feed-forward sub-block with an optional parallel adapter; ``block`` the whole block.
class _BertOps:
    family = "encoder"

    @staticmethod
    def attn(layer, x, aux, adapter=None):
        att = layer.attention
        if adapter is None:
            return att(x, aux.get("attention_mask"))[0]
        ctx, _ = att.self(x, attention_mask=aux.get("attention_mask"))
        out = att.output
        h = out.dense(ctx)
        h = h + adapter(h)
        h = out.dropout(h)
        return out.LayerNorm(h + x)

    @staticmethod
    def ffn(layer, a, adapter=None):
        h = layer.output.dense(layer.intermediate(a))
        h = layer.output.dropout(h)
        if adapter is not None:
            h = h + adapter(a)
        return layer.output.LayerNorm(h + a)

    @staticmethod
    def ordinary(layer, h, aux):
        return layer(h, aux.get("attention_mask"))


class _LlamaOps:
    family = "decoder"

    @staticmethod
    def attn(layer, x, aux, adapter=None):
        h = layer.input_layernorm(x)
        o, _ = layer.self_attn(
            hidden_states=h,
            attention_mask=aux.get("attention_mask"),
            position_ids=aux.get("position_ids"),
            position_embeddings=aux.get("position_embeddings"),
        )
        if adapter is not None:
            o = o + adapter(o)
        return x + o

    @staticmethod
    def ffn(layer, a, adapter=None):
        h = layer.post_attention_layernorm(a)
        out = a + layer.mlp(h)
        if adapter is not None:
            out = out + adapter(h)
        return out

    @staticmethod
    def ordinary(layer, h, aux):
        return layer(
            h,
            attention_mask=aux.get("attention_mask"),
            position_ids=aux.get("position_ids"),
            position_embeddings=aux.get("position_embeddings"),
        )


def _family(model: nn.Module):
    base = getattr(model, "base_model", model)
    enc = getattr(base, "encoder", None)
    if enc is not None and isinstance(getattr(enc, "layer", None), nn.ModuleList):
        first = enc.layer[0]
        if all(hasattr(first, a) for a in ("attention", "intermediate", "output")):
            return base, _BertOps, enc.layer
    if all(hasattr(base, a) for a in ("layers", "rotary_emb", "embed_tokens", "norm")):
        first = base.layers[0]
        if all(hasattr(first, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
            return base, _LlamaOps, base.layers
    raise ModelError(
        f"method meft supports BERT-family encoders and Llama-family decoders; {type(model).__name__} "
        "is neither: use another method (lora, lift, ...)"
    )


def _centered(fn, scale: float):
    """``fn(x) - scale * x``: the residual sub-network minus the part of its skip path the coupling already adds."""
    return lambda x, aux: fn(x, aux) - scale * x


def _make_layer(ops, layer: nn.Module, variant: int, index: int, centered: bool = False) -> RevLayer:
    lam, beta, swap = COUPLINGS[variant]
    if variant == 1:
        f = lambda x, aux: ops.ffn(layer, ops.attn(layer, x, aux), layer.meft_ffn)  # noqa: E731
        g = lambda y, aux: layer.meft_adapter(y)  # noqa: E731
        f_res, g_res = True, False
    elif variant == 2:
        f = lambda x, aux: layer.meft_adapter(x)  # noqa: E731
        g = lambda y, aux: ops.ffn(layer, ops.attn(layer, y, aux), layer.meft_ffn)  # noqa: E731
        f_res, g_res = False, True
    else:
        f = lambda x, aux: ops.attn(layer, x, aux, layer.meft_attn)  # noqa: E731
        g = lambda y, aux: ops.ffn(layer, y, layer.meft_ffn)  # noqa: E731
        f_res = g_res = True
    if centered:
        f = _centered(f, lam) if f_res else f
        g = _centered(g, beta) if g_res else g
    return RevLayer(f=f, g=g, params=list(layer.parameters()), lam=lam, beta=beta, swap=swap, index=index)


class MeftRunner:
    """Runs the blocks of a MEFT model: the ordinary prefix, then the reversible stack."""

    def __init__(self, ops, blocks: nn.ModuleList, start: int, variant: int, stack: ReversibleStack, default_anchor: int | None):
        self.ops = ops
        self.blocks = blocks
        self.start = start
        self.variant = variant
        self.stack = stack
        self.default_anchor = default_anchor  # None: choose by autocast at each call

    def __call__(self, h: torch.Tensor, aux: dict) -> torch.Tensor:
        for layer in list(self.blocks)[: self.start]:
            h = self.ops.ordinary(layer, h, aux)
        if self.default_anchor is None:
            bf16 = torch.is_autocast_enabled(h.device.type) or h.dtype in (torch.bfloat16, torch.float16)
            self.stack.anchor_every = DEFAULT_ANCHOR_EVERY["bf16" if bf16 else "fp32", self.variant]
            self.default_anchor = self.stack.anchor_every  # fixed from the first call; tightened later if needed
        s1, s2 = self.stack.run(h, aux)
        if self.ops.family == "encoder":
            out = (s1 + s2) * 0.5
        else:
            main, other = (s1, s2) if self.variant == 2 else (s2, s1)
            out = main + 0.1 * other
        return out.to(h.dtype)


def _bert_encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    h = self._meft_runner(hidden_states, {"attention_mask": attention_mask})
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h)


@functools.cache
def _causal_mask_arguments() -> frozenset[str]:
    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config, inputs_embeds, attention_mask, position_ids):
    """transformers' causal mask without a cache. Its signature changed within 5.x (``input_embeds`` then
    ``inputs_embeds``; ``cache_position`` required, then optional, then gone; ``past_key_values`` then ``cache``), so
    every argument goes in by the name this version takes (read once)."""
    from transformers.masking_utils import create_causal_mask

    names = _causal_mask_arguments()
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
              "inputs_embeds" if "inputs_embeds" in names else "input_embeds": inputs_embeds}
    if "cache_position" in names:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in names})
    return create_causal_mask(**kwargs)


def _llama_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                         use_cache=None, past_key_values=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
    mask = _causal_mask(self.config, inputs_embeds, attention_mask, position_ids)
    pe = self.rotary_emb(inputs_embeds, position_ids=position_ids)
    aux = {"attention_mask": mask, "position_embeddings": pe, "position_ids": position_ids}
    h = self._meft_runner(inputs_embeds, aux)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(h))


def apply_meft(model: nn.Module, config: MeftConfig, *, log=None) -> MeftRunner:
    """Insert adapters into ``model`` (in place) and route its blocks through a :class:`MeftRunner`."""
    base, ops, blocks = _family(model)
    n = len(blocks)
    rev = list(range(n)) if config.reversible_layers is None else sorted(set(config.reversible_layers))
    for b in rev:
        if not isinstance(b, int) or b < 0 or b >= n:
            raise ConfigError(f"method.reversible_layers: block {b} does not exist; this model has blocks 0..{n - 1}")
    if rev != list(range(rev[0], n)):
        raise ConfigError(
            f"method.reversible_layers must be a contiguous range ending at the top block {n - 1} "
            f"(ordinary frozen blocks below), got {rev}: for example [{max(0, n - 2)}, {n - 1}]"
        )
    d = model.config.hidden_size
    centered = config.coupling == "centered" or (config.coupling == "auto" and ops.family == "decoder")
    layers = []
    for i in rev:
        block = blocks[i]
        p = next(block.parameters())
        kw = {"dtype": p.dtype, "device": p.device}
        block.add_module("meft_ffn", Adapter(d, config.r, config.dropout, **kw))
        if config.variant == 3:
            block.add_module("meft_attn", Adapter(d, config.r, config.dropout, **kw))
        else:
            block.add_module("meft_adapter", Adapter(d, config.r, config.dropout, **kw))
        layers.append(_make_layer(ops, block, config.variant, i, centered=centered))
    stack = ReversibleStack(
        layers,
        anchor_every=config.anchor_every or 0,
        check=config.check,
        max_error=config.max_reconstruction_error,
        on_error=config.on_error,
        reversible=config.reversible_backward,
        log=log,
    )
    runner = MeftRunner(ops, blocks, rev[0], config.variant, stack, config.anchor_every)
    if ops is _BertOps:
        target, fwd = base.encoder, _bert_encoder_forward
    else:
        target, fwd = base, _llama_model_forward
    target._meft_runner = runner
    target.forward = types.MethodType(fwd, target)
    # Recorded in config.json on save, so load_meft() can rebuild the same network.
    model.config.layerwise_meft = {k: v for k, v in vars(config).items() if k != "name"} | {"reversible_layers": rev}
    return runner


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".meft_" in name]


def load_meft(path: str | Path, auto_class=None):
    """Load a model saved by a ``meft`` run (``<run>/model``): the base model, the adapters
    re-inserted from ``config.layerwise_meft``, and all weights from ``model.safetensors``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    meft = getattr(cfg, "layerwise_meft", None)
    if meft is None:
        raise ModelError(f"{path} was not saved by a meft run (no layerwise_meft in config.json)")
    if auto_class is None:
        arch = (cfg.architectures or [""])[0]
        auto_class = AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto_class.from_config(cfg)
    # Runs saved before `coupling` existed used the paper's couplings.
    apply_meft(model, MeftConfig(**({"coupling": "paper"} | meft)))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".meft_" in k for k in missing):
        raise ModelError(f"{path}: weights do not match the MEFT network (unexpected {unexpected[:3]}, missing {missing[:3]})")
    return model


@register
class Meft(Method):
    name = "meft"
    Config = MeftConfig
    adapter_only = trainer_ok = True

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        if config.reversible_layers is not None:
            self.check_blocks(config.reversible_layers, "method.reversible_layers")
        self.runner: MeftRunner | None = None
        self.messages: list[str] = []
        self.train_head = config.train_head if config.train_head is not None else self.task == "classification"

    def _log(self, msg: str) -> None:
        self.messages.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def prepare(self, model):
        torch.manual_seed(self.seed)
        self.runner = apply_meft(model, self.config, log=self._log)
        params = adapter_parameters(model)
        self.adapter_params = {id(p) for p in params}
        if self.train_head:
            self.adapter_params |= {id(p) for p in self.anatomy.head_parameters()}
        return model

    def plan(self, step: int) -> Plan:
        blocks = tuple(layer.index for layer in self.runner.stack.layers) if self.runner else tuple(range(self.num_blocks))
        return Plan(blocks, embeddings=False, head=self.train_head)

    def recomputed_blocks(self) -> tuple[int, ...]:
        """Reversible blocks run forward without a graph; backward runs each one's forward again to differentiate it."""
        return tuple(layer.index for layer in self.runner.stack.layers) if self.runner else ()

    def log_values(self) -> dict:
        if self.runner is None or not self.runner.stack.errors:
            return {}
        stack = self.runner.stack
        out = {"meft_rel_error": max(stack.errors.values()), "meft_anchor_every": stack.anchor_every}
        if self.config.check:
            out["meft_rel_error_by_block"] = {str(k): v for k, v in sorted(stack.errors.items())}
        return out

    def finish(self, output) -> dict:
        if self.runner is None:
            return {}
        stack = self.runner.stack
        return {
            "meft": {
                "variant": self.config.variant,
                "reversible_layers": [layer.index for layer in stack.layers],
                "anchor_every": stack.anchor_every,
                "max_reconstruction_error_seen": stack.max_seen,
                "last_reconstruction_errors": {str(k): v for k, v in sorted(stack.errors.items())},
                "anchor_tightened": stack.tightened,
            }
        }
