"""`stackwise generate` and `stackwise export` on real runs: the shared tracked store (two tiny
causal clm runs, the `tracked` fixture of conftest.py) and racks logged by hand into a SQLite
store."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stackwise.model import create_rack_from_specs
from stackwise.tracking.export import export_safetensors
from stackwise.tracking.generate import GenerateOptions, generate_for_grid, generate_text
from stackwise.tracking.models import load_rack, load_trained, log_rack
from stackwise.tracking.store import default_tracking_uri, get_or_create_experiment, open_client


@pytest.fixture(scope="module")
def run_ids(tracked: dict[str, Any], point_runs: Callable[[Any, str], list[Any]]) -> dict[str, str]:
    """training_architecture -> run id of the tracked grid."""
    runs = point_runs(tracked["client"], tracked["experiment_id"])
    return {r.data.tags["training_architecture"]: r.info.run_id for r in runs}


def escaped(text: str) -> str:
    """Control characters other than newline and tab written as Python escapes."""
    return "".join(
        c if c in "\n\t" or (ord(c) >= 32 and not 127 <= ord(c) < 160) else repr(c)[1:-1]
        for c in text
    )


def test_generate_from_a_run_is_seeded_and_says_its_sampler(
    tracked: dict[str, Any], run_ids: dict[str, str], run_cli: Callable[..., Any]
) -> None:
    run_id = run_ids["rackwise"]
    done = run_cli(
        tracked["cwd"],
        "generate",
        run_id,
        "-p",
        "The ",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
        "--top-k",
        "40",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "autoregressive, KV cache (objective clm)" in lines[0]
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", lines[-1])
    # The text is the library's seeded generation decoded with the run's byte tokenizer.
    model = load_trained(run_id, tracking_uri=tracked["uri"])
    generated = model.rack.generate(
        list(b"The "), max_new_tokens=12, seed=5, top_k=40, eos_id=model.tokenizer.eos_id
    )
    completion = bytes(generated.completions[0]).decode("utf-8", errors="replace")
    assert "\n".join(lines[1:-1]) == escaped("The " + completion)


def test_generate_for_grid_gives_each_finished_point_the_same_prompt_and_seed(
    tracked: dict[str, Any],
) -> None:
    options = GenerateOptions(prompt="a", max_new_tokens=8, temperature=0.9, seed=3)
    results = generate_for_grid(str(tracked["file"]), options, tracking_uri=tracked["uri"])
    assert sorted(r.row["training_architecture"] for r in results) == ["rackwise", "stackwise"]
    for item in results:
        assert item.row["status"] == "FINISHED" and item.row["val_loss"] > 0
        alone = generate_text(
            load_trained(item.row["run_id"], tracking_uri=tracked["uri"]), options
        )
        assert item.result.generation.tokens.tolist() == alone.generation.tokens.tolist()
        assert item.result.completion == alone.completion


@pytest.mark.slow
def test_generate_runs_side_by_side_cli(
    tracked: dict[str, Any], run_cli: Callable[..., Any]
) -> None:
    args = ("--runs", str(tracked["file"]), "-p", "a", "--max-new-tokens", "8")
    done = run_cli(tracked["cwd"], "generate", *args)
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stdout.splitlines() if line.startswith("── ")]
    assert len(headers) == 2  # both grid points of the file
    for header in headers:
        assert "val_loss" in header and "autoregressive" in header
    assert "2 runs, prompt 'a', seed 0." in done.stdout


def test_export_hf_from_a_depthwise_run(
    tracked: dict[str, Any], run_ids: dict[str, str], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    transformers = pytest.importorskip("transformers")
    run_id = run_ids["stackwise"]
    rack = load_rack(run_id, tracking_uri=tracked["uri"])
    assert not rack.tie_embeddings  # depth-wise training unties the head
    out = tmp_path / "hf"
    done = run_cli(tracked["cwd"], "export", run_id, str(out), "--format", "hf")
    assert done.returncode == 0, done.stderr
    llama = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert not llama.config.tie_word_embeddings
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, rack(ids), atol=1e-4, rtol=0)
    greedy = rack.generate(ids[:, :4], max_new_tokens=10, temperature=0.0)
    theirs = llama.generate(
        ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=10,
        do_sample=False, eos_token_id=None,
    )  # fmt: skip
    assert theirs.tolist() == greedy.tokens.tolist()


def test_safetensors_export_of_a_run_generates_like_the_run(
    tracked: dict[str, Any], run_ids: dict[str, str], tmp_path: Path
) -> None:
    run_id = run_ids["rackwise"]
    model = load_trained(run_id, tracking_uri=tracked["uri"])
    export_safetensors(model, tmp_path / "saved")
    config = (tmp_path / "saved" / "config.yaml").read_text()
    assert "training_architecture: rackwise" in config and "vocab_size: 260" in config
    folder = load_trained(str(tmp_path / "saved"))
    assert folder.objective == "clm" and folder.rack.spec() == model.rack.spec()
    options = GenerateOptions(prompt="x", max_new_tokens=6, seed=1)
    assert generate_text(folder, options).completion == generate_text(model, options).completion


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A rack with a causal and a bidirectional stack, logged as a diffusion run."""
    folder = tmp_path_factory.mktemp("mixed")
    spec = {"d_model": 32, "n_heads": 4, "attention_type": "mha"}
    rack = create_rack_from_specs(
        260,
        32,
        [
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "causal"}},
            {"n_blocks": 1, "block_spec": {**spec, "attention_mode": "bidirectional"}},
        ],
        seed=0,
    )
    uri = default_tracking_uri(folder)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, "mixed")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "training.objective", "diffusion")
    client.log_param(run_id, "data.tokenizer", "byte")
    log_rack(rack, run_id, experiment_id, uri)
    client.set_terminated(run_id)
    return {"cwd": folder, "run_id": run_id, "rack": rack, "uri": uri}


