"""A corpus prepared once into memory-mapped token shards (`stackwise data prepare`) trains on
exactly the tokens of the in-memory path, is prepared again only when its sources change, and
is read with memory far below the corpus's in-memory cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.data.prepared import read_manifest, token_dtype
from stackwise.identity import data_fingerprint
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.architecture_trainer import ArchitectureTrainer
from stackwise.training.stream import BatchStream

TRAINING = {
    "batch_size": 4,
    "seq_len": 32,
    "budget": {"steps": 6},
    "device": "cpu",
    "eval": {"batches": 2},
    "log_every_steps": 2,
}
MODEL = {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}}


def _corpus(folder: Path) -> list[str]:
    """Text files and a JSONL file of varied documents; returns the patterns of data.paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["stack", "wise", "token", "shard", "memory", "map", "déjà", "vu", "λ", "layer"]
    for index in range(6):
        text = " ".join(rng.choice(words, size=int(rng.integers(200, 900))))
        (folder / f"doc{index}.txt").write_text(text, encoding="utf-8")
    with (folder / "more.jsonl").open("w", encoding="utf-8") as out:
        for _ in range(40):
            text = " ".join(rng.choice(words, size=int(rng.integers(20, 300))))
            out.write(json.dumps({"text": text}) + "\n")
    return [str(folder / "*.txt"), str(folder / "more.jsonl")]


def _experiment(folder: Path, data: dict[str, Any], name: str = "exp") -> Path:
    document = {"name": name, "model": MODEL, "training": TRAINING, "data": data}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _cli(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stackwise", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )


def _config(data: dict[str, Any]) -> StackWiseConfig:
    return StackWiseConfig.from_dict({"model": MODEL, "training": TRAINING, "data": data})


def _rows(loader: Any) -> torch.Tensor:
    return torch.cat(list(loader.iter_epoch(0)))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepared_shards_hold_the_tokens_of_the_in_memory_path(
    tmp_path: Path, tokenizer: str
) -> None:
    paths = _corpus(tmp_path / "corpus")
    source = {"source": "files", "paths": paths, "tokenizer": tokenizer, "bpe_vocab_size": 400}
    experiment = _experiment(tmp_path, source)
    done = _cli(tmp_path, "data", "prepare", experiment, "-o", tmp_path / "prepared")
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stderr and "MB/s" in done.stderr

    memory = build_data(_config(source).data, _config(source).training)
    prepared_config = _config({"source": "prepared", "paths": [str(tmp_path / "prepared")]})
    prepared = build_data(prepared_config.data, prepared_config.training)
    assert prepared.tokenizer.vocab_size == memory.tokenizer.vocab_size
    for side in ("train_loader", "val_loader", "test_loader"):
        assert torch.equal(_rows(getattr(prepared, side)), _rows(getattr(memory, side)))
    # The shuffled training order of another epoch and seed matches too.
    assert torch.equal(
        next(iter(prepared.train_loader.iter_epoch(3, 1))),
        next(iter(memory.train_loader.iter_epoch(3, 1))),
    )
    manifest = read_manifest(tmp_path / "prepared")
    assert manifest["dtype"] == "uint16"
    assert len(manifest["sources"]) == 7 and all(
        len(s["sha256"]) == 64 for s in manifest["sources"]
    )
    offsets = np.load(tmp_path / "prepared" / "train.offsets.npy")
    assert offsets[-1] == manifest["sides"]["train"]["tokens"]
    assert len(offsets) == manifest["sides"]["train"]["documents"] + 1
    # Each document of the stream ends with [EOS].
    stream = np.fromfile(tmp_path / "prepared" / "train.bin", dtype=np.uint16)
    assert set(stream[offsets[1:] - 1].tolist()) == {memory.tokenizer.eos_id}
    # The run identity reads the manifest's digest.
    assert data_fingerprint(prepared_config.data) == manifest["digest"]


def test_prepare_again_is_a_no_op_until_a_source_changes(tmp_path: Path) -> None:
    paths = _corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    first = _cli(tmp_path, "data", "prepare", *paths, "-o", out, "--seq-len", "32")
    assert first.returncode == 0, first.stderr
    digest = read_manifest(out)["digest"]
    shard_time = (out / "train.bin").stat().st_mtime_ns

    again = _cli(tmp_path, "data", "prepare", *paths, "-o", out, "--seq-len", "32")
    assert again.returncode == 0, again.stderr
    assert "already prepared" in again.stderr and "nothing to do" in again.stderr
    assert (out / "train.bin").stat().st_mtime_ns == shard_time

    with (tmp_path / "corpus" / "doc0.txt").open("a", encoding="utf-8") as handle:
        handle.write(" and one more sentence")
    changed = _cli(tmp_path, "data", "prepare", *paths, "-o", out, "--seq-len", "32")
    assert changed.returncode == 0, changed.stderr
    assert "the sources changed" in changed.stderr
    assert read_manifest(out)["digest"] != digest


def test_resume_continues_at_the_next_batch(tmp_path: Path, interrupt_at: type) -> None:
    out = tmp_path / "prepared"
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    done = _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out)
    assert done.returncode == 0, done.stderr
    config = _config({"source": "prepared", "paths": [str(out)]})
    config.training.training_architecture = "rackwise"
    config.training.checkpoint.every_steps = 1

    # The stream's stored position restarts at exactly the batch that comes next.
    data = build_data(config.data, config.training)
    stream = BatchStream(data.train_loader)
    for _ in range(len(data.train_loader) + 2):  # into the second epoch
        stream.next()
    epoch, index = stream.position
    assert epoch == 1
    following = stream.next()[0]
    restarted = BatchStream(build_data(config.data, config.training).train_loader, epoch, index)
    assert torch.equal(restarted.next()[0], following)

    def train(directory: Path, callbacks: list[Any]) -> dict[str, torch.Tensor]:
        run_data = build_data(config.data, config.training)
        rack = create_rack_from_config(config)
        trainer = ArchitectureTrainer(config, callbacks, checkpoint_dir=directory)
        trainer.train_architecture(rack, run_data.train_loader, run_data.val_loader)
        return rack.state_dict()

    reference = train(tmp_path / "reference", [])
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", [interrupt_at(4)])
    resumed = train(tmp_path / "run", [])
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


