"""The StackWise model: Block -> Stack -> Rack, and the helpers that build them from specs.

- `Block`: one pre-norm transformer layer, ``h + attn(norm(h))`` then ``h + ffn(norm(h))``, with
  RMSNorm, one of the attentions in `stackwise.model.attention` and a SwiGLU FFN.
- `Stack`: an ordered group of Blocks; the unit of stack-wise training; can be frozen.
- `Rack`: token embedding -> Stacks -> final RMSNorm -> LM head (optionally tied to the
  embedding). It can also run in slices (`embed`, `forward_blocks`, `readout`) so a trainer can
  train one piece on cached hidden states. A causal Rack also runs incrementally
  (`new_cache`, `forward_cached`), which `Rack.generate` (`stackwise.model.generation`) uses.

A *block spec* is every setting of a block with its defaults resolved
(`stackwise.config.blocks.BlockSpec`; as a plain dict of `Block` keyword arguments from
`create_block_spec` and in saved racks); a *stack spec* is ``{stack_id, n_blocks, block_spec, freeze_blocks}``;
``Rack.spec()`` returns everything `create_rack_from_specs` needs to rebuild the same architecture.

Initialisation (GPT-2 / Llama style, done by the Rack): every linear and embedding weight is
drawn from N(0, init_std²); the projections that write into the residual stream (attention
``o_proj`` and FFN ``down_proj``) use ``init_std / sqrt(2 * n_blocks)``; norms start at 1. With a
``seed``, the draws come from a private ``torch.Generator``, so the weights do not depend on the
global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.config.base import BYTE_VOCAB_SIZE, ModelConfig, StackWiseConfig
from stackwise.config.blocks import BlockSpec
from stackwise.model.attention import (
    GroupedQueryAttention,
    KernelAttention,
    MultiHeadLatentAttention,
    RotaryEmbedding,
)
from stackwise.model.norm import RMSNorm


def _on_meta(module: nn.Module) -> bool:
    """Whether a module's first parameter is on the meta device (shapes only)."""
    first = next(module.parameters(), None)
    return first is not None and first.is_meta


# --------------------------------------------------------------------------------------------
# Block specs (resolved by `stackwise.config.blocks.BlockSpec`)
# --------------------------------------------------------------------------------------------


def create_block_spec(d_model: int, **options: Any) -> dict[str, Any]:
    """A validated block spec: `Block` keyword arguments with every default filled in.

    The settings and their defaults are those of `stackwise.config.blocks.BlockSpec` (``d_ff``,
    ``n_heads``, ``n_kv_heads``, ``attention_type``, ``attention_mode``, ``dropout``,
    ``freeze_up_proj``, ``use_rope``, ``rope_theta``, ``norm_eps``, the mla options
    ``kv_lora_rank``, ``q_lora_rank``, ``qk_rope_head_dim`` and the ``kernel_*`` options):
    ``n_heads`` from `default_n_heads`, ``d_ff`` from `default_d_ff`, ``n_kv_heads`` =
    ``n_heads`` (mla: none), mla's ``kv_lora_rank`` = ``d_model // 4``.
    """
    return BlockSpec.resolve(d_model, **options).as_dict()


