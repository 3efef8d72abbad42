"""Commands that use a trained rack: `generate` (text, from one run or from every point of a
grid) and `export` (a Hugging Face Llama folder, or StackWise safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from stackwise.cli.options import TrackingUriOption
from stackwise.cli.output import fail, note, stdout_console, user_errors

if TYPE_CHECKING:
    from stackwise.tracking.models import TrainedModel


def _load_trained(source: str, tracking_uri: str | None) -> TrainedModel:
    """The trained rack of a run id or folder (`stackwise.tracking.models.open_trained`); every
    way it can fail is one line, exit 2."""
    from stackwise.tracking.models import TrainedModelError, open_trained

    try:
        return open_trained(source, tracking_uri)
    except TrainedModelError as error:
        fail([str(error)])


def generate(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Run id, or a folder written by `stackwise export --format safetensors`.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=0, help="Tokens to generate at most.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")
    ] = 1.0,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k", min=1, help="Sample among the k likeliest tokens only.", show_default=False
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            min=0.0,
            max=1.0,
            help="Sample within the smallest set of likeliest tokens whose probability reaches p.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling draws.")] = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Unmasking steps for racks trained with mlm/diffusion (default: one per token).",
            show_default=False,
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Recompute the whole sequence every step (no KV cache)."),
    ] = False,
    runs: Annotated[
        Path | None,
        typer.Option(
            "--runs",
            metavar="FILE",
            help="Generate from every finished grid point of this experiment file (its current "
            "runs, as `stackwise compare FILE` shows them), side by side.",
            show_default=False,
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Generate text with a trained rack, with the sampler of its training objective."""
    from stackwise.tracking.generate import (
        GenerateOptions,
        generate_for_grid,
        generate_text,
        printable,
    )

    if (source is None) == (runs is None):
        fail(["give a run id or folder, or --runs FILE (one of them)"])
    if top_p == 0.0:
        fail(["--top-p: must be above 0 (1 keeps every token)"])
    options = GenerateOptions(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        steps=steps,
        use_cache=not no_cache,
    )
    console = stdout_console()
    if source is not None:
        result = generate_text(_load_trained(source, tracking_uri), options)
        generation = result.generation
        console.print(Text(f"{result.model.name} · {result.sampler_line}", style="bold"))
        console.print(
            Text(printable(result.prompt), style="dim") + Text(printable(result.completion))
        )
        console.print(
            f"{generation.new_tokens} tokens in {generation.seconds:.2f} s "
            f"({generation.tokens_per_s:.1f} tokens/s)"
        )
        return
    assert runs is not None
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.compare import CompareError
    from stackwise.tracking.models import TrainedModelError

    notes: list[str] = []
    try:
        with user_errors():
            results = generate_for_grid(str(runs), options, tracking_uri=tracking_uri, notes=notes)
    except (CompareError, TrainedModelError) as error:
        fail([str(error)])
    except MlflowException as error:
        fail([f"tracking store: {error.message}"])
    for message in notes:
        note(message)
    if not results:
        fail([f"{runs}: no grid point has a finished run to generate from"])
    for item in results:
        row, result = item.row, item.result
        loss = row.get("val_loss")
        header = f"{row['run']} · val_loss {loss:.4f}" if loss is not None else row["run"]
        console.print(Text(f"── {header} · {result.sampler_line}", style="bold"))
        console.print(
            Text(printable(result.prompt), style="dim") + Text(printable(result.completion))
        )
        console.print(f"   {result.generation.tokens_per_s:.1f} tokens/s")
    console.print(
        f"{len(results)} run{'s' if len(results) != 1 else ''}, prompt {prompt!r}, seed {seed}."
    )


def export(
    source: Annotated[
        str,
        typer.Argument(
            help="Run id, or a folder written by --format safetensors.", show_default=False
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="New (or empty) folder to write.", show_default=False)
    ],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: a Hugging Face LlamaForCausalLM folder (Llama-compatible causal racks; "
            "needs stackwise\\[hf]); safetensors: weights, spec and config for load_rack.",
            show_default=False,
        ),
    ],
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Export a trained rack as a Hugging Face Llama folder or as StackWise safetensors."""
    from stackwise.tracking.export import EXPORT_FORMATS, ExportError, export, hf_incompatibility

    if format_ not in EXPORT_FORMATS:
        fail([f"--format: unknown format {format_!r}; use one of {', '.join(EXPORT_FORMATS)}"])
    model = _load_trained(source, tracking_uri)
    if format_ == "hf":
        problem = hf_incompatibility(model.rack)
        if problem is not None:
            fail([f"{model.name}: cannot export as a Hugging Face Llama: {problem}"])
    try:
        written = export(model, out_dir, format_)
    except ExportError as error:
        fail([str(error)])
    except OSError as error:
        fail([f"{out_dir}: {error.strerror or error}"])
    names = ", ".join(path.name for path in written)
    stdout_console().print(f"wrote {out_dir}: {names}")
