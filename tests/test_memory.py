"""Memory as users see it: training memory planned = measured, a cache that never makes a
depth-wise run need more than end-to-end training, and pools bounded by the disk budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stackwise.config.base import StackWiseConfig
from stackwise.config.experiment import expand_grid, load_experiment
from stackwise.model.architecture import create_rack_from_config
from stackwise.training.metrics import SavedActivations, measure_training_memory
from stackwise.training.objectives import build_objective
from stackwise.training.optim import build_optimizer
from stackwise.training.plan import (
    StagePlan,
    eligible_parameters,
    estimate_run,
    plan_stages,
    prepare_rack,
    trainable_parameters,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# counting saved activations
# --------------------------------------------------------------------------------------------


def test_saved_activations_count_each_saved_storage_once_without_weights() -> None:
    x = torch.randn(8, 16)
    first = nn.Parameter(torch.randn(16, 32))
    second = nn.Parameter(torch.randn(16, 32))
    with SavedActivations([first, second]) as saved:
        # mm saves x (for the weight's gradient) and the weight (excluded: it is a weight);
        # x is saved twice but is one storage; relu saves its output.
        hidden = torch.relu(x @ first) + x @ second
        hidden.sum()
    by_hand = x.numel() * 4 + 8 * 32 * 4  # x once, the relu output
    assert saved.bytes == by_hand
    with SavedActivations([first, second]) as frozen, torch.no_grad():
        torch.relu(x @ first)
    assert frozen.bytes == 0  # nothing is saved without autograd


def test_a_saved_view_of_a_shared_storage_counts_the_bytes_it_spans() -> None:
    cache = torch.randn(10, 4, 8)  # ten rows of 4 x 8 floats: 128 bytes a row
    scale = nn.Parameter(torch.randn(8))
    row = 4 * 8 * 4
    with SavedActivations([scale], shared=[cache]) as saved:
        # x * scale saves x (for the scale's gradient): rows 2-4 and rows 4-5, overlapping.
        (cache[2:5] * scale).sum() + (cache[4:6] * scale).sum()
    assert saved.bytes == 4 * row  # rows 2, 3, 4, 5, row 4 once
    with SavedActivations([scale]) as whole:
        (cache[2:5] * scale).sum()
    assert whole.bytes == 10 * row  # not shared: the view holds the whole storage alive
    with SavedActivations([scale], shared=[cache]) as mixed:
        hidden = cache[0:1] * scale  # saves the view (one row) ...
        torch.relu(hidden).sum()  # ... and relu its own output (one row)
    assert mixed.bytes == 2 * row


# --------------------------------------------------------------------------------------------
# plan == measurement
# --------------------------------------------------------------------------------------------


def measured_stage_memory(config: StackWiseConfig, plan_index: int) -> int:
    """Training memory of one stage, measured on real tensors after one optimizer step taken
    as the trainer takes it (trainable set, modes, frozen trunk without gradients)."""
    torch.manual_seed(0)
    rack = create_rack_from_config(config)
    prepare_rack(config, rack)
    plan: StagePlan = plan_stages(config, rack)[plan_index]
    training = config.training
    eligible = eligible_parameters(rack)
    if plan.depthwise:
        params = trainable_parameters(rack, plan.start, plan.end, plan.trains_embedding, eligible)
    else:
        params = [p for p in {id(q): q for q in rack.parameters()}.values() if id(p) in eligible]
    rack.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    rack.train()
    vocab = int(rack.vocab_size)
    objective = build_objective(training.objective, vocab_size=vocab, mask_token_id=vocab - 1)
    ids = torch.randint(0, vocab - 4, (training.batch_size, training.seq_len))
    batch = objective.corrupt(ids, torch.Generator().manual_seed(1))
    hidden = None
    if plan.depthwise and not plan.trains_embedding:
        with torch.no_grad():
            hidden = rack.forward_blocks(rack.embed(batch.inputs), 0, plan.start)
    optimizer = build_optimizer(params, training.optimizer, plan.lr, torch.device("cpu"))
    with SavedActivations(rack.parameters()) as saved:
        h = rack.embed(batch.inputs) if hidden is None else hidden
        loss = objective.loss(rack.readout(rack.forward_blocks(h, plan.start, plan.end)), batch)
    loss.backward()
    optimizer.step()
    memory = measure_training_memory(rack, params, optimizer, saved.bytes, torch.device("cpu"))
    # The parts, checked against counts by hand: every parameter once in fp32, one gradient
    # and two AdamW moments per trainable parameter.
    unique = {id(p): p for p in rack.parameters()}.values()
    assert memory.weights_bytes >= 4 * sum(p.numel() for p in unique)
    trained = sum(p.numel() for p in params)
    assert memory.gradients_bytes == 4 * trained
    assert 8 * trained <= memory.optimizer_bytes <= 8 * trained + 64 * len(params)
    return memory.total_bytes


@pytest.mark.parametrize(
    ("file", "only"),
    [("quickstart.yaml", None), ("size_vs_mode.yaml", "small"), ("objectives.yaml", None)],
)
def test_planned_training_memory_is_the_measured_one(file: str, only: str | None) -> None:
    experiment = load_experiment(ROOT / "experiments" / file)
    specs = expand_grid(experiment, only=[f"size={only}"] if only else [])
    checked = 0
    for spec in specs:
        config = spec.config.model_copy(deep=True)
        config.model.vocab_size = config.model.vocab_size or 260
        config.training.device = "cpu"
        estimate = estimate_run(config)
        # One stage of each kind: the first (embedding), a later depth-wise one.
        for index in sorted({0, len(estimate.stages) - 1}):
            planned = estimate.stages[index].training_memory_bytes
            measured = measured_stage_memory(config, index)
            assert abs(planned - measured) <= 0.25 * measured, (spec.name, index)
            checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------------------------
# the cache never makes a depth-wise run need more than rackwise
# --------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from stackwise.config.base import StackWiseConfig
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.training.architecture_trainer import ArchitectureTrainer
    from stackwise.training.callbacks import TrainingCallback

    mode, location, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = StackWiseConfig.from_dict({
        "model": {"d_model": 64, "n_heads": 4, "vocab_size": 260, "attention_mode": "causal",
                  "architecture": {"n_stacks": 1, "blocks_per_stack": 4}},
        "training": {"training_architecture": mode, "objective": "clm", "batch_size": 16,
                     "seq_len": 128, "budget": {"steps": steps}, "log_every_steps": 25,
                     "cache": {"location": location}, "device": "cpu"}})
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (16, 128), generator=generator) for _ in range(150)]

    class Losses(TrainingCallback):
        values = []
        def on_metrics(self, metrics, step):
            if "train/loss" in metrics:
                self.values.append(metrics["train/loss"])

    rack = create_rack_from_config(config)
    results = ArchitectureTrainer(config, [Losses()]).train_architecture(rack, batches)
    print(json.dumps({"peak": results.peak_memory_bytes, "losses": Losses.values,
                      "on_disk": [s.extra.get("cache_on_disk", 0.0) for s in results.stages]}))
    """
)