@pytest.mark.slow
def test_stackwise_run_trains_on_a_prepared_folder(tmp_path: Path) -> None:
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    done = _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", "prepared")
    assert done.returncode == 0, done.stderr
    # A relative path is relative to the experiment file's folder.
    (tmp_path / "runs").mkdir()
    experiment = tmp_path / "runs" / "exp.yaml"
    document = {
        "name": "exp",
        "model": MODEL,
        "training": {**TRAINING, "training_architecture": "rackwise", "budget": {"steps": 2}},
        "data": {"source": "prepared", "paths": ["../prepared"]},
        "tracking": {"log_model": False},
    }
    experiment.write_text(yaml.safe_dump(document), encoding="utf-8")
    run = _cli(tmp_path / "runs", "run", experiment, "--quiet")
    assert run.returncode == 0, run.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    tags = {run.data.tags.get("stackwise.data_fingerprint") for run in runs} - {None}
    assert tags == {read_manifest(tmp_path / "prepared")["digest"]}


def test_a_missing_or_damaged_manifest_is_a_clean_error(tmp_path: Path) -> None:
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    out = tmp_path / "prepared"
    assert (
        _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out).returncode == 0
    )
    experiment = _experiment(tmp_path, {"source": "prepared", "paths": [str(out)]}, "uses")
    assert _cli(tmp_path, "validate", experiment).returncode == 0

    shard = out / "val.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # one token short
    damaged = _cli(tmp_path, "validate", experiment)
    assert damaged.returncode == 2
    assert "data.paths" in damaged.stderr and "val.bin" in damaged.stderr
    assert "Traceback" not in damaged.stderr

    (out / "manifest.json").unlink()
    missing = _cli(tmp_path, "run", experiment)
    assert missing.returncode == 2
    assert "data.paths" in missing.stderr and "no manifest.json" in missing.stderr
    assert "Traceback" not in missing.stderr

    no_source = _cli(tmp_path, "data", "prepare", str(tmp_path / "nothing-*.txt"), "-o", out)
    assert no_source.returncode == 2 and "data.paths" in no_source.stderr
    assert "Traceback" not in no_source.stderr