# --------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases.

    With ``freeze_up_proj`` the up projection keeps its (seeded) initial weights: it has
    ``requires_grad=False``, gets no gradient and so no optimizer update, but it is still a
    parameter, saved and restored with the state_dict.
    """

    def __init__(self, d_model: int, d_ff: int, freeze_up_proj: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.freeze_up_proj = freeze_up_proj
        if freeze_up_proj:
            self.up_proj.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer layer: attention then SwiGLU FFN, a residual around each.

    ``block(h, attention_mask=None) -> h`` with ``h [B, T, d_model]`` and an optional padding
    mask ``[B, T]`` (1 = token, 0 = padding). Arguments are those of `create_block_spec`, which
    documents the defaults. A Block on its own has PyTorch's default initialisation; a `Rack`
    re-initialises all its blocks (see the module docstring).
    """

    def __init__(self, d_model: int, **options: Any) -> None:
        super().__init__()
        spec = BlockSpec.resolve(d_model, **options)
        self._spec = spec
        self.d_model = d_model
        self.attention_type: str = spec.attention_type
        self.attention_mode: str = spec.attention_mode
        self.attn_norm = RMSNorm(d_model, eps=spec.norm_eps)
        self.attn = _build_attention(spec)
        self.ffn_norm = RMSNorm(d_model, eps=spec.norm_eps)
        self.ffn = SwiGLU(d_model, spec.d_ff, spec.freeze_up_proj)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.dropout(self.attn(self.attn_norm(h), attention_mask))
        return h + self.dropout(self.ffn(self.ffn_norm(h)))

    def forward_cached(self, h: torch.Tensor, cache: Any) -> torch.Tensor:
        """`forward` for the next tokens ``h [B, T_new, D]`` given the attention's cache of the
        earlier ones (``block.attn.new_cache()``), which is extended; causal blocks only."""
        h = h + self.dropout(self.attn.forward_cached(self.attn_norm(h), cache))  # type: ignore[operator]
        return h + self.dropout(self.ffn(self.ffn_norm(h)))

    @property
    def is_causal(self) -> bool:
        return self.attention_mode == "causal"

    def spec(self) -> dict[str, Any]:
        """The block spec this block was built from (``Block(**block.spec())`` rebuilds it)."""
        return self._spec.as_dict()

    @property
    def block_spec(self) -> BlockSpec:
        """The resolved spec this block was built from."""
        return self._spec

    def freeze(self) -> None:
        """Stop gradients to every parameter of the block."""
        self.requires_grad_(False)

    def unfreeze(self) -> None:
        """Make the block trainable again; a frozen up projection stays frozen."""
        self.requires_grad_(True)
        if self.ffn.freeze_up_proj:
            self.ffn.up_proj.weight.requires_grad_(False)


def _build_attention(spec: BlockSpec) -> nn.Module:
    common: dict[str, Any] = {
        "d_model": spec.d_model,
        "n_heads": spec.n_heads,
        "attention_mode": spec.attention_mode,
        "use_rope": spec.use_rope,
        "rope_theta": spec.rope_theta,
    }
    if spec.attention_type in ("mha", "gqa"):
        return GroupedQueryAttention(n_kv_heads=spec.n_kv_heads, dropout=spec.dropout, **common)
    if spec.attention_type == "mla":
        # `BlockSpec.resolve` fills both in for mla.
        assert spec.kv_lora_rank is not None and spec.qk_rope_head_dim is not None
        return MultiHeadLatentAttention(
            kv_lora_rank=spec.kv_lora_rank,
            q_lora_rank=spec.q_lora_rank,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            dropout=spec.dropout,
            norm_eps=spec.norm_eps,
            **common,
        )
    return KernelAttention(
        n_kv_heads=spec.n_kv_heads,
        feature_map=spec.kernel_feature_map,
        n_features=spec.kernel_n_features,
        chunk_size=spec.kernel_chunk_size,
        seed=spec.kernel_seed,
        redraw_every=spec.kernel_redraw_every,
        sampling=spec.kernel_favor_sampling,
        **common,
    )


# --------------------------------------------------------------------------------------------
# Stack
# --------------------------------------------------------------------------------------------


class Stack(nn.Module):
    """An ordered group of Blocks, run one after another.

    ``freeze_blocks=True`` declares the stack frozen: its parameters start with
    ``requires_grad=False`` and `spec()` records the declaration. `freeze`/`unfreeze` change the
    current state; `is_frozen` is True when no parameter of the stack requires a gradient.
    """

    def __init__(self, blocks: Iterable[Block], stack_id: int, freeze_blocks: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stack_id = stack_id
        self.freeze_blocks = freeze_blocks
        if freeze_blocks:
            self.freeze()

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, attention_mask)
        return h

    def freeze(self) -> None:
        for block in self._typed_blocks():
            block.freeze()

    def unfreeze(self) -> None:
        """Make every block trainable (frozen up projections stay frozen)."""
        for block in self._typed_blocks():
            block.unfreeze()

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def _typed_blocks(self) -> list[Block]:
        return [block for block in self.blocks if isinstance(block, Block)]

    def spec(self) -> dict[str, Any]:
        """``{stack_id, n_blocks, block_spec, freeze_blocks}``; a stack of differing blocks gives
        ``block_specs`` (one per block) instead of ``block_spec``."""
        specs = [block.spec() for block in self._typed_blocks()]
        spec: dict[str, Any] = {"stack_id": self.stack_id, "n_blocks": len(specs)}
        if all(s == specs[0] for s in specs):
            spec["block_spec"] = specs[0]
        else:
            spec["block_specs"] = specs
        spec["freeze_blocks"] = self.freeze_blocks
        return spec


