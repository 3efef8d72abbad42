"""Racks whose blocks are not all in memory: seeded lazy initialisation, pieces on disk.

Out-of-core depth-wise training keeps in memory only the piece being trained, the embedding and
the readout. The rest of the rack lives on the meta device (shapes only): blocks not trained yet
are drawn when their stage starts, finished blocks are written to safetensors files and loaded
back only when something must run them. How:

1. `SeededInit(rack)` walks the rack's modules in the order `Rack.reset_parameters(seed)` draws
   them, drawing every weight from the same generator into a scratch tensor. Meta weights outside
   the blocks (embedding, final norm, LM head) are materialised on the way; at the first draw of
   each block the generator's state is recorded. A meta rack therefore gets exactly the numbers
   an in-memory rack of the same seed has, without ever holding more than one weight at a time.
2. `SeededInit.block(index)` builds block `index` on the CPU from its spec (under a forked global
   RNG, so training's dropout stream is untouched) and redraws its weights from the recorded
   state.
3. `save_block` / `load_block` move a block to and from a safetensors file; `release_block`
   puts it back on the meta device. `replace_block` swaps a block module inside its stack.
4. `write_sharded_rack` writes a rack whose blocks live in piece files as sharded safetensors
   (one file per block plus one for the rest, and an index naming the file of every tensor);
   `load_sharded_rack` rebuilds it, memory-mapping each shard (pages are read when touched).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackwise.model.architecture import Block, Rack, create_rack_from_specs, saved_rack_spec
from stackwise.model.norm import RMSNorm

INDEX_FILE = "weights.index.json"
REST_FILE = "rest.safetensors"


def block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def block_is_meta(block: nn.Module) -> bool:
    """True when the block's weights are not in memory."""
    return _is_meta(block)


def _block_of(rack: Rack) -> dict[int, int]:
    """Module id -> index of the block it belongs to."""
    owner: dict[int, int] = {}
    for index, block in enumerate(rack.blocks):
        for module in block.modules():
            owner[id(module)] = index
    return owner


class SeededInit:
    """The seeded initial weights of a rack, drawn piece by piece (see the module docstring)."""

    @torch.no_grad()
    def __init__(self, rack: Rack) -> None:
        if rack.seed is None:
            raise ValueError("lazy initialisation needs a rack built with a seed")
        self.rack = rack
        generator = torch.Generator().manual_seed(rack.seed)
        residual_std = rack.init_std / math.sqrt(2 * max(1, rack.n_blocks))
        owner = _block_of(rack)
        self.states: dict[int, torch.Tensor] = {}
        seen: set[int] = set()
        # The blocks' draws only move the generator on: they are drawn into one reused buffer
        # (the same numbers as into a tensor of their shape), not into a new tensor each, which
        # left the heap of a deep rack fragmented by hundreds of MB.
        largest = max(
            (m.weight.numel() for m in rack.modules() if isinstance(m, nn.Linear)), default=0
        )
        scratch = torch.empty(largest)
        for name, module in rack.named_modules():
            block = owner.get(id(module))
            if block is not None and block not in self.states:
                self.states[block] = generator.get_state()
            if isinstance(module, RMSNorm):
                if block is None and module.weight.is_meta:
                    module.weight = nn.Parameter(
                        torch.ones(module.weight.shape), module.weight.requires_grad
                    )
            elif isinstance(module, nn.Linear | nn.Embedding):
                if id(module.weight) in seen:  # a tied LM head: drawn as the embedding
                    continue
                seen.add(id(module.weight))
                std = residual_std if name.endswith(("o_proj", "down_proj")) else rack.init_std
                if block is None and module.weight.is_meta:
                    drawn = torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                    module.weight = nn.Parameter(drawn, module.weight.requires_grad)
                elif module.weight.numel() <= scratch.numel():
                    scratch[: module.weight.numel()].normal_(0.0, std, generator=generator)
                else:
                    torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
        if rack.tie_embeddings:  # the head shares the (now materialised) embedding weight
            rack.lm_head.weight = rack.token_embedding.weight

    @torch.no_grad()
    def block(self, index: int) -> Block:
        """Block `index` with its seeded initial weights, on the CPU."""
        template = self.rack.blocks[index]
        fresh = _new_block(template)
        generator = torch.Generator()
        generator.set_state(self.states[index])
        residual_std = self.rack.init_std / math.sqrt(2 * max(1, self.rack.n_blocks))
        for name, module in fresh.named_modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else self.rack.init_std
                module.weight.copy_(
                    torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                )
        return fresh


def _new_block(template: nn.Module) -> Block:
    """A CPU block with `template`'s spec, built without touching the global RNG (trainable as
    its spec declares: only frozen up projections are frozen)."""
    assert isinstance(template, Block)
    with torch.random.fork_rng(devices=[]):
        return Block(**template.spec())


def declared_frozen(rack: Rack, index: int) -> bool:
    """Whether block `index` sits in a stack declared frozen (``freeze_blocks``)."""
    first = 0
    for stack in rack._typed_stacks():
        first += len(stack.blocks)
        if index < first:
            return stack.freeze_blocks
    raise IndexError(f"block {index} is outside the rack's {first} blocks")