def test_token_type_fits_the_vocabulary(tmp_path: Path) -> None:
    assert token_dtype(260) == "uint16"
    assert token_dtype(65_536) == "uint16"  # ids 0..65535
    assert token_dtype(65_537) == "uint32"
    # A uint32 folder reads back the same rows.
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    out = tmp_path / "prepared"
    assert (
        _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out).returncode == 0
    )
    config = _config({"source": "prepared", "paths": [str(out)]})
    narrow = _rows(build_data(config.data, config.training).train_loader)
    manifest = json.loads((out / "manifest.json").read_text())
    for name in manifest["sides"]:
        tokens = np.fromfile(out / f"{name}.bin", dtype=np.uint16)
        tokens.astype(np.uint32).tofile(out / f"{name}.bin")
    manifest["dtype"] = "uint32"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(_rows(build_data(config.data, config.training).train_loader), narrow)


_MEASURE = textwrap.dedent(
    """
    import sys
    from stackwise.config.base import DataConfig, TrainingConfig
    from stackwise.data import build_data
    from stackwise.data.prepared import prepare
    def high_water():
        # VmHWM belongs to this process's own address space; ru_maxrss would carry the
        # parent's peak across fork and exec.
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    before = high_water()
    files = DataConfig(source="files", paths=[sys.argv[1]])
    training = TrainingConfig(seq_len=256, batch_size=16)
    if sys.argv[3] == "prepared":
        prepare(files, 256, sys.argv[2])
        data = build_data(DataConfig(source="prepared", paths=[sys.argv[2]]), training)
    else:
        data = build_data(files, training)
    batches = sum(1 for _ in data.train_loader.iter_epoch(0))
    print(batches, high_water() - before)
    """
)


