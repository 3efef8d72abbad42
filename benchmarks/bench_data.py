"""Prepared data at scale: how fast `stackwise data prepare` tokenizes, whether the loader keeps
up with training, and whether training memory depends on the corpus size.

1. Prepare throughput (MB of text per second) of ``stackwise.data.prepared.prepare`` on a
   synthetic JSONL corpus, with the byte tokenizer and with a BPE (a `tokenizers` BPE trained
   once beforehand and given as ``tokenizer: hf``, so both sides only encode), each against a
   plain loop in the same run that reads the same lines, decodes the JSON, encodes them
   (``encode_batch`` for the BPE, the UTF-8 bytes for the byte tokenizer) and writes the ids as
   uint16, the least any preparation does. Prepare also hashes its sources, draws the split and
   writes the document offsets.
2. Loader throughput: batches of ``--batch-size`` x ``--seq-len`` tokens read from the large
   prepared folder in its shuffled order (`SequenceLoader` over the memory map, as training
   reads them), against the tokens per second that a training step of a d512 rack
   (``--layers`` blocks, fp32, AdamW) consumes. Goal: the loader at least 10x faster.
3. Peak memory: a fresh process trains a small rack (rackwise, ``--train-steps`` steps) on a
   prepared folder of ``--small-mb`` MB of text and on one of ``--large-mb`` MB, and reports its
   own high-water mark (``VmHWM``; the pages of the memory map it touched count). Goal: the
   large corpus at most 1.1x the small one's peak. For scale, the small corpus is also trained
   on through the in-memory path (its JSONL read, tokenized and packed in the process).

The corpora are generated (random words from a fixed vocabulary, documents of 50-2,000 words)
in a temporary folder, which is removed at the end (``--large-mb 2048`` needs about 10 GB of
free disk while it runs).

Run: ``python benchmarks/bench_data.py [--large-mb 2048]``
``--quick``: corpora of 2 and 8 MB, a tiny rack (seconds; for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import headline, publish

LOADER_GOAL = 10.0
MEMORY_GOAL = 1.1
WORDS = 5000

_TRAIN_CHILD = """
import json, sys
import stackwise
config = json.loads(sys.argv[1])
result = stackwise.train(config).results
status = open("/proc/self/status").read().split("\\n")
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": peak / 1024, "steps": result.total_steps}))
"""


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL file of about `megabytes` MB of random-word documents; returns its size. A
    block of about 16 MB is generated and repeated (with its documents renumbered) to the size
    asked for."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(WORDS)]
    weights = 1.0 / np.arange(1, WORDS + 1)  # Zipf-like, as words in text
    weights /= weights.sum()
    block: list[str] = []
    size = 0
    target = min(megabytes, 16.0) * 1e6
    while size < target:
        words = rng.choice(WORDS, size=int(rng.integers(50, 2000)), p=weights)
        text = " ".join(vocabulary[i] for i in words)
        block.append(text)
        size += len(text) + 12
    written = 0
    with path.open("w", encoding="utf-8") as out:
        copy = 0
        while written < megabytes * 1e6:
            for index, text in enumerate(block):
                line = json.dumps({"text": f"document {copy}.{index}: {text}"}) + "\n"
                out.write(line)
                written += len(line)
                if written >= megabytes * 1e6:
                    break
            copy += 1
    return path.stat().st_size


def train_bpe(corpus: Path, vocab_size: int, out: Path) -> Path:
    """A byte-level BPE trained on the first 8 MB of `corpus`, saved as a tokenizer.json."""
    from stackwise.data.tokenizer import BPETokenizer

    texts = []
    size = 0
    with corpus.open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 8e6:
                break
    BPETokenizer.train(texts, vocab_size).save(out)
    return out


def reference_encode(corpus: Path, tokenizer_file: Path | None, out: Path) -> float:
    """Seconds of the plain loop: read lines, decode the JSON, encode (batches of 4 MB for a
    tokenizer file; the UTF-8 bytes without one), write uint16 ids."""
    from tokenizers import Tokenizer

    tokenizer = None if tokenizer_file is None else Tokenizer.from_file(str(tokenizer_file))
    start = time.perf_counter()
    with corpus.open(encoding="utf-8") as handle, out.open("wb") as sink:
        batch: list[str] = []
        size = 0

        def flush() -> None:
            if tokenizer is None:
                for text in batch:
                    sink.write(np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16))
            else:
                for encoding in tokenizer.encode_batch(batch):
                    sink.write(np.asarray(encoding.ids, dtype=np.uint16).tobytes())

        for line in handle:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text)
            if size >= 4 << 20:
                flush()
                batch, size = [], 0
        flush()
    return time.perf_counter() - start


def prepare_seconds(corpus: Path, folder: Path, tokenizer_file: Path | None) -> float:
    from stackwise.config.base import DataConfig
    from stackwise.data.prepared import prepare

    data = DataConfig(
        source="files",
        paths=[str(corpus)],
        tokenizer="byte" if tokenizer_file is None else "hf",
        tokenizer_file=None if tokenizer_file is None else str(tokenizer_file),
    )
    start = time.perf_counter()
    done = prepare(data, 512, folder, force=True)
    assert done.written
    return time.perf_counter() - start


def prepare_throughput(corpus: Path, temp: Path, bpe: Path) -> dict[str, Any]:
    size = corpus.stat().st_size
    rows: dict[str, Any] = {}
    warm = temp / "warm.jsonl"  # imports and first calls outside the timings
    write_corpus(warm, 0.2, seed=2)
    prepare_seconds(warm, temp / "warm", bpe)
    reference_encode(warm, bpe, temp / "warm.bin")
    for name, tokenizer_file in (("byte", None), ("bpe", bpe)):
        reference = reference_encode(corpus, tokenizer_file, temp / f"reference-{name}.bin")
        (temp / f"reference-{name}.bin").unlink()
        seconds = prepare_seconds(corpus, temp / f"prepared-{name}", tokenizer_file)
        rows[name] = {
            "corpus_mb": size / 1e6,
            "prepare_s": seconds,
            "prepare_mb_per_s": size / 1e6 / seconds,
            "reference_s": reference,
            "reference_mb_per_s": size / 1e6 / reference,
            "ratio": reference / seconds,  # prepare's speed as a fraction of the loop's
        }
    return rows


def loader_throughput(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Tokens per second read by the training loader of a prepared folder, and consumed by a
    d512 training step (forward, backward, AdamW) on the same batch shape."""
    import torch

    import stackwise
    from stackwise.config.base import DataConfig, TrainingConfig
    from stackwise.data.prepared import load_prepared

    training = TrainingConfig(batch_size=args.batch_size, seq_len=args.seq_len, seed=1)
    _, train, _, _ = load_prepared(DataConfig(source="prepared", paths=[str(folder)]), training)
    count = min(args.loader_batches, len(train))
    start = time.perf_counter()
    for index, _ in enumerate(train.iter_epoch(0)):
        if index + 1 == count:
            break
    read_s = time.perf_counter() - start
    tokens = count * args.batch_size * args.seq_len
    loader = tokens / read_s

    steps = args.consume_steps
    config = {
        "model": {
            "d_model": args.d_model,
            "n_heads": max(1, args.d_model // 64),
            "architecture": {"n_stacks": 1, "blocks_per_stack": args.layers},
        },
        "training": {
            "training_architecture": "rackwise",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "budget": {"steps": steps},
            "device": "cpu",
            "log_every_steps": 1000,
            "eval": {"batches": 1},
        },
    }
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(0, 256, shape, generator=generator) for _ in range(steps)]
    stackwise.train(
        {**config, "training": {**config["training"], "budget": {"steps": 1}}}, batches=batches[:1]
    )  # warm-up
    results = stackwise.train(config, batches=batches).results
    consumed = results.total_tokens / results.extra["train_time_s"]
    return {
        "batches": count,
        "loader_tokens_per_s": loader,
        "training_tokens_per_s": consumed,
        "ratio": loader / consumed,
        "d_model": args.d_model,
        "layers": args.layers,
    }


