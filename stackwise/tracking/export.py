"""Exporting a trained Rack: a StackWise folder (safetensors + spec + config) or a Hugging Face
`LlamaForCausalLM` folder.

``safetensors``: ``weights.safetensors`` and ``rack_spec.json`` (what `load_rack` needs), the
run's resolved ``config.yaml`` and, for a BPE run, its ``tokenizer.json``. `load_rack(folder)`
and `stackwise generate folder` read it back.

``hf``: a causal rack whose every block is what Llama computes — mha/gqa attention with RoPE
(one theta), RMSNorm (one eps), SwiGLU, no biases — becomes a ``transformers`` Llama folder:

1. Check the rack (`hf_incompatibility`); anything Llama cannot express is refused with one line
   naming the block and option, before anything is written.
2. Map the weights: the fused ``qkv_proj`` splits into ``q_proj``/``k_proj``/``v_proj``, and
   the rows of every Q and K head are permuted from StackWise's RoPE pairing (channels
   ``(2i, 2i+1)`` rotate together) to Llama's ``rotate_half`` pairing (``(i, i + d/2)``), both
   rotating pair i by ``theta^(-2i/d)``; scores ``qᵀk`` are unchanged because Q and K get the
   same permutation. A tied head stays tied (``tie_word_embeddings``), an untied one is
   ``lm_head.weight``.
3. Load them strictly into a `LlamaForCausalLM` of the matching `LlamaConfig` and save it
   (``config.json``, ``model.safetensors``, ``generation_config.json``).
4. Write the tokenizer with the same ids: a BPE run's own JSON, or for the byte tokenizer a
   ``tokenizers`` byte-level vocabulary (byte b = id b, no merges) plus [PAD] [MASK] [BOS]
   [EOS] at 256..259, saved with ``split_special_tokens`` so that text spelling a special
   token is encoded as its bytes, as StackWise does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stackwise.model.attention import GroupedQueryAttention
from stackwise.tracking.models import CONFIG_FILE, TOKENIZER_FILE, save_rack_files

if TYPE_CHECKING:
    from stackwise.model.architecture import Rack
    from stackwise.tracking.models import TrainedModel

EXPORT_FORMATS = ("hf", "safetensors")
DEFAULT_MAX_POSITIONS = 2048


class ExportError(ValueError):
    """A rack or destination that cannot be exported as asked (one line, for the user)."""


# --------------------------------------------------------------------------------------------
# destination
# --------------------------------------------------------------------------------------------


def check_destination(out_dir: Path) -> None:
    """Refuse a destination that is a file or a folder with something in it."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "a file" if not out_dir.is_dir() else "a folder that is not empty"
        raise ExportError(f"{out_dir}: is {what}; export writes into a new or empty folder")