# --------------------------------------------------------------------------------------------
# Rack
# --------------------------------------------------------------------------------------------


class Rack(nn.Module):
    """The whole model: token embedding -> stacks -> final RMSNorm -> LM head.

    ``rack(input_ids [B, T], attention_mask=None) -> logits [B, T, vocab_size]``. The same path
    in slices: ``readout(forward_blocks(embed(ids), 0, n_blocks))``. With ``tie_embeddings`` the
    LM head's weight *is* the embedding weight (one tensor). Construction (re-)initialises every
    weight, including those of the given blocks (see the module docstring).
    """

    def __init__(
        self,
        stacks: Iterable[Stack],
        vocab_size: int,
        d_model: int,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.tie_embeddings = tie_embeddings
        self.norm_eps = norm_eps
        self.init_std = init_std
        self.seed = seed
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.stacks = nn.ModuleList(stacks)
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        for index, block in enumerate(self.blocks):
            if block.d_model != d_model:
                raise ValueError(f"block {index} has d_model {block.d_model}, the rack {d_model}")
        # One rotation table per shape for all blocks, not one per block (it is as large as a
        # sequence's queries of one head).
        self._rotary_tables: dict[tuple[Any, ...], torch.Tensor] = {}
        self.share_rotary_tables(self)
        self.reset_parameters(seed)

    def share_rotary_tables(self, module: nn.Module) -> None:
        """Let the rotary embeddings in `module` (the rack, or a block put into it) use the
        rack's rotation tables."""
        for child in module.modules():
            if isinstance(child, RotaryEmbedding):
                child.share_tables(self._rotary_tables)

    # -- structure ------------------------------------------------------------------------------

    @property
    def blocks(self) -> list[Block]:
        """All blocks in depth order (flat across stacks)."""
        return [block for stack in self._typed_stacks() for block in stack._typed_blocks()]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def is_causal(self) -> bool:
        """True when every block is causal (the rack can then be trained as a next-token LM)."""
        return all(block.is_causal for block in self.blocks)

    def _typed_stacks(self) -> list[Stack]:
        return [stack for stack in self.stacks if isinstance(stack, Stack)]

    # -- forward, whole and in slices -----------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        for stack in self.stacks:
            h = stack(h, attention_mask)
        return self.readout(h)

    def new_cache(self) -> list[Any]:
        """An empty incremental-forward cache: one attention cache per block (causal racks)."""
        if not self.is_causal:
            raise ValueError("a KV cache needs causal attention in every block")
        return [block.attn.new_cache() for block in self.blocks]  # type: ignore[operator]

    def forward_cached(self, input_ids: torch.Tensor, cache: list[Any]) -> torch.Tensor:
        """Logits ``[B, T_new, vocab]`` of the next tokens ``input_ids [B, T_new]`` after the
        tokens already in `cache` (`new_cache`), which is extended. Equals the last ``T_new``
        positions of ``rack(all tokens)`` up to rounding; no padding mask."""
        h = self.embed(input_ids)
        for block, block_cache in zip(self.blocks, cache, strict=True):
            h = block.forward_cached(h, block_cache)
        return self.readout(h)

    def generate(self, input_ids: torch.Tensor, **options: Any) -> Any:
        """Continue ``input_ids`` ([T] or [B, T]); see `stackwise.model.generation.generate`
        for the options (sampler, max_new_tokens, temperature, top_k, top_p, seed, ...).
        Returns a `stackwise.model.generation.Generation`."""
        from stackwise.model.generation import generate

        return generate(self, input_ids, **options)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> hidden states ``[B, T, d_model]`` (positions come from RoPE
        inside attention, so there is no position embedding)."""
        return self.token_embedding(input_ids)

    def forward_blocks(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the flat blocks ``[start, end)`` on hidden states ``h``."""
        if not 0 <= start <= end <= self.n_blocks:
            raise ValueError(f"block range [{start}, {end}) is outside [0, {self.n_blocks}]")
        for block in self.blocks[start:end]:
            h = block(h, attention_mask)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden states -> logits ``[B, T, vocab_size]``."""
        return self.lm_head(self.norm(h))

    def resident_modules(self) -> list[nn.Module]:
        """The embedding, every block whose weights are in memory, and the readout. Out of core
        the other blocks are away (on the meta device: in their files, or not drawn yet), and
        code that runs once per stage visits only these, so its cost does not grow with depth."""
        blocks = [block for block in self.blocks if not _on_meta(block)]
        return [self.token_embedding, *blocks, self.norm, self.lm_head]

    def resident_tree(self) -> list[nn.Module]:
        """The rack, its stack containers and every module inside `resident_modules`: what
        ``eval()`` / ``train()`` reach of the rack without visiting the blocks away."""
        containers: list[nn.Module] = [self, self.stacks]
        for stack in self._typed_stacks():
            containers += [stack, stack.blocks]
        return [*containers, *(m for top in self.resident_modules() for m in top.modules())]

    def stage_modules(
        self, start: int, end: int, indices: Sequence[int] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of what a stage over blocks ``[start, end)`` runs: the
        embedding, those blocks (or the blocks `indices`, in that order) and the readout,
        without visiting the others."""
        wanted = list(range(start, end)) if indices is None else list(indices)
        where: dict[int, tuple[int, int]] = {}
        first = 0
        for s, stack in enumerate(self._typed_stacks()):
            n = len(stack.blocks)
            where.update((i, (s, i - first)) for i in wanted if first <= i < first + n)
            first += n
        named: list[tuple[str, nn.Module]] = [("token_embedding", self.token_embedding)]
        for i in wanted:
            s, b = where[i]
            named.append((f"stacks.{s}.blocks.{b}", self.stacks[s].blocks[b]))  # type: ignore[index, arg-type]
        return [*named, ("norm", self.norm), ("lm_head", self.lm_head)]

    def readout_parameters(self) -> list[nn.Parameter]:
        """Parameters of the readout (final norm + LM head). With tied embeddings the LM head
        weight is the embedding weight and is *not* included: it belongs to the embedding."""
        params = list(self.norm.parameters())
        if not self.tie_embeddings:
            params += list(self.lm_head.parameters())
        return params

    @torch.no_grad()
    def untie_head(self) -> bool:
        """Give a tied LM head its own weight, initialised as a copy of the embedding.

        Depth-wise training freezes the embedding after its first stage (the cached trunk
        output depends on it); an untied head can keep training in every later stage. The rack's
        ``tie_embeddings`` and ``spec()`` then say the head is untied, so a saved rack rebuilds
        the same way. Returns False when the head was already untied.
        """
        if not self.tie_embeddings:
            return False
        embedding = self.token_embedding.weight
        self.lm_head.weight = nn.Parameter(
            embedding.detach().clone(), requires_grad=embedding.requires_grad
        )
        self.tie_embeddings = False
        return True

    # -- freezing -------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop gradients to every parameter."""
        self.requires_grad_(False)

    def unfreeze(self) -> None:
        """Make everything trainable, except stacks declared ``freeze_blocks`` and frozen up
        projections (use this rather than ``requires_grad_(True)``, which would undo both)."""
        self.requires_grad_(True)
        for stack in self._typed_stacks():
            if stack.freeze_blocks:
                stack.freeze()
            else:
                stack.unfreeze()

    # -- initialisation -------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2/Llama-style init (module docstring); reproducible when ``seed`` is given."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        residual_std = self.init_std / math.sqrt(2 * max(1, self.n_blocks))
        seen: set[int] = set()
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                if id(module.weight) in seen:  # the tied LM head: already drawn as the embedding
                    continue
                seen.add(id(module.weight))
                is_residual = name.endswith(("o_proj", "down_proj"))
                _normal_(module.weight, residual_std if is_residual else self.init_std, generator)

    # -- accounting -----------------------------------------------------------------------------

    def get_parameter_count(self, trainable_only: bool = False) -> int:
        """Number of parameters; a tensor shared by several modules (tied weights) counts once."""
        unique = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in unique if p.requires_grad or not trainable_only)

    def flops_per_token(self, n_ctx: int) -> int:
        """Forward FLOPs per token at context length ``n_ctx``: ``2 * N_matmul`` (every linear
        weight, the LM head included; embedding lookups are free) plus each block's attention
        term (QKᵀ and AV over the full context for softmax attention, no causal discount;
        for kernel attention the state products plus, in causal mode, the chunk × chunk
        products). Training costs about 3x this."""
        matmul = {
            id(m.weight): m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)
        }
        attention = sum(block.attn.attention_flops_per_token(n_ctx) for block in self.blocks)  # type: ignore[operator]
        return 2 * sum(matmul.values()) + attention

    def estimate_mfu(
        self, tokens_per_iter: int, n_ctx: int, dt: float, peak_flops: float = 312e12
    ) -> float:
        """Model FLOPs utilisation of a training iteration (forward + backward ≈ 3x forward)
        that processed ``tokens_per_iter`` tokens in ``dt`` seconds, relative to ``peak_flops``
        (default: A100 bf16 dense, 312 TFLOP/s)."""
        flops = 3 * self.flops_per_token(n_ctx) * tokens_per_iter
        return flops / dt / peak_flops

    # -- specs ----------------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable: ``create_rack_from_specs(**rack.spec())`` rebuilds the same
        architecture (and, with a seed, the same initial weights)."""
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "stack_specs": [stack.spec() for stack in self._typed_stacks()],
            "tie_embeddings": self.tie_embeddings,
            "norm_eps": self.norm_eps,
            "init_std": self.init_std,
            "seed": self.seed,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Rack:
        return create_rack_from_specs(**spec)


def _normal_(weight: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if weight.is_meta:  # a rack built on the meta device (shapes only) has nothing to draw
        return
    if generator is None:
        weight.normal_(0.0, std)
    else:  # draw on the CPU generator, then copy: same numbers on any device
        weight.copy_(torch.empty(weight.shape).normal_(0.0, std, generator=generator))


# --------------------------------------------------------------------------------------------
# Helpers with the names of the StackWise API
# --------------------------------------------------------------------------------------------


def create_stack_from_spec(
    stack_id: int,
    n_blocks: int,
    block_spec: Mapping[str, Any] | None = None,
    freeze_blocks: bool = False,
    block_specs: Sequence[Mapping[str, Any]] | None = None,
) -> Stack:
    """A Stack of ``n_blocks`` blocks built from ``block_spec`` (or one spec per block from
    ``block_specs``)."""
    if (block_spec is None) == (block_specs is None):
        raise ValueError("give exactly one of block_spec or block_specs")
    if block_specs is None:
        block_specs = [block_spec] * n_blocks  # type: ignore[list-item]
    if len(block_specs) != n_blocks:
        raise ValueError(f"n_blocks is {n_blocks} but {len(block_specs)} block_specs were given")
    return Stack([Block(**spec) for spec in block_specs], stack_id, freeze_blocks)


_STACK_SPEC_KEYS = {"stack_id", "n_blocks", "block_spec", "block_specs", "freeze_blocks"}


def saved_rack_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A rack spec read from a file, with what specs saved by earlier versions leave out made
    explicit: a block spec without ``kernel_favor_sampling`` drew FAVOR+'s ``orthogonal``
    features (the only draw there was), which matters when its projection is redrawn."""
    stacks = []
    for stack in spec["stack_specs"]:
        stack = dict(stack)
        for key in ("block_spec", "block_specs"):
            if stack.get(key) is None:
                continue
            blocks = stack[key] if key == "block_specs" else [stack[key]]
            blocks = [{"kernel_favor_sampling": "orthogonal", **block} for block in blocks]
            stack[key] = blocks if key == "block_specs" else blocks[0]
        stacks.append(stack)
    return {**spec, "stack_specs": stacks}


