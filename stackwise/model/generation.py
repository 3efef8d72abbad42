"""Generating tokens with a trained Rack: autoregressive sampling and iterative unmasking.

Two samplers, chosen by how the rack was trained (`sampler_for`):

**Autoregressive** (``"autoregressive"``; causal racks trained with ``clm``):

1. Prefill: the prompt ``[B, P]`` runs once through `Rack.forward_cached`, which fills each
   block's cache (K/V for mha/gqa, the latent and RoPE key for mla, running sums for kernel
   attention); the last position's logits give the first new token's distribution.
2. Sample: logits / temperature, keep the ``top_k`` largest, keep the smallest set whose
   probability reaches ``top_p``, draw from a seeded `torch.Generator` (temperature 0: argmax).
3. Feed the drawn token alone through `Rack.forward_cached` (one position, constant work per
   block beyond reading the cache) and sample again.
4. A row that drew [EOS] is finished (its later positions hold [EOS]); stop when every row is
   finished or after ``max_new_tokens``.
   With ``use_cache=False`` step 3 recomputes the whole sequence instead (the reference the
   cache is tested against: same seed, same tokens).

**Iterative unmasking** (``"unmask"``; racks trained with ``mlm`` or ``diffusion``, as in
MDLM / LLaDA sampling):

1. Start from the prompt followed by ``length`` [MASK] tokens.
2. Split ``length`` over ``steps`` steps as evenly as possible (earlier steps take the extra).
3. Each step runs the whole sequence, samples a candidate token at every masked position
   (special tokens are never candidates) and scores it by its probability under the model.
4. The step's quota of still-masked positions with the highest scores take their candidates;
   the others stay masked ("low-confidence remasking").
5. After the last step every position is filled; a row's text ends at its first [EOS].

Tokens per second count the new positions produced, over the wall time of the whole call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from stackwise.model.architecture import Rack

Sampler = Literal["autoregressive", "unmask"]
SAMPLERS: tuple[Sampler, ...] = ("autoregressive", "unmask")
OBJECTIVE_SAMPLERS: dict[str, Sampler] = {
    "clm": "autoregressive",
    "mlm": "unmask",
    "diffusion": "unmask",
}


@dataclass
class Generation:
    """What a generation call produced.

    ``tokens [B, P + N]``: the prompts and what followed (after a row's [EOS], [EOS] again for
    the autoregressive sampler); ``completions``: per row the new token ids up to, not
    including, the first [EOS]; ``new_tokens``: positions produced (``B × N``).
    """

    tokens: torch.Tensor
    prompt_length: int
    completions: list[list[int]]
    sampler: Sampler
    seconds: float
    new_tokens: int
    used_cache: bool = False
    steps: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def sampler_for(rack: Rack, objective: str | None = None) -> Sampler:
    """The sampler of a rack trained with `objective` (``clm``, ``mlm`` or ``diffusion``);
    without one, autoregressive for a causal rack and unmasking otherwise."""
    if objective is not None:
        if objective not in OBJECTIVE_SAMPLERS:
            raise ValueError(
                f"unknown objective {objective!r}; one of {', '.join(OBJECTIVE_SAMPLERS)}"
            )
        return OBJECTIVE_SAMPLERS[objective]
    return "autoregressive" if rack.is_causal else "unmask"


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """``logits [..., V]`` with everything outside the ``top_k`` largest and outside the nucleus
    (the smallest set of largest-probability tokens whose total reaches ``top_p``) set to -inf.
    The most likely token always stays."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probabilities = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probabilities, dim=-1) - probabilities  # mass of better tokens
        drop_sorted = before >= top_p  # the nucleus is already complete without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits [N, V]``; returns ``(ids [N], probabilities [N])``,
    the probability of each drawn token under the filtered, tempered distribution (its
    confidence). Temperature 0 is greedy (probability from the untempered softmax)."""
    logits = logits.float()
    if temperature == 0:
        probabilities = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
        ids = probabilities.argmax(dim=-1)
    else:
        probabilities = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
        # Drawn on the CPU from the explicit generator: the same tokens on any device.
        ids = torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1)
        ids = ids.to(logits.device)
    return ids, probabilities.gather(-1, ids[:, None]).squeeze(-1)


def _check_options(
    temperature: float, top_k: int | None, top_p: float | None, steps: int | None = None
) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def _as_batch(input_ids: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [T] or [B, T] sequence of token ids")
    return ids


def _completions(new: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    rows = []
    for row in new.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        rows.append(row)
    return rows


def generate(
    rack: Rack,
    input_ids: torch.Tensor | list[int],
    *,
    sampler: Sampler | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    mask_id: int | None = None,
    steps: int | None = None,
    forbidden_ids: tuple[int, ...] = (),
    use_cache: bool = True,
) -> Generation:
    """Continue ``input_ids`` with `rack` (see the module docstring for both samplers).

    ``sampler`` defaults to `sampler_for(rack)`. Autoregressive: ``max_new_tokens`` at most,
    stopping at ``eos_id``, KV cache unless ``use_cache=False``. Unmasking: ``max_new_tokens``
    positions after the prompt, filled over ``steps`` steps (default: one token per step);
    needs ``mask_id``; ``forbidden_ids`` (the special tokens) are never filled in. The same
    ``seed`` gives the same tokens.
    """
    sampler = sampler or sampler_for(rack)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_options(temperature, top_k, top_p, steps)
    device = next(rack.parameters()).device
    prompt = _as_batch(input_ids, device)
    generator = torch.Generator().manual_seed(seed)
    was_training = rack.training
    rack.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if sampler == "autoregressive":
                tokens, cached = _autoregressive(
                    rack, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                    use_cache,
                )  # fmt: skip
                used_steps = None
            else:
                if mask_id is None:
                    raise ValueError("the unmasking sampler needs the [MASK] id (mask_id)")
                used_steps = max(1, min(steps or max_new_tokens, max_new_tokens))
                forbidden = tuple(dict.fromkeys((*forbidden_ids, mask_id)))
                tokens = _unmask(
                    rack, prompt, max_new_tokens, used_steps, mask_id, forbidden, temperature,
                    top_k, top_p, generator,
                )  # fmt: skip
                cached = False
    finally:
        rack.train(was_training)
    seconds = time.perf_counter() - start
    new = tokens[:, prompt.shape[1] :]
    return Generation(
        tokens=tokens,
        prompt_length=prompt.shape[1],
        completions=_completions(new, eos_id),
        sampler=sampler,
        seconds=seconds,
        new_tokens=new.numel(),
        used_cache=cached,
        steps=used_steps,
    )


def _autoregressive(
    rack: Rack,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    generator: torch.Generator,
    use_cache: bool,
) -> tuple[torch.Tensor, bool]:
    if not rack.is_causal:
        raise ValueError(
            "autoregressive sampling needs causal attention in every block; use the "
            "unmasking sampler for bidirectional racks"
        )
    tokens = prompt
    if max_new_tokens == 0:
        return tokens, use_cache
    cache = rack.new_cache() if use_cache else None
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = rack.forward_cached(prompt, cache) if cache is not None else rack(prompt)
    for step in range(max_new_tokens):
        next_ids, _ = sample_tokens(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished, eos_id)
            finished |= next_ids == eos_id
        tokens = torch.cat((tokens, next_ids[:, None]), dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = rack.forward_cached(next_ids[:, None], cache)
        else:
            logits = rack(tokens)
    return tokens, use_cache


def unmask_schedule(length: int, steps: int) -> list[int]:
    """How many positions each of `steps` steps fills: ``length`` split evenly, the first
    ``length % steps`` steps one more."""
    base, extra = divmod(length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _unmask(
    rack: Rack,
    prompt: torch.Tensor,
    length: int,
    steps: int,
    mask_id: int,
    forbidden_ids: tuple[int, ...],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    batch, prompt_length = prompt.shape
    masks = torch.full((batch, length), mask_id, dtype=torch.long, device=prompt.device)
    tokens = torch.cat((prompt, masks), dim=1)
    if length == 0:
        return tokens
    forbidden = torch.tensor(forbidden_ids, dtype=torch.long, device=prompt.device)
    for quota in unmask_schedule(length, steps):
        if quota == 0:
            continue
        logits = rack(tokens)[:, prompt_length:].float()
        logits[..., forbidden] = -torch.inf
        masked = tokens[:, prompt_length:] == mask_id
        ids, confidence = sample_tokens(logits.flatten(0, 1), temperature, top_k, top_p, generator)
        ids, confidence = ids.view(batch, length), confidence.view(batch, length)
        confidence = confidence.masked_fill(~masked, -torch.inf)  # filled positions stay
        chosen = torch.topk(confidence, quota, dim=-1).indices
        generated = tokens[:, prompt_length:]
        generated.scatter_(1, chosen, ids.gather(1, chosen))
    return tokens