def replace_block(rack: Rack, index: int, block: nn.Module) -> None:
    """Put `block` in place of the rack's block `index` (inside its stack)."""
    first = 0
    for stack in rack._typed_stacks():
        n = len(stack.blocks)
        if index < first + n:
            stack.blocks[index - first] = block
            rack.share_rotary_tables(block)
            return
        first += n
    raise IndexError(f"block {index} is outside the rack's {first} blocks")


def save_block(block: nn.Module, path: str | Path) -> Path:
    """Write a block's weights (persistent buffers included) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in block.state_dict().items()
    }
    partial = path.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(path)
    return path


def load_block(template: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> Block:
    """A new block with `template`'s spec holding the weights saved in `path`."""
    fresh = _new_block(template)
    fresh.load_state_dict(_mapped_tensors(path), strict=True)
    return fresh.to(device)


def release_block(block: nn.Module) -> None:
    """Drop a block's weights from memory (it keeps its shapes on the meta device)."""
    block.to("meta")


def _mapped_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, backed by a private memory map of it: nothing is read
    until a tensor is touched, and writing to one never changes the file."""
    dtypes = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "I64": torch.int64,
    }
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    header_size = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8 : 8 + header_size])
    base = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes[entry["dtype"]]
        start, end = entry["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start)
        tensors[name] = flat.view(entry["shape"])
    return tensors


def _rest_state(rack: Rack) -> dict[str, torch.Tensor]:
    """Every tensor of the rack outside its blocks (a tied head once, as the embedding)."""
    block_modules = {id(m) for block in rack.blocks for m in block.modules()}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in rack.named_modules():
        if id(module) in block_modules:
            continue
        for key, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            state[f"{name}.{key}" if name else key] = tensor.detach().to("cpu").contiguous()
    return state


def _block_prefixes(rack: Rack) -> list[str]:
    names = {id(m): n for n, m in rack.named_modules()}
    return [names[id(block)] for block in rack.blocks]


def write_sharded_rack(rack: Rack, pieces: dict[int, Path], folder: str | Path) -> Path:
    """Write `rack` as sharded safetensors into `folder`: its blocks from the `pieces` files
    (block index -> file; blocks in memory are saved directly), the rest in one file, the spec
    and an index. The whole rack is never in memory."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for index, (prefix, block) in enumerate(zip(_block_prefixes(rack), rack.blocks, strict=True)):
        target = folder / block_file(index)
        if index in pieces:
            local = _mapped_tensors(pieces[index])
        else:
            local = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        shard = {f"{prefix}.{name}": tensor for name, tensor in local.items()}
        save_file(shard, str(target))
        weight_map.update(dict.fromkeys(shard, target.name))
        del local, shard
    rest = _rest_state(rack)
    save_file(rest, str(folder / REST_FILE))
    weight_map.update(dict.fromkeys(rest, REST_FILE))
    (folder / "rack_spec.json").write_text(
        json.dumps(rack.spec(), indent=2, sort_keys=True), encoding="utf-8"
    )
    (folder / INDEX_FILE).write_text(
        json.dumps({"weight_map": weight_map}, indent=2, sort_keys=True), encoding="utf-8"
    )
    return folder


# PyTorch's parameter initialisers that modules call as they are built (`nn.Linear`,
# `nn.Embedding`, …).
_INITS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
)


def _skipping_meta(init: Callable[..., Any]) -> Callable[..., Any]:
    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return skip


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building a rack of shapes only (a skeleton, or one whose
    blocks are drawn later), with PyTorch's default initialisers skipped on meta tensors: they
    have nothing to draw there, and run they bring in PyTorch's compiler stack (seconds of
    imports for a command that only plans). Other tensors are initialised as always."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name, init in saved.items():
        setattr(nn.init, name, _skipping_meta(init))
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def is_sharded_rack(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


def load_sharded_rack(folder: str | Path) -> Rack:
    """Rebuild a rack written by `write_sharded_rack`, mapping its shards lazily."""
    folder = Path(folder)
    spec = json.loads((folder / "rack_spec.json").read_text(encoding="utf-8"))
    with meta_device():
        rack = create_rack_from_specs(**saved_rack_spec(spec))
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        state.update(_mapped_tensors(folder / shard))
    missing = set(rack.state_dict()) - set(state)
    if rack.tie_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{folder}: the shards miss {sorted(missing)[:3]} …")
    rack.load_state_dict(state, strict=False, assign=True)
    if rack.tie_embeddings:
        rack.lm_head.weight = rack.token_embedding.weight
    _rebuild_non_persistent_buffers(rack)
    rack.eval()
    return rack


def _rebuild_non_persistent_buffers(rack: Rack) -> None:
    """Buffers a state dict does not hold (RoPE tables) are still meta: rebuild every block
    that has one from its spec and move the loaded weights over."""
    for index, block in enumerate(rack.blocks):
        if not any(b.is_meta for b in block.buffers()):
            continue
        fresh = _new_block(block)
        fresh.load_state_dict(block.state_dict(), strict=True, assign=True)
        if declared_frozen(rack, index):
            fresh.freeze()
        replace_block(rack, index, fresh)
