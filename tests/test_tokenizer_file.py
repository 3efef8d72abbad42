"""A local Hugging Face ``tokenizer.json`` as the run's tokenizer (``data.tokenizer: hf``):
used as it is, in memory and in prepared shards, counted in the run identity by content, stored
with the logged model, and a clear error when the file is not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.data.prepared import read_manifest
from stackwise.identity import data_fingerprint, resolve_data_paths

WORDS = ["[UNK]", "stack", "wise", "token", "shard", "memory", "map", "layer", "rack", "block"]
SPECIALS = ["[PAD]", "[MASK]", "[BOS]", "[EOS]"]
TRAINING = {
    "batch_size": 4,
    "seq_len": 16,
    "budget": {"steps": 4},
    "device": "cpu",
    "eval": {"batches": 1},
    "log_every_steps": 2,
}
MODEL = {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}}


def _word_level_tokenizer(path: Path, words: list[str] = WORDS) -> Path:
    """A word-level tokenizer.json (not a BPE: any model of the library is read) with no
    special token of StackWise's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def _corpus(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(8):
        words = rng.choice(WORDS[1:], size=int(rng.integers(80, 300)))
        (folder / f"doc{index}.txt").write_text(" ".join(words), encoding="utf-8")
    return [str(folder / "*.txt")]


def _experiment(folder: Path, data: dict[str, Any], **sections: Any) -> Path:
    document = {"name": "hf", "model": MODEL, "training": TRAINING, "data": data, **sections}
    path = folder / "hf.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(name="cli")
def cli_fixture(run_cli: Any) -> Any:
    """The shared `run_cli`, with paths among the arguments."""
    return lambda cwd, *args: run_cli(cwd, *map(str, args))


def _config(data: dict[str, Any], base: Path) -> StackWiseConfig:
    config = StackWiseConfig.from_dict({"model": MODEL, "training": TRAINING, "data": data})
    return resolve_data_paths(config, base)


def test_the_file_is_used_as_it_is_in_memory_and_in_prepared_shards(
    tmp_path: Path, cli: Any
) -> None:
    _word_level_tokenizer(tmp_path / "words.json")
    # Relative to the experiment file, as data.paths.
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus"), "tokenizer": "hf"}
    source["tokenizer_file"] = "words.json"
    memory = build_data(_config(source, tmp_path).data, _config(source, tmp_path).training)
    tokenizer = memory.tokenizer
    # The file's own ids, then the four special tokens after its vocabulary.
    assert tokenizer.encode("rack stack nothing wise") == [8, 1, 0, 2]
    assert tokenizer.vocab_size == len(WORDS) + 4
    assert [tokenizer.pad_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id] == list(
        range(len(WORDS), len(WORDS) + 4)
    )
    # Every training token is a word of the corpus or [EOS] between documents.
    rows = torch.cat(list(memory.train_loader.iter_epoch(0)))
    assert set(rows.unique().tolist()) <= set(range(1, len(WORDS))) | {tokenizer.eos_id}

    done = cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", "prepared")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "prepared")
    assert manifest["tokenizer"]["kind"] == "hf"
    assert manifest["tokenizer"]["vocab_size"] == len(WORDS) + 4
    prepared_config = _config({"source": "prepared", "paths": ["prepared"]}, tmp_path)
    prepared = build_data(prepared_config.data, prepared_config.training)
    assert prepared.tokenizer.encode("rack stack nothing wise") == [8, 1, 0, 2]
    for side in ("train_loader", "val_loader", "test_loader"):
        expected = torch.cat(list(getattr(memory, side).iter_epoch(0)))
        assert torch.equal(torch.cat(list(getattr(prepared, side).iter_epoch(0))), expected)

    # Another file content is another preparation.
    _word_level_tokenizer(tmp_path / "words.json", [*WORDS, "extra"])
    again = cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", "prepared")
    assert again.returncode == 0, again.stderr
    assert "the settings changed" in again.stderr
    assert read_manifest(tmp_path / "prepared")["tokenizer"]["vocab_size"] == len(WORDS) + 5


def test_the_run_identity_counts_the_files_content_not_its_path(tmp_path: Path) -> None:
    paths = _corpus(tmp_path / "corpus")
    _word_level_tokenizer(tmp_path / "a.json")
    shutil.copy(tmp_path / "a.json", tmp_path / "b.json")

    def fingerprint(name: str) -> str:
        data = {"source": "files", "paths": paths, "tokenizer": "hf", "tokenizer_file": name}
        return data_fingerprint(_config(data, tmp_path).data)

    plain = data_fingerprint(_config({"source": "files", "paths": paths}, tmp_path).data)
    assert fingerprint("a.json") == fingerprint("b.json") != plain
    _word_level_tokenizer(tmp_path / "b.json", list(reversed(WORDS)))
    assert fingerprint("a.json") != fingerprint("b.json")


def test_a_missing_file_or_a_file_without_hf_is_a_clean_error(tmp_path: Path, cli: Any) -> None:
    paths = _corpus(tmp_path / "corpus")
    source = {"source": "files", "paths": paths, "tokenizer": "hf", "tokenizer_file": "no.json"}
    missing = cli(tmp_path, "validate", _experiment(tmp_path, source))
    assert missing.returncode == 2
    assert "data.tokenizer_file" in missing.stderr and "no.json" in missing.stderr
    assert "Traceback" not in missing.stderr

    _word_level_tokenizer(tmp_path / "words.json")
    source = {"source": "files", "paths": paths, "tokenizer_file": "words.json"}  # byte
    unused = cli(tmp_path, "validate", _experiment(tmp_path, source))
    assert unused.returncode == 2
    assert "tokenizer_file" in unused.stderr and "tokenizer `hf`" in unused.stderr
    assert "Traceback" not in unused.stderr

    (tmp_path / "broken.json").write_text(json.dumps({"model": "nothing"}), encoding="utf-8")
    broken = cli(tmp_path, "data", "prepare", *paths, "-o", "out", "--tokenizer", "hf")
    assert broken.returncode == 2 and "--tokenizer-file" in broken.stderr
    files = ("--tokenizer", "hf", "--tokenizer-file", "broken.json")
    broken = cli(tmp_path, "data", "prepare", *paths, "-o", "out", *files)
    assert broken.returncode == 2
    assert "data.tokenizer_file" in broken.stderr and "not a Hugging Face" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_a_run_stores_the_tokenizer_with_its_model(
    tmp_path: Path, point_runs: Any, cli: Any
) -> None:
    _word_level_tokenizer(tmp_path / "words.json")
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus"), "tokenizer": "hf"}
    source["tokenizer_file"] = "words.json"
    run = cli(tmp_path, "run", _experiment(tmp_path, source), "--quiet")
    assert run.returncode == 0, run.stderr
    import mlflow

    from stackwise.tracking.models import load_trained

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (found,) = point_runs(client, client.get_experiment_by_name("hf").experiment_id)
    model = load_trained(found.info.run_id, tracking_uri=uri)
    assert model.tokenizer.encode("rack stack nothing wise") == [8, 1, 0, 2]
    assert model.tokenizer.vocab_size == len(WORDS) + 4
    assert model.rack.vocab_size == len(WORDS) + 4