def test_preparing_and_reading_keeps_memory_far_below_the_corpus(tmp_path: Path) -> None:
    """Peak memory of preparing and reading a whole epoch of a 24 MB corpus, against the
    in-memory path's (strings, int64 tokens, packed rows: many times the corpus)."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n", dtype=np.uint8)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as out:
        for _ in range(12):
            block = alphabet[rng.integers(0, len(alphabet), size=2_000_000)].tobytes().decode()
            for start in range(0, len(block), 2000):
                out.write(json.dumps({"text": block[start : start + 2000]}) + "\n")
    size = corpus.stat().st_size

    def peak(path: str) -> tuple[int, int]:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(corpus), str(tmp_path / "prepared"), path],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        batches, grown = done.stdout.split()
        return int(batches), int(grown)

    batches, prepared = peak("prepared")
    memory_batches, in_memory = peak("memory")
    assert batches == memory_batches > 0
    # Preparing holds a batch of the file at a time (a fixed allowance, whatever the corpus
    # size); reading maps the training shard (its pages count while mapped, 2 bytes a token);
    # the in-memory path holds ~9 bytes a token plus the strings.
    assert prepared < 2 * size + 96 * 2**20
    assert prepared * 4 < in_memory


def test_files_above_the_threshold_are_prepared_once_beside_the_store(tmp_path: Path) -> None:
    """`stackwise run` on files larger than data.prepare_above_mb tokenizes them once into the
    store's folder, says so once, and trains on the batches of the in-memory path."""
    import mlflow

    paths = _corpus(tmp_path / "corpus")
    finals = {}
    for name, above, seeds in (("shards", 0.001, [1, 2]), ("memory", None, [2])):
        folder = tmp_path / name
        folder.mkdir()
        document = {
            "name": "auto",
            "model": MODEL,
            "training": {**TRAINING, "budget": {"steps": 3}},
            "data": {"source": "files", "paths": paths, "prepare_above_mb": above},
            "grid": {"training.seed": seeds},
            "tracking": {"log_model": False},
        }
        (folder / "auto.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
        run = _cli(folder, "run", "auto.yaml")
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        prepared = list((folder / "mlruns" / "prepared").glob("*/manifest.json"))
        if above is None:
            assert "tokenized once" not in output and prepared == []
        else:  # the second seed found it prepared
            assert output.count("tokenized once into") == 1 and len(prepared) == 1
            assert "stackwise data prepare" in output
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("auto").experiment_id
        finals[name] = {
            r.data.tags["stackwise.run_name"]: r.data.metrics["val_loss"]
            for r in client.search_runs([experiment])
            if "stackwise.run_name" in r.data.tags
        }
    assert finals["shards"].keys() == {"seed=1", "seed=2"}
    assert finals["shards"]["seed=2"] == pytest.approx(finals["memory"]["seed=2"], abs=1e-6)


def test_a_budget_far_over_a_prepared_folder_is_reported_from_its_manifest(tmp_path: Path) -> None:
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    out = tmp_path / "prepared"
    assert (
        _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out).returncode == 0
    )
    rows = read_manifest(out)["sides"]["train"]["tokens"] // TRAINING["seq_len"]
    tokens = rows * TRAINING["seq_len"]  # what the loader trains on
    steps = 11 * tokens // (TRAINING["batch_size"] * TRAINING["seq_len"]) + 1  # > 11 epochs
    document = {
        "name": "over",
        "model": MODEL,
        "training": {**TRAINING, "budget": {"steps": steps}},
        "data": {"source": "prepared", "paths": [str(out)]},
    }
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    checked = _cli(tmp_path, "validate", "over.yaml")
    assert checked.returncode == 0, checked.stderr
    epochs = steps * TRAINING["batch_size"] * TRAINING["seq_len"] / tokens
    assert f"goes over the training data {epochs:,.1f} times" in checked.stderr
    assert f"the prepared folder {out} gives {tokens:,} training tokens" in checked.stderr
    assert "training.budget.steps" in checked.stderr
    strict = _cli(tmp_path, "validate", "over.yaml", "--strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr

    document["training"] = {**TRAINING, "budget": {"steps": 2}}
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    within = _cli(tmp_path, "validate", "over.yaml")
    assert within.returncode == 0 and "goes over" not in within.stderr


def test_processes_of_a_run_read_disjoint_rows_of_each_batch(tmp_path: Path) -> None:
    """Under torchrun each process reads only the rows it keeps of a memory-mapped batch
    (``[rank::world]``, `Distributed.shard`); together they read each row of the batch once."""
    source = {"source": "files", "paths": _corpus(tmp_path / "corpus")}
    out = tmp_path / "prepared"
    assert (
        _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out).returncode == 0
    )
    config = _config({"source": "prepared", "paths": [str(out)]})
    whole = build_data(config.data, config.training).train_loader
    ranks = []
    for rank in range(2):
        loader = build_data(config.data, config.training).train_loader
        loader.read_rows_of(rank, 2)
        ranks.append(list(loader.iter_epoch(1)))
    order = whole.order(1)
    for index, full in enumerate(whole.iter_epoch(1)):
        rows = order[index * whole.batch_size : (index + 1) * whole.batch_size]
        assert torch.equal(full, torch.from_numpy(whole.sequences[rows.numpy()].astype(np.int64)))
        for rank, batches in enumerate(ranks):
            batch = batches[index]
            assert batch.shape == full.shape
            assert torch.equal(batch[rank::2], full[rank::2])  # the rows it keeps
            others = [r for r in range(len(full)) if r % 2 != rank]
            assert not batch[others].any()  # not read
    # An in-memory corpus is read whole, as before.
    memory = _config(source)
    loader = build_data(memory.data, memory.training).train_loader
    loader.read_rows_of(1, 2)
    assert torch.equal(next(iter(loader.iter_epoch(0))), next(iter(whole.iter_epoch(0))))


