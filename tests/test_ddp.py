"""DDP on CPU (gloo), started as users start it: end to end, parameters unfrozen later, exact evaluation.

Slow ones (-m slow): the linear-probe variant end to end, staged unfreezing under DDP, the unpadded evaluation
through a test-side data module (tl's own is tested by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributed_helpers import DDP_CPU, TINY_CLI, probe, read_ranks, run_tl


# -- 1-2. DDP end to end, frozen and partially frozen -----------------------------------------------------------------
@pytest.mark.parametrize("strategy", [pytest.param("linear_probe", marks=pytest.mark.slow), "partial"])
def test_ddp_two_cpu_processes_end_to_end(tmp_path, strategy):
    """The contract command runs two gloo processes; one run dir (Lightning pins hydra.run.dir for rank 1), one
    config print and one results.json and export (rank zero); identical param groups and weights on both ranks;
    frozen weights untouched and no unused-parameter error with strategy=ddp (frozen parameters are invisible to DDP).
    (linear_probe, all but the head frozen, is the slow variant: partial has frozen parameters too.)"""
    ranks_dir = tmp_path / "ranks"
    # No hydra.run.dir: the default logs/train/runs/<time> under the working directory, which must be shared.
    proc = run_tl([*DDP_CPU, *TINY_CLI, f"finetune.strategy={strategy}", "finetune.trainable_stages=2",
                   "logger=none", f"paths.cache_dir={tmp_path / 'cache'}", "export=true", *probe(ranks_dir)],
                  cwd=tmp_path)

    run_dirs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(run_dirs) == 1, f"ranks wrote to different run dirs: {run_dirs}"
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and 0.0 <= results["test/acc"] <= 1.0
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran as a Hydra job in the same directory
    out = proc.stdout
    assert sum(line.strip() == "config" for line in out.splitlines()) == 1, "config printed by more than one rank"
    assert out.count("results") == 1 and not list(run_dir.glob("*.tmp"))
    assert (run_dir / "export" / "model.safetensors").is_file() and not list((run_dir / "export").glob("*.tmp"))

    r0, r1 = read_ranks(ranks_dir)
    assert (r0["world_size"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert r0["param_groups"] == r1["param_groups"] and r0["trainable"] == r1["trainable"]
    assert all(not n.startswith("model.conv_stem") for n in r0["trainable"])  # the stem stays frozen in both
    assert r0["all_after"] == r1["all_after"], "ranks diverged: gradients were not averaged"
    assert r0["frozen_before"] == r0["frozen_after"], "a frozen parameter changed"


@pytest.mark.slow
def test_ddp_class_balanced_sampler_deals_one_draw_to_the_ranks(tmp_path):
    """data.balance=sampler under two-process DDP: Lightning keeps tl's sampler (no DistributedSampler wrapped
    around it), and the two ranks' shares interleave to the single-process draw of that epoch: disjoint, complete."""
    from tl.data.balance import ClassBalancedSampler

    probes = tmp_path / "probes"
    run_tl([*DDP_CPU, *TINY_CLI, "data.balance=sampler", "logger=none", "report.top_losses=0",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
            "+callbacks.sampler_probe._target_=distributed_helpers.SamplerProbe",
            f"+callbacks.sampler_probe.out_dir={probes}"], cwd=tmp_path)
    r0, r1 = (json.loads((probes / f"sampler{r}.json").read_text()) for r in (0, 1))
    assert r0["type"] == r1["type"] == "ClassBalancedSampler"
    assert (r0["num_replicas"], r0["sampler_rank"], r1["sampler_rank"]) == (2, 0, 1)
    whole = ClassBalancedSampler(r0["train_targets"], num_replicas=1, rank=0, seed=r0["seed"])
    whole.set_epoch(r0["epoch"])
    drawn = list(whole)
    assert r0["drawn"] == drawn[0::2] and r1["drawn"] == drawn[1::2]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive_basefinetuning", "gradual", "lp_ft"])
def test_ddp_parameters_unfrozen_later_are_averaged_across_ranks(tmp_path, strategy):
    """DDP registers only parameters trainable when it wraps the model. A block unfrozen later by a plain
    BaseFinetuning callback trains, but its gradients are never averaged, so the ranks drift apart silently (the
    control). tl's staged strategies re-wrap the module after unfreezing: the ranks stay identical, with the same
    param groups."""
    ranks_dir = tmp_path / "ranks"
    if strategy == "naive_basefinetuning":
        # (~scheduler: torch's schedulers refuse an optimizer that grew groups they don't know; tl extends them)
        policy = ["finetune.strategy=linear_probe", "~scheduler",
                  "+callbacks.unfreeze._target_=distributed_helpers.UnfreezeLastBlock"]
    else:
        policy = [f"finetune.strategy={strategy}", "finetune.lp_epochs=1", "finetune.unfreeze_every=1"]
    run_tl([*DDP_CPU, *TINY_CLI, *policy, "augment=light", "trainer.max_epochs=3", "logger=none", "test=false",
            f"hydra.run.dir={tmp_path / 'run'}", *probe(ranks_dir)])
    r0, r1 = read_ranks(ranks_dir)
    assert r0["trainable_names_after"] == r1["trainable_names_after"]
    assert len(r0["trainable_names_after"]) > len(r0["trainable"])  # something was unfrozen during training
    if strategy == "naive_basefinetuning":
        assert r0["all_after"] != r1["all_after"]
    else:
        assert r0["all_after"] == r1["all_after"], "ranks diverged: unfrozen parameters were not averaged"
        assert r0["param_groups_after"] == r1["param_groups_after"]


# -- 3. the same test accuracy on 1 and 2 processes -------------------------------------------------------------------
# 31 images per class: 25 test images, which 2 ranks cannot split evenly (Lightning's sampler would repeat one).
ODD_EVAL = ["data.source.samples_per_class=31", "+trainer.limit_train_batches=0", "logger=none"]


def _test_acc(tmp_path: Path, name: str, args: list[str]) -> float:
    run_tl([*TINY_CLI, *ODD_EVAL, f"hydra.run.dir={tmp_path / name}", *args])
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["n_test"] == 25
    return results["test/acc"]


@pytest.mark.slow  # tl's data module has this sampler now: the test below, on tl's own code, is the default one
def test_ddp_test_accuracy_equals_single_process_with_unpadded_eval_sampler(tmp_path):
    """No training (limit_train_batches=0): the seeded initial weights are tested on 1 process and on 2; with the
    unpadded sampler every test image counts once, so the accuracies are equal (25 images: steps of 1/25)."""
    single = _test_acc(tmp_path, "single", ["trainer=cpu"])
    ddp = _test_acc(tmp_path, "ddp", [*DDP_CPU, "data._target_=distributed_helpers.UnpaddedEvalDataModule"])
    assert ddp == pytest.approx(single, abs=1e-6)
    assert round(single * 25, 4) == round(single * 25)  # a count over 25 images, not 26


@pytest.mark.slow
def test_ddp_test_accuracy_equals_single_process_with_tl_datamodule(tmp_path):
    """The same with tl's data module as users run it: its unpadded evaluation sampler counts each image once."""
    single = _test_acc(tmp_path, "single", ["trainer=cpu"])
    ddp = _test_acc(tmp_path, "ddp", DDP_CPU)
    assert ddp == pytest.approx(single, abs=1e-6)