def test_a_mixed_rack_uses_its_objectives_sampler(mixed_run: dict[str, Any]) -> None:
    model = load_trained(mixed_run["run_id"], tracking_uri=mixed_run["uri"])
    result = generate_text(model, GenerateOptions(prompt="ab", max_new_tokens=10, steps=5))
    assert result.sampler_line == (
        "iterative unmasking, 5 steps (objective diffusion; the rack has causal and "
        "bidirectional stacks)"
    )
    assert result.generation.new_tokens == 10
    # Near-uniform draws over 300 positions: the special tokens are never filled in ([EOS],
    # which ends the text, may be).
    hot = generate_text(
        model, GenerateOptions(prompt="ab", max_new_tokens=300, steps=3, temperature=50.0)
    )
    tokenizer = model.tokenizer
    special = {tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id}
    assert not set(hot.generation.tokens[0].tolist()) & special


def test_the_objective_decides_the_sampler_of_a_causal_rack(mixed_run: dict[str, Any]) -> None:
    """A causal rack trained with diffusion unmasks; the same rack without an objective (a bare
    folder) samples autoregressively."""
    from stackwise.data.tokenizer import ByteTokenizer
    from stackwise.tracking.models import TrainedModel

    spec = {"d_model": 32, "n_heads": 4, "attention_mode": "causal"}
    rack = create_rack_from_specs(260, 32, [{"n_blocks": 1, "block_spec": spec}], seed=0)
    options = GenerateOptions(prompt="ab", max_new_tokens=6, steps=2)
    for objective, line in (
        ("diffusion", "iterative unmasking, 2 steps (objective diffusion)"),
        ("clm", "autoregressive, KV cache (objective clm)"),
        (None, "autoregressive, KV cache (no recorded objective; causal rack)"),
    ):
        model = TrainedModel(rack, ByteTokenizer(), objective, "causal", "causal")
        assert generate_text(model, options).sampler_line == line


def test_unsupported_export_exits_2_with_one_line(
    mixed_run: dict[str, Any], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "out"
    done = run_cli(mixed_run["cwd"], "export", mixed_run["run_id"], str(out), "--format", "hf")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "block 1 (stack 1, block 0): attention_mode bidirectional" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_bad_generate_and_export_requests_exit_2(
    mixed_run: dict[str, Any], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "out"
    unknown = run_cli(mixed_run["cwd"], "generate", "0123456789abcdef", "-p", "x")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "not a folder, and not a run" in unknown.stderr
    bad_format = run_cli(
        mixed_run["cwd"], "export", mixed_run["run_id"], str(out), "--format", "onnx"
    )
    assert bad_format.returncode == 2 and "unknown format 'onnx'" in bad_format.stderr
    neither = run_cli(mixed_run["cwd"], "generate")
    assert neither.returncode == 2 and "--runs FILE" in neither.stderr
    assert not out.exists()


def test_a_bpe_run_generates_with_its_own_tokenizer(tmp_path: Path) -> None:
    from stackwise.data.tokenizer import BPETokenizer
    from stackwise.tracking.models import TrainedModelError

    bpe = BPETokenizer.train(["the quick brown fox jumps over the lazy dog. "] * 50, 300)
    rack = create_rack_from_specs(
        bpe.vocab_size,
        32,
        [{"n_blocks": 1, "block_spec": {"d_model": 32, "n_heads": 4, "attention_mode": "causal"}}],
        seed=0,
    )
    uri = default_tracking_uri(tmp_path)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, uri, "bpe")
    with_tokenizer, without = (client.create_run(experiment_id).info.run_id for _ in range(2))
    for run_id in (with_tokenizer, without):
        client.log_param(run_id, "data.tokenizer", "bpe")
        client.log_param(run_id, "training.objective", "clm")
    log_rack(rack, with_tokenizer, experiment_id, uri, tokenizer_json=bpe.to_json())
    log_rack(rack, without, experiment_id, uri)
    model = load_trained(with_tokenizer, tracking_uri=uri)
    assert model.tokenizer.encode("the lazy fox") == bpe.encode("the lazy fox")
    assert (model.tokenizer.eos_id, model.tokenizer.mask_id) == (bpe.eos_id, bpe.mask_id)
    result = generate_text(model, GenerateOptions(prompt="the quick", max_new_tokens=5, seed=0))
    ids = result.generation.tokens[0, len(bpe.encode("the quick")) :].tolist()
    ids = ids[: ids.index(bpe.eos_id)] if bpe.eos_id in ids else ids
    assert result.completion == bpe.decode(ids)
    with pytest.raises(TrainedModelError, match="BPE tokenizer that is not stored"):
        load_trained(without, tracking_uri=uri)