def peak_memory(
    folder: Path, args: argparse.Namespace, files: Path | None = None
) -> dict[str, Any]:
    """The training process's peak RSS on the prepared `folder` (or, given `files`, on those
    files read into memory: the in-memory path)."""
    data: dict[str, Any] = {"source": "prepared", "paths": [str(folder)]}
    if files is not None:
        data = {"source": "files", "paths": [str(files)], "prepare_above_mb": None}
    config = {
        "model": {
            "d_model": 128,
            "n_heads": 2,
            "architecture": {"n_stacks": 1, "blocks_per_stack": 2},
        },
        "training": {
            "training_architecture": "rackwise",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "budget": {"steps": args.train_steps},
            "device": "cpu",
            "log_every_steps": 1000,
            "eval": {"batches": 2},
        },
        "data": data,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _TRAIN_CHILD, json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=50.0, help="the small corpus (MB)")
    parser.add_argument("--large-mb", type=float, default=2048.0, help="the large corpus (MB)")
    parser.add_argument("--throughput-mb", type=float, default=100.0, help="prepare timing corpus")
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--loader-batches", type=int, default=2000)
    parser.add_argument("--consume-steps", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="tiny corpora and rack")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.small_mb, args.large_mb, args.throughput_mb = 2.0, 8.0, 2.0
        args.bpe_vocab, args.seq_len, args.d_model, args.layers = 512, 128, 64, 1
        args.loader_batches, args.consume_steps, args.train_steps = 50, 2, 3

    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=os.environ.get("BENCH_TMP")) as t:
        temp = Path(t)
        corpus = temp / "throughput.jsonl"
        write_corpus(corpus, args.throughput_mb)
        bpe = train_bpe(corpus, args.bpe_vocab, temp / "bpe.json")
        prepare_rows = prepare_throughput(corpus, temp, bpe)
        corpus.unlink()
        memory: dict[str, Any] = {}
        loader: dict[str, Any] = {}
        for name, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
            source = temp / f"{name}.jsonl"
            write_corpus(source, megabytes, seed=1)
            folder = temp / f"folder-{name}"
            started = time.perf_counter()
            seconds = prepare_seconds(source, folder, None)
            in_memory = peak_memory(folder, args, files=source) if name == "small" else None
            source.unlink()  # only the shards stay
            shard_bytes = sum(f.stat().st_size for f in folder.glob("*.bin"))
            memory[name] = {
                "corpus_mb": megabytes,
                "prepare_s": seconds,
                "shards_mb": shard_bytes / 1e6,
                "wall_s": time.perf_counter() - started,
                **peak_memory(folder, args),
            }
            if in_memory is not None:
                memory[name]["in_memory_peak_rss_mb"] = in_memory["peak_rss_mb"]
            if name == "large":
                loader = loader_throughput(folder, args)
            for leftover in (temp / f"prepared-{n}" for n in ("byte", "bpe")):
                if leftover.exists():
                    import shutil

                    shutil.rmtree(leftover)
    ratio = memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"]
    loader_met = loader["ratio"] >= LOADER_GOAL
    memory_met = ratio <= MEMORY_GOAL
    byte, bpe_row = prepare_rows["byte"], prepare_rows["bpe"]
    report = {
        "benchmark": "bench_data",
        "settings": vars(args),
        "prepare": prepare_rows,
        "loader": loader,
        "memory": memory,
        "memory_ratio": ratio,
        "headline": [
            headline(
                f"`data prepare` throughput ({byte['corpus_mb']:.0f} MB JSONL; reference: a "
                f"plain read + `tokenizers` encode_batch (BPE {args.bpe_vocab}) / UTF-8 bytes "
                f"loop writing uint16 ids)",
                f"byte **{byte['prepare_mb_per_s']:.1f} MB/s** ({byte['ratio']:.2f}x the loop's "
                f"{byte['reference_mb_per_s']:.1f}); BPE **{bpe_row['prepare_mb_per_s']:.1f} "
                f"MB/s** ({bpe_row['ratio']:.2f}x the loop's {bpe_row['reference_mb_per_s']:.1f})",
                None,
                None,
                "prepare also hashes its sources, draws the split and writes each document "
                "to a temporary file first",
            ),
            headline(
                f"Loader vs training: tokens/s read from a {args.large_mb:,.0f} MB prepared "
                f"corpus in shuffled order vs consumed by a d{args.d_model} x {args.layers} "
                f"training step (batch {args.batch_size} x {args.seq_len}, fp32)",
                f"**{loader['ratio']:,.0f}x** ({loader['loader_tokens_per_s']:,.0f} vs "
                f"{loader['training_tokens_per_s']:,.0f} tokens/s)",
                f">= {LOADER_GOAL:g}x",
                loader_met,
                "" if loader_met else "the loader reads too slowly; see the JSON",
            ),
            headline(
                f"Training peak RSS on a {args.large_mb:,.0f} MB prepared corpus vs a "
                f"{args.small_mb:,.0f} MB one (fresh process, VmHWM)",
                f"**{ratio:.3f}x** ({memory['large']['peak_rss_mb']:.0f} vs "
                f"{memory['small']['peak_rss_mb']:.0f} MiB; the small corpus read into memory "
                f"instead: {memory['small']['in_memory_peak_rss_mb']:.0f} MiB)",
                f"<= {MEMORY_GOAL:g}x",
                memory_met,
                "" if memory_met else "memory grows with the corpus; see the JSON",
            ),
        ],
    }
    publish("bench_data", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
