"""Text from trained runs: `stackwise generate` without the command line.

`generate_text` takes a loaded `TrainedModel` (`stackwise.tracking.models.load_trained`): it
encodes the prompt with the run's own tokenizer, picks the sampler of the run's training
objective (`stackwise.model.generation.sampler_for`: clm → autoregressive with a KV cache, mlm or
diffusion → iterative unmasking; a model without a recorded objective goes by its attention),
generates, and decodes. `generate_for_grid` does that for every grid point of an experiment file
that has a finished run — the runs `stackwise compare FILE` shows — with the same prompt and seed,
so a grid's models can be read next to their losses.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stackwise.model.generation import Generation, Sampler, generate, sampler_for

if TYPE_CHECKING:
    from stackwise.tracking.models import TrainedModel


@dataclass(frozen=True)
class GenerateOptions:
    """What `stackwise generate` asks for (defaults as on the command line)."""

    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    steps: int | None = None  # unmasking steps (default: one per new token)
    use_cache: bool = True


@dataclass
class TextGeneration:
    """A generation with its text and a line saying which sampler made it and why."""

    model: TrainedModel
    generation: Generation
    prompt: str
    completion: str

    @property
    def sampler_line(self) -> str:
        return describe_sampler(self.model, self.generation)


def printable(text: str) -> str:
    """`text` for a terminal: control characters other than newline and tab (a model can emit
    any byte) are shown as escapes such as ``\\r`` or ``\\x1b``."""
    return "".join(
        char
        if char in "\n\t" or unicodedata.category(char) != "Cc"
        else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def choose_sampler(model: TrainedModel) -> Sampler:
    return sampler_for(model.rack, model.objective)


def describe_sampler(model: TrainedModel, generation: Generation) -> str:
    """E.g. ``autoregressive, KV cache (objective clm)`` or ``iterative unmasking, 16 steps
    (objective diffusion; the rack has causal and bidirectional stacks)``."""
    if generation.sampler == "autoregressive":
        how = "autoregressive, " + ("KV cache" if generation.used_cache else "recomputed each step")
    else:
        how = f"iterative unmasking, {generation.steps} steps"
    modes = {block.attention_mode for block in model.rack.blocks}
    if model.objective is not None:
        why = f"objective {model.objective}"
        if len(modes) > 1:
            why += "; the rack has causal and bidirectional stacks"
    else:
        why = "no recorded objective; " + ("causal rack" if modes == {"causal"} else "not causal")
    return f"{how} ({why})"


def generate_text(model: TrainedModel, options: GenerateOptions) -> TextGeneration:
    """Continue ``options.prompt`` with `model` (see the module docstring). An empty prompt
    starts after [EOS], the document boundary the model saw in training."""
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(options.prompt) or [tokenizer.eos_id]
    generation = generate(
        model.rack,
        prompt_ids,
        sampler=choose_sampler(model),
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        seed=options.seed,
        eos_id=tokenizer.eos_id,
        mask_id=tokenizer.mask_id,
        steps=options.steps,
        forbidden_ids=tuple(i for i in tokenizer.special_ids if i != tokenizer.eos_id),
        use_cache=options.use_cache,
    )
    return TextGeneration(
        model=model,
        generation=generation,
        prompt=options.prompt,
        completion=tokenizer.decode(generation.completions[0]),
    )


@dataclass
class GridGeneration:
    """One grid point's finished run and what it wrote."""

    row: dict[str, Any]  # its row of `stackwise.tracking.compare.compare_runs`
    result: TextGeneration


def generate_for_grid(
    experiment_file: str,
    options: GenerateOptions,
    tracking_uri: str | None = None,
    notes: list[str] | None = None,
) -> list[GridGeneration]:
    """`generate_text` for the current run of every grid point of `experiment_file` that
    finished (grid order). Points without a finished run are reported in `notes`."""
    from stackwise.tracking.compare import compare_runs
    from stackwise.tracking.models import load_trained

    clients: dict[str, Any] = {}
    frame = compare_runs([experiment_file], tracking_uri=tracking_uri, notes=notes, clients=clients)
    rows = frame.to_dicts()
    finished = [row for row in rows if row["status"] == "FINISHED"]
    if notes is not None and len(finished) < len(rows):
        others = ", ".join(f"{r['run']} ({r['status']})" for r in rows if r not in finished)
        notes.append(f"{experiment_file}: no finished run to generate from: {others}")
    results = []
    for row in finished:
        client = clients[row["run_id"]]
        model = load_trained(row["run_id"], tracking_uri=client.tracking_uri)
        results.append(GridGeneration(row=row, result=generate_text(model, options)))
    return results