def create_rack_from_specs(
    vocab_size: int,
    d_model: int,
    stack_specs: Sequence[Mapping[str, Any]],
    tie_embeddings: bool = True,
    norm_eps: float = 1e-5,
    init_std: float = 0.02,
    seed: int | None = None,
) -> Rack:
    """A Rack from stack specs ``{stack_id, n_blocks, block_spec, freeze_blocks}``.

    ``stack_id`` defaults to the list position and ``freeze_blocks`` to False; a block spec
    without ``d_model`` gets the rack's.
    """
    stacks = []
    for index, stack_spec in enumerate(stack_specs):
        unknown = set(stack_spec) - _STACK_SPEC_KEYS
        if unknown:
            raise ValueError(f"stack_specs[{index}]: unknown keys {sorted(unknown)}")
        specs = stack_spec.get("block_specs") or [stack_spec["block_spec"]]
        for spec in specs:
            if spec.get("d_model", d_model) != d_model:
                raise ValueError(
                    f"stack_specs[{index}]: block d_model {spec['d_model']} != rack d_model {d_model}"
                )
        with_width = [{**spec, "d_model": d_model} for spec in specs]
        stacks.append(
            create_stack_from_spec(
                stack_id=stack_spec.get("stack_id", index),
                n_blocks=stack_spec["n_blocks"],
                block_spec=None if "block_specs" in stack_spec else with_width[0],
                block_specs=with_width if "block_specs" in stack_spec else None,
                freeze_blocks=stack_spec.get("freeze_blocks", False),
            )
        )
    return Rack(stacks, vocab_size, d_model, tie_embeddings, norm_eps, init_std, seed)