def run_child(mode: str, location: str, steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, location, str(steps)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_auto_cache_keeps_depthwise_peak_at_or_below_rackwise() -> None:
    """A pool of 150 micro-batches (its cache ~79 MB) is far beyond what rackwise training of
    the same 4-block rack needs over one block: `auto` spills it, and the blockwise run's peak
    stays at or below the rackwise run's, with the losses of an in-memory cache."""
    rackwise = run_child("rackwise", "auto", 3)  # peak memory does not depend on steps
    spilled = run_child("blockwise", "auto", 4 * 150)
    in_memory = run_child("blockwise", "cpu", 4 * 150)
    assert spilled["on_disk"][1:] == [1.0, 1.0, 1.0]
    assert spilled["peak"] <= rackwise["peak"]
    assert in_memory["peak"] > rackwise["peak"]  # what spilling saves here
    assert spilled["losses"] == in_memory["losses"]


def test_a_rack_that_cannot_be_estimated_caches_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the stage forward cannot run on fake tensors (here: a data-dependent op, as a
    custom module might have), `auto` cannot prove the cache fits beside training: it warns and
    the allowance is 0, so the pool's cache goes to disk, where an estimable rack keeps it in
    memory."""
    from stackwise.training import memory
    from stackwise.training.cache import choose_location

    config = StackWiseConfig.model_validate(
        {
            "model": {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 3}},
            "training": {"training_architecture": "blockwise", "seq_len": 16, "batch_size": 2,
                         "budget": {"steps": 30}},
        }
    )  # fmt: skip
    plans = plan_stages(config, memory.skeleton(config))
    cache = memory.pool_cache_bytes(config, memory.pool_rows(config, plans))
    cpu = torch.device("cpu")
    allowance = memory.cache_memory_allowance(config, plans)
    assert allowance > cache > 0
    max_gb = config.training.cache.max_memory_gb
    assert choose_location(cache, cpu, "auto", max_gb, allowance) == "cpu"

    def data_dependent(*args: Any, mode: Any, **kwargs: Any) -> int:
        with mode:  # a fake tensor has no value: asking for one raises
            return int(torch.zeros(3).nonzero().shape[0])

    monkeypatch.setattr(memory, "estimate_activation_bytes", data_dependent)
    with pytest.warns(UserWarning, match="cannot estimate the training memory.*goes to disk"):
        allowance = memory.cache_memory_allowance(config, plans)
    assert allowance == 0
    assert choose_location(cache, cpu, "auto", max_gb, allowance) == "disk"


# --------------------------------------------------------------------------------------------
# bounded pools
# --------------------------------------------------------------------------------------------

POOL_FILE = """\
name: pool_budget
model:
  d_model: 64
  n_heads: 4
  architecture: {{n_stacks: 2, blocks_per_stack: 1}}
training:
  training_architecture: layerwise
  seq_len: 64
  batch_size: 8
  budget: {{steps: 100}}
  cache: {{dtype: {dtype}, max_disk_gb: {budget}}}
data:
  source: builtin
"""


def stackwise_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "COLUMNS": "300"}
    command = [sys.executable, "-m", "stackwise", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_pool_over_the_disk_budget_is_rejected_at_validation(tmp_path: Path) -> None:
    # 2 stages of 50 steps x 8 sequences: a pool of 400 x 64 tokens x 64 values.
    pool_bytes = 400 * 64 * 64 * 4
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    too_small = experiments / "too_small.yaml"
    too_small.write_text(POOL_FILE.format(dtype="fp32", budget=pool_bytes / 1e9 * 0.9))
    for command in ("validate", "run"):
        result = stackwise_cli(command, too_small, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert "training.cache.max_disk_gb" in message
        assert f"needs {pool_bytes / 1e9:.3g} GB" in message
        assert "seq_len 64" in message and "d_model 64" in message
        assert "cache.dtype: bf16" in message and "depthwise.data: fresh" in message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments"]  # nothing written
    # The same pool fits a budget just above it, and in bf16 half of it.
    fits = experiments / "fits.yaml"
    fits.write_text(POOL_FILE.format(dtype="fp32", budget=pool_bytes / 1e9 * 1.1))
    assert stackwise_cli("validate", fits, cwd=tmp_path).returncode == 0
    half = experiments / "half.yaml"
    half.write_text(POOL_FILE.format(dtype="bf16", budget=pool_bytes / 1e9 * 0.6))
    assert stackwise_cli("validate", half, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("mode", ["rackwise", "stackwise", "blockwise", "progressive"])
def test_the_trainer_reports_the_planned_training_memory(mode: str) -> None:
    """What a run reports per stage (and so logs as stage/training_memory_bytes) is the
    quantity `stackwise plan` estimates: within 25 %."""
    from stackwise.data import build_data
    from stackwise.model.architecture import create_rack_from_config
    from stackwise.training.architecture_trainer import ArchitectureTrainer
    from stackwise.training.plan import estimate_run

    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 64,
                "n_heads": 2,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
            },
            "training": {
                "training_architecture": mode,
                "budget": {"steps": 8},
                "batch_size": 4,
                "seq_len": 32,
                "eval": {"batches": 1},
            },
            "data": {"max_tokens": 20_000},
        }
    )
    data = build_data(config.data, config.training)
    config.model.vocab_size = data.tokenizer.vocab_size
    planned = estimate_run(config)
    results = ArchitectureTrainer(config).train_architecture(
        create_rack_from_config(config), data.train_loader, data.val_loader
    )
    assert len(results.stages) == len(planned.stages)
    for stage, plan in zip(results.stages, planned.stages, strict=True):
        measured = stage.extra["training_memory_bytes"]
        assert measured == pytest.approx(plan.training_memory_bytes, rel=0.25), stage.stage.name
        parts = ("weights_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes")
        assert measured == sum(stage.extra[p] for p in parts)
    assert results.extra["training_memory_bytes"] == max(
        s.extra["training_memory_bytes"] for s in results.stages
    )


def test_a_cache_in_memory_is_cache_memory_not_saved_activations() -> None:
    """A stage that reads the activation cache from RAM gets a view of the cache's one tensor;
    autograd saves that view, but it holds one micro-batch, not the cache. With a pool long
    enough that the cache outgrows the stage's training memory (80 micro-batches), the stage
    measures the training memory its plan predicts, the cache is reported as cache memory, and
    the cached stage saves for backward what the same stage without a cache saves."""
    from stackwise.data import build_data
    from stackwise.training.architecture_trainer import ArchitectureTrainer

    def config_for(cache: dict[str, Any]) -> StackWiseConfig:
        return StackWiseConfig.from_dict(
            {
                "model": {
                    "d_model": 32,
                    "n_heads": 2,
                    "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
                },
                "training": {
                    "training_architecture": "blockwise",
                    "budget": {"steps": 160},  # 2 stages of 80 steps: a pool of 80 batches
                    "batch_size": 4,
                    "seq_len": 32,
                    "log_every_steps": 80,
                    "eval": {"batches": 1},
                    "cache": cache,
                },
                "data": {"max_tokens": 20_000},
            }
        )

    def train(config: StackWiseConfig) -> Any:
        data = build_data(config.data, config.training)
        config.model.vocab_size = data.tokenizer.vocab_size
        rack = create_rack_from_config(config)
        results = ArchitectureTrainer(config).train_architecture(
            rack, data.train_loader, data.val_loader
        )
        return results, estimate_run(config)

    cached, planned = train(config_for({"location": "cpu"}))
    uncached, _ = train(config_for({"enabled": False}))
    stage = cached.stages[1].extra  # block_1 reads block_0's output from the cache
    # The cache by hand: 80 pool micro-batches and 1 validation batch of 4 x 32 x 32 fp32.
    cache_bytes = (80 + 1) * 4 * 32 * 32 * 4
    assert stage["cache_memory_bytes"] == cache_bytes
    assert stage["cache_disk_bytes"] == 0
    plan = planned.stages[1].training_memory_bytes
    assert cache_bytes > plan  # the cache dominates: counted as activations it would show
    assert stage["training_memory_bytes"] == pytest.approx(plan, rel=0.25)
    # The read micro-batch counts as one micro-batch: as the trunk output computed per step.
    assert stage["activations_bytes"] == uncached.stages[1].extra["activations_bytes"]


# --------------------------------------------------------------------------------------------
# pre-checks whose cost does not grow with the run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attention", "objective", "shape"),
    [("mha", "clm", (64, 512)), ("kernel", "clm", (2, 16384)), ("mla", "mlm", (3, 16384))],
)
def test_activations_of_a_large_shape_are_read_off_small_ones(
    attention: str, objective: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `EXACT_ACTIVATION_TOKENS` the estimate counts smaller shapes and extrapolates
    (linear in the batch, quadratic in the length): it gives what counting the full shape
    gives, byte for byte."""
    import stackwise.training.memory as memory
    from stackwise.training.stages import plan_stages

    batch_size, seq_len = shape
    config = StackWiseConfig.model_validate(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "attention_type": attention,
                "attention_mode": "causal" if objective == "clm" else "bidirectional",
                "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
            },
            "training": {
                "training_architecture": "stackwise",
                "objective": objective,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "budget": {"steps": 4},
            },
        }
    )
    rack = memory.skeleton(config)
    plans = plan_stages(config, rack)
    counted: list[int] = []
    count = memory.estimate_activation_bytes

    def recording(*args: Any, batch: Any, **kwargs: Any) -> int:
        counted.append(batch.inputs.numel())
        return count(*args, batch=batch, **kwargs)

    monkeypatch.setattr(memory, "estimate_activation_bytes", recording)
    monkeypatch.setattr(memory, "EXACT_ACTIVATION_TOKENS", 2**12)
    extrapolated = [m.activations_bytes for m in memory.stage_training_memory(config, rack, plans)]
    assert max(counted) <= 2**12  # never the full shape
    monkeypatch.setattr(memory, "EXACT_ACTIVATION_TOKENS", 10**12)
    exact = [m.activations_bytes for m in memory.stage_training_memory(config, rack, plans)]
    assert extrapolated == exact