def _write_into(out_dir: Path, write: Any) -> list[Path]:
    """Run ``write(staging)`` in a sibling staging folder, then move its files into `out_dir`,
    so a failure half way leaves nothing behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        out_dir.mkdir(exist_ok=True)
        written = []
        for path in sorted(staging.iterdir()):
            target = out_dir / path.name
            path.replace(target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def export_safetensors(model: TrainedModel, out_dir: str | Path) -> list[Path]:
    """Weights, spec, resolved config and (BPE) tokenizer of `model` into `out_dir`."""
    out_dir = Path(out_dir)
    check_destination(out_dir)

    def write(folder: Path) -> None:
        save_rack_files(model.rack, folder)
        if model.config_yaml is not None:
            (folder / CONFIG_FILE).write_text(model.config_yaml, encoding="utf-8")
        if model.tokenizer_json is not None:
            (folder / TOKENIZER_FILE).write_text(model.tokenizer_json, encoding="utf-8")

    return _write_into(out_dir, write)


# --------------------------------------------------------------------------------------------
# Hugging Face Llama
# --------------------------------------------------------------------------------------------


def hf_incompatibility(rack: Rack) -> str | None:
    """Why `rack` cannot be a `LlamaForCausalLM` (the first block or option that prevents it),
    or None when it can."""
    blocks = rack.blocks
    if not blocks:
        return "the rack has no blocks"
    first = blocks[0].spec()
    layout = ("d_ff", "n_heads", "n_kv_heads", "rope_theta")
    block_index = 0
    for stack_index, stack in enumerate(rack._typed_stacks()):
        for stack_block, block in enumerate(stack._typed_blocks()):
            spec = block.spec()
            where = f"block {block_index} (stack {stack_index}, block {stack_block})"
            block_index += 1
            if spec["attention_type"] not in ("mha", "gqa"):
                return (
                    f"{where}: attention_type {spec['attention_type']}; Llama has only mha/gqa "
                    f"attention"
                )
            if spec["attention_mode"] != "causal":
                return f"{where}: attention_mode {spec['attention_mode']}; Llama is causal"
            if not spec["use_rope"]:
                return f"{where}: use_rope false; Llama applies RoPE in every layer"
            if spec["norm_eps"] != rack.norm_eps:
                return (
                    f"{where}: norm_eps {spec['norm_eps']} differs from the final norm's "
                    f"{rack.norm_eps}; Llama has one rms_norm_eps"
                )
            for key in layout:
                if spec[key] != first[key]:
                    return (
                        f"{where}: {key} {spec[key]} differs from block 0's {first[key]}; "
                        f"Llama layers are all alike"
                    )
    return None


def llama_config_kwargs(
    rack: Rack, special_ids: dict[str, int], max_positions: int | None = None
) -> dict[str, Any]:
    """`LlamaConfig` arguments of a Llama-compatible rack."""
    spec = rack.blocks[0].spec()
    return {
        "vocab_size": rack.vocab_size,
        "hidden_size": rack.d_model,
        "intermediate_size": spec["d_ff"],
        "num_hidden_layers": rack.n_blocks,
        "num_attention_heads": spec["n_heads"],
        "num_key_value_heads": spec["n_kv_heads"],
        "head_dim": rack.d_model // spec["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": max_positions or DEFAULT_MAX_POSITIONS,
        "rms_norm_eps": rack.norm_eps,
        "rope_theta": spec["rope_theta"],
        "tie_word_embeddings": rack.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": rack.init_std,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
    }


def rope_pairs_to_halves(head_dim: int) -> torch.Tensor:
    """Row order that turns StackWise's RoPE pairs ``(2i, 2i+1)`` into Llama's ``(i, i+d/2)``:
    Llama channel j reads StackWise channel ``perm[j]`` (the even channels, then the odd)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def llama_state_dict(rack: Rack) -> dict[str, torch.Tensor]:
    """The rack's weights under `LlamaForCausalLM`'s names (see the module docstring, step 2)."""
    spec = rack.blocks[0].spec()
    n_heads, n_kv = spec["n_heads"], spec["n_kv_heads"]
    head_dim = rack.d_model // n_heads
    perm = rope_pairs_to_halves(head_dim)

    def heads_permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
        return weight.view(heads, head_dim, -1)[:, perm].reshape(heads * head_dim, -1)

    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rack.token_embedding.weight}
    for index, block in enumerate(rack.blocks):
        prefix = f"model.layers.{index}."
        attn = block.attn
        assert isinstance(attn, GroupedQueryAttention)  # checked by hf_incompatibility
        q, k, v = attn.qkv_proj.weight.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim))
        state.update(
            {
                prefix + "input_layernorm.weight": block.attn_norm.weight,
                prefix + "self_attn.q_proj.weight": heads_permuted(q, n_heads),
                prefix + "self_attn.k_proj.weight": heads_permuted(k, n_kv),
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.o_proj.weight": attn.o_proj.weight,
                prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
                prefix + "mlp.gate_proj.weight": block.ffn.gate_proj.weight,
                prefix + "mlp.up_proj.weight": block.ffn.up_proj.weight,
                prefix + "mlp.down_proj.weight": block.ffn.down_proj.weight,
            }
        )
    state["model.norm.weight"] = rack.norm.weight
    state["lm_head.weight"] = rack.lm_head.weight
    return {name: tensor.detach().float().clone().contiguous() for name, tensor in state.items()}


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of byte-level BPE: printable Latin-1 bytes stand for themselves,
    every other byte for the next unused code point from 256 on (so no byte is a space or a
    control character)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer_json() -> str:
    """A ``tokenizers`` JSON tokenizer that encodes text exactly as StackWise's byte tokenizer:
    UTF-8 byte b is id b; [PAD] [MASK] [BOS] [EOS] are 256..259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from stackwise.data.tokenizer import SPECIAL_TOKENS

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256..259, in this order
    return str(tokenizer.to_str())


def _special_ids(model: TrainedModel) -> dict[str, int]:
    tokenizer = model.tokenizer
    return {
        "pad": tokenizer.pad_id,
        "mask": tokenizer.mask_id,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
    }


def export_hf(model: TrainedModel, out_dir: str | Path) -> list[Path]:
    """`model` as a `transformers` `LlamaForCausalLM` folder in `out_dir` (module docstring).
    Raises `ExportError` before writing anything when the rack is not Llama-compatible."""
    out_dir = Path(out_dir)
    problem = hf_incompatibility(model.rack)
    if problem is not None:
        raise ExportError(f"cannot export as a Hugging Face Llama: {problem}")
    check_destination(out_dir)
    try:
        from tokenizers import Tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError:
        raise ExportError(
            "--format hf needs the `transformers` package: pip install 'stackwise[hf]'"
        ) from None

    special = _special_ids(model)
    config = LlamaConfig(**llama_config_kwargs(model.rack, special, model.seq_len))
    state = llama_state_dict(model.rack)
    if model.rack.tie_embeddings:
        state.pop("lm_head.weight")

    def write(folder: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one line per export is enough
        llama = LlamaForCausalLM(config)
        # strict for every weight of ours; a tied head is the embedding there too.
        missing, unexpected = llama.load_state_dict(state, strict=False)
        missing = [name for name in missing if name != "lm_head.weight"]
        if missing or unexpected:
            raise ExportError(f"weight names do not match Llama's: {missing or unexpected}")
        llama.save_pretrained(folder, safe_serialization=True)
        tokenizer_json = model.tokenizer_json or byte_tokenizer_json()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(tokenizer_json),
            pad_token="[PAD]",
            mask_token="[MASK]",
            bos_token="[BOS]",
            eos_token="[EOS]",
            # The byte tokenizer encodes the text "[MASK]" as its six bytes; a BPE run's own
            # tokenizer turns it into the special token, and so does its export.
            split_special_tokens=model.tokenizer_json is None,
        )
        tokenizer.save_pretrained(folder)

    return _write_into(out_dir, write)


def export(model: TrainedModel, out_dir: str | Path, format_: str) -> list[Path]:
    """Export `model` in `format_` (``hf`` or ``safetensors``); returns the files written."""
    if format_ == "hf":
        return export_hf(model, out_dir)
    if format_ == "safetensors":
        return export_safetensors(model, out_dir)
    raise ExportError(
        f"--format: unknown format {format_!r}; use one of {', '.join(EXPORT_FORMATS)}"
    )