def create_simple_rack(
    n_stacks: int,
    blocks_per_stack: int,
    d_model: int,
    d_ff: int | None = None,
    n_heads: int | None = None,
    vocab_size: int = BYTE_VOCAB_SIZE,
    n_kv_heads: int | None = None,
    attention_type: str = "mha",
    attention_mode: str = "bidirectional",
    tie_embeddings: bool = True,
    seed: int | None = None,
    **block_options: Any,
) -> Rack:
    """``n_stacks`` stacks of ``blocks_per_stack`` identical blocks. Extra keyword arguments
    (dropout, freeze_up_proj, use_rope, ...) go to `create_block_spec`; ``vocab_size`` defaults
    to the byte tokenizer's 260."""
    block_spec = create_block_spec(
        d_model=d_model,
        d_ff=d_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        attention_type=attention_type,
        attention_mode=attention_mode,
        **block_options,
    )
    stack_specs = [
        {"stack_id": i, "n_blocks": blocks_per_stack, "block_spec": block_spec}
        for i in range(n_stacks)
    ]
    return create_rack_from_specs(
        vocab_size,
        d_model,
        stack_specs,
        tie_embeddings=tie_embeddings,
        norm_eps=block_spec["norm_eps"],
        seed=seed,
    )


def create_rack_from_config(config: Mapping[str, Any] | Any, seed: int | None = None) -> Rack:
    """A Rack from ``StackWiseConfig.to_dict()`` (or the config object, or a ``model`` section).

    Every ``model`` field is used: dimensions, attention (with the ``mla`` and ``kernel``
    options), rope, norm_eps, tie_embeddings, freeze_up_proj, init_std, and the stacks — the
    explicit ``stacks`` list when given (per stack: n_blocks, freeze_blocks and block overrides
    of attention_type, attention_mode, n_heads, n_kv_heads, d_ff, dropout, freeze_up_proj),
    else ``architecture.n_stacks`` x ``architecture.blocks_per_stack``. ``n_kv_heads`` applies to
    every attention type but mla (which has no K/V heads). ``vocab_size: null`` means the byte tokenizer's 260. The init seed is
    ``seed`` if given, else ``training.seed`` of a full config (a bare model section: global RNG).
    A stack's ``budget_fraction`` and ``lr`` are training options, read by the trainer.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if "model" in config:
        full = StackWiseConfig.from_dict(dict(config))
        model = full.model
        seed = full.training.seed if seed is None else seed
    else:
        model = ModelConfig.model_validate(dict(config))
    stack_specs = [
        {
            "stack_id": index,
            "n_blocks": stack.n_blocks,
            "block_spec": model.block_spec(stack).as_dict(),
            "freeze_blocks": stack.freeze_blocks,
        }
        for index, stack in enumerate(model.resolved_stacks())
    ]
    return create_rack_from_specs(
        vocab_size=BYTE_VOCAB_SIZE if model.vocab_size is None else model.vocab_size,
        d_model=model.d_model,
        stack_specs=stack_specs,
        tie_embeddings=model.tie_embeddings,
        norm_eps=model.norm_eps,
        init_std=model.init_std,
        seed=seed,
    )