def test_an_absurd_sequence_length_is_refused_from_its_shapes(tmp_path: Path) -> None:
    """`validate` of a run that needs terabytes: exit 2, the length named, and the check's memory
    the same as for an ordinary length (nothing the size of the run is allocated)."""
    experiment = tmp_path / "long.yaml"
    experiment.write_text(
        textwrap.dedent(
            """\
            name: long
            training:
              training_architecture: rackwise
              device: cpu
              budget: {steps: 10}
            """
        )
    )

    def validate(seq_len: int) -> tuple[subprocess.CompletedProcess[str], float]:
        code = (
            "import resource, subprocess, sys\n"
            "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.stderr.write(done.stdout + done.stderr)\n"
            "sys.exit(done.returncode)\n"
        )
        command = [sys.executable, "-m", "stackwise", "validate", str(experiment)]
        command += ["--set", f"training.seq_len={seq_len}"]
        done = subprocess.run(
            [sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=300
        )
        return done, int(done.stdout.strip()) / 1024

    ordinary, ordinary_mib = validate(64)
    assert ordinary.returncode == 0, ordinary.stderr
    absurd, absurd_mib = validate(100_000_000)
    assert absurd.returncode == 2, absurd.stderr
    assert "training.seq_len" in absurd.stderr and "Traceback" not in absurd.stderr
    assert "needs at least" in absurd.stderr
    # 1e8 tokens of int64 ids alone would be 763 MiB.
    assert absurd_mib < ordinary_mib + 100, (ordinary_mib, absurd_mib)


def test_the_estimate_runs_without_pytorchs_compiler_and_counts_the_same(tmp_path: Path) -> None:
    """`plan` does not load PyTorch's compiler (a second of start-up) for its fake tensors; the
    estimate equals the one made with the compiler loaded, and compiling still works after it."""
    code = textwrap.dedent(
        """\
        import json, sys
        import torch
        from stackwise.config.base import StackWiseConfig
        from stackwise.training import memory
        from stackwise.training.plan import plan_stages

        def estimate(objective):
            attention = "causal" if objective == "clm" else "bidirectional"
            config = StackWiseConfig.model_validate({
                "model": {"d_model": 32, "n_heads": 2, "vocab_size": 64, "dropout": 0.1,
                          "attention_mode": attention,
                          "architecture": {"n_stacks": 2, "blocks_per_stack": 2}},
                "training": {"training_architecture": "layerwise", "seq_len": 16,
                             "batch_size": 2, "objective": objective,
                             "budget": {"steps": 8}},
            })
            rack = memory.skeleton(config)
            plans = plan_stages(config, rack)
            return [m.activations_bytes for m in memory.stage_training_memory(config, rack, plans)]

        objectives = ["clm", "mlm", "diffusion"]
        without = [estimate(name) for name in objectives]
        loaded_after_estimate = "torch._dynamo" in sys.modules
        import torch._dynamo  # PyTorch's own path from here on
        with_compiler = [estimate(name) for name in objectives]
        compiled = torch.compile(lambda x: torch.relu(x) * 2, backend="eager")
        value = compiled(torch.tensor([-1.0, 3.0])).tolist()
        print(json.dumps({"without": without, "with": with_compiler, "value": value,
                          "loaded": loaded_after_estimate,
                          "real": hasattr(sys.modules["torch._dynamo"], "optimize")}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] is False  # the estimate left PyTorch's compiler unloaded
    assert result["without"] == result["with"]
    assert all(b > 0 for per_objective in result["without"] for b in per_objective)
    assert result["value"] == [0.0, 6.0] and result["real"] is True


def test_a_deep_runs_stages_are_estimated_each_as_if_alone() -> None:
    """Stages that run the same shapes share one count; stages that differ (another attention,
    FFN width, frozen up projection, the first and last block) keep their own; and the weights
    each stage holds (frozen trunk in its precision, offloaded) match a count by hand."""
    from stackwise.training import memory

    stacks = [
        {"n_blocks": 3},
        {"n_blocks": 2, "attention_type": "gqa", "n_kv_heads": 1},
        {"n_blocks": 2, "d_ff": 48},
        {"n_blocks": 2, "freeze_up_proj": True},
    ]
    for frozen, device in [("fp32", "cpu"), ("bf16", "cpu"), ("bf16", "cuda")]:
        config = StackWiseConfig.from_dict(
            {
                "model": {"d_model": 32, "n_heads": 2, "vocab_size": 64, "stacks": stacks},
                "training": {
                    "training_architecture": "layerwise",
                    "seq_len": 16,
                    "batch_size": 2,
                    "budget": {"steps": 18},
                    "frozen_precision": frozen,
                },
            }
        )
        rack = memory.skeleton(config)
        plans = plan_stages(config, rack)
        together = memory.stage_training_memory(config, rack, plans, torch.device(device))
        alone = [
            memory.stage_training_memory(config, rack, [plan], torch.device(device))[0]
            for plan in plans
        ]
        assert [m.activations_bytes for m in together] == [m.activations_bytes for m in alone]
        # The kinds of stage really differ: a shared count for all would be wrong.
        assert len({m.activations_bytes for m in alone}) >= 4
        # Weights by hand: every tensor once; the trunk's floating-point ones in the frozen
        # precision, or not at all when offloaded from an accelerator.
        element = {"fp32": 4, "bf16": 2}[frozen]
        unique = {id(t): t for t in [*rack.parameters(), *rack.buffers()]}
        for plan, planned in zip(plans, together, strict=True):
            trunk = {id(t) for b in rack.blocks[: plan.start] for t in b.parameters()}
            by_hand = 0
            for key, tensor in unique.items():
                if key not in trunk:
                    by_hand += tensor.numel() * tensor.element_size()
                elif device == "cpu":
                    by_hand += tensor.numel() * element
            assert planned.weights_bytes == by_hand, (frozen, device, plan.start)


@pytest.mark.parametrize(
    ("attention", "objective", "stacks"),
    [
        ("mha", "clm", [{"n_blocks": 7}]),
        ("kernel", "clm", [{"n_blocks": 5}, {"n_blocks": 6, "d_ff": 40}]),
        ("mla", "mlm", [{"n_blocks": 6}, {"n_blocks": 1}, {"n_blocks": 5, "freeze_up_proj": True}]),
        ("gqa", "diffusion", [{"n_blocks": 4}, {"n_blocks": 5, "n_heads": 4, "n_kv_heads": 2}]),
    ],
)
def test_a_deep_rack_is_counted_on_a_few_blocks_and_exactly(
    monkeypatch: pytest.MonkeyPatch, attention: str, objective: str, stacks: list[Any]
) -> None:
    """A rack's saved activations read off three blocks of each run of alike blocks equal the
    count over every block (end to end and per stage), and no count runs more blocks."""
    from stackwise.training import memory

    mode = "causal" if objective == "clm" else "bidirectional"
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 32,
                "n_heads": 2,
                "vocab_size": 64,
                "dropout": 0.1,
                "attention_type": attention,
                "attention_mode": mode,
                "stacks": stacks,
            },
            "training": {
                "training_architecture": "stackwise",
                "objective": objective,
                "seq_len": 16,
                "batch_size": 2,
                "budget": {"steps": 8},
            },
        }
    )
    count = memory.estimate_activation_bytes
    widest: list[int] = []

    def recording(*args: Any, blocks: Any = None, **kwargs: Any) -> int:
        widest.append(len(blocks))
        return count(*args, blocks=blocks, **kwargs)

    monkeypatch.setattr(memory, "estimate_activation_bytes", recording)

    def estimates() -> list[int]:
        rack = memory.skeleton(config)
        plans = plan_stages(config, rack)
        stages = memory.stage_training_memory(config, rack, plans)
        whole = memory.rackwise_training_memory(config, memory.skeleton(config))
        return [m.activations_bytes for m in [*stages, whole]]

    read_off = estimates()
    # Each stack is a run of alike blocks: three of each at most.
    assert max(widest) <= 3 * len(stacks) < sum(s["n_blocks"] for s in stacks)
    monkeypatch.setattr(memory, "EXACT_ACTIVATION_RUN", 10**9)
    widest.clear()
    every_block = estimates()
    assert max(widest) == sum(s["n_blocks"] for s in stacks)
    assert read_off == every_block