def _arrow_stream(path: Path, texts: list[str], column: str = "text") -> None:
    import pyarrow as pa

    table = pa.table({column: texts, "id": list(range(len(texts)))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)


def test_a_folder_saved_by_datasets_is_read_in_its_order(tmp_path: Path) -> None:
    """A folder as `datasets.Dataset.save_to_disk` writes it (Arrow IPC stream files listed in
    state.json) is a source: its documents in the dataset's order, in memory and prepared."""
    import pyarrow as pa

    from stackwise.data.sources import load_documents

    rng = np.random.default_rng(1)
    texts = [f"doc {i}: " + "é stack wise " * int(rng.integers(5, 60)) for i in range(14)]
    folder = tmp_path / "saved"
    folder.mkdir()
    # The state lists the second half first: its order is the dataset's, not the names'.
    _arrow_stream(folder / "data-00001-of-00002.arrow", texts[:8])
    _arrow_stream(folder / "data-00000-of-00002.arrow", texts[8:])
    state = {
        "_data_files": [
            {"filename": "data-00001-of-00002.arrow"},
            {"filename": "data-00000-of-00002.arrow"},
        ],
        "_fingerprint": "x",
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")
    data = _config({"source": "files", "paths": [str(folder)]}).data
    assert load_documents(data) == texts

    # An Arrow file in the file (not stream) format is read too.
    table = pa.table({"text": texts[:3]})
    sink = pa.OSFile(str(tmp_path / "other.arrow"), "wb")
    with sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    other = _config({"source": "files", "paths": [str(tmp_path / "other.arrow")]}).data
    assert load_documents(other) == texts[:3]

    experiment = _experiment(tmp_path, {"source": "files", "paths": ["saved"], "val_fraction": 0.1})
    done = _cli(tmp_path, "data", "prepare", experiment, "-o", "prepared")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "prepared")
    assert [Path(s["path"]).name for s in manifest["sources"]] == [
        "data-00001-of-00002.arrow",
        "data-00000-of-00002.arrow",
    ]
    # Every document's bytes are in a shard, followed by [EOS] (byte tokenizer: ids = bytes).
    streams = b"".join(
        np.fromfile(tmp_path / "prepared" / f"{side}.bin", dtype=np.uint16)
        .astype(np.int64)
        .clip(max=255)
        .astype(np.uint8)
        .tobytes()
        for side in manifest["sides"]
    )
    assert manifest["split"]["by_document"]
    assert all(text.encode("utf-8") in streams for text in texts)

    (tmp_path / "plain").mkdir()
    refused = _cli(
        tmp_path, "validate", _experiment(tmp_path, {"source": "files", "paths": ["plain"]}, "p")
    )
    assert refused.returncode == 2 and "data.paths" in refused.stderr
    assert "Traceback" not in refused.stderr


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_reading_a_whole_side_keeps_few_of_its_pages_resident(tmp_path: Path) -> None:
    """An evaluation over a whole split reads every row of its shard; the pages read are
    handed back as it goes, so the process holds a few batches' worth, not the file."""
    from stackwise.data.loader import RELEASE_EVERY

    rng = np.random.default_rng(3)
    words = np.array(["stack", "wise", "token", "shard", "memory", "map", "layer", "rack"])
    (tmp_path / "corpus").mkdir()
    for index in range(40):
        text = " ".join(rng.choice(words, size=20_000))
        (tmp_path / "corpus" / f"doc{index}.txt").write_text(text, encoding="utf-8")
    source = {"source": "files", "paths": [str(tmp_path / "corpus" / "*.txt")]}
    source["val_fraction"] = 0.4
    out = tmp_path / "prepared"
    done = _cli(tmp_path, "data", "prepare", _experiment(tmp_path, source), "-o", out)
    assert done.returncode == 0, done.stderr
    config = StackWiseConfig.from_dict(
        {
            "model": MODEL,
            "training": {**TRAINING, "batch_size": 16, "seq_len": 256},
            "data": {"source": "prepared", "paths": [str(out)]},
        }
    )
    loader = build_data(config.data, config.training).val_loader
    shard = out / "val.bin"
    size_kib = shard.stat().st_size // 1024
    assert size_kib > 2000  # a shard of megabytes
    batch_kib = loader.batch_size * config.training.seq_len * 2 / 1024
    peak = 0
    for index, _ in enumerate(loader.iter_epoch(0)):
        if index % 5 == 4:  # reading smaps is slow; often enough to see growth
            peak = max(peak, _mapped_kib(shard))
    # At most the batches since the last release, each touching a page or two per row, plus
    # the page-sized read-ahead the kernel maps around them.
    assert peak < RELEASE_EVERY * (batch_kib + loader.batch_size * 8) + 1024, (peak, size_kib)
    assert peak < size_kib / 4
