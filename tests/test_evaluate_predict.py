"""Evaluate, predict and export on a tiny trained checkpoint: same numbers as training, bad files on their rows."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_cfg, synthetic_pil
from PIL import Image

from tl.data.transforms import eval_transform
from tl.errors import TLError
from tl.evaluate import evaluate
from tl.export import export_model
from tl.inference import load_classifier, load_module, mean_softmax, member_probs
from tl.predict import predict
from tl.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """One tiny run that learns (4 synthetic classes), shared by the tests here: (run_dir, results, objects)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(run_dir, [*TINY, "trainer.max_epochs=3", "scenario=large_similar", "augment=none",
                             "optimizer.lr=3e-3", "logger=none"])
    results, objects = train(cfg)
    assert results["test/acc"] > 0.4  # 4 classes: chance is 0.25
    return run_dir, results, objects


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 images like the run's (3 per class, another seed) as PNG files in nested folders."""
    folder = tmp_path_factory.mktemp("images")
    for n, img in enumerate(synthetic_pil()):
        sub = folder / f"part{n % 2}"
        sub.mkdir(exist_ok=True)
        img.save(sub / f"{n:02d}.png")
    return folder


def compose(name: str, out: Path, *overrides: str):
    return make_cfg(out, list(overrides), config_name=name)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- predict --------------------------------------------------------------------------------------------------------
def test_predict_matches_the_module_argmax_for_a_folder_a_list_and_a_file(run, images, tmp_path):
    from tl.models import TransferModule

    _, results, _ = run
    module = TransferModule.load_from_checkpoint(results["best_ckpt"], weights_only=True).eval()
    cfg = compose("predict", tmp_path, f"ckpt={results['best_ckpt']}", f"inputs={images}", "topk=2",
                  "num_workers=0", "batch_size=5")
    rows, summary = predict(cfg)

    files = sorted(images.rglob("*.png"))
    assert [r["path"] for r in rows] == [str(f) for f in files] and summary["errors"] == 0
    transform = eval_transform(module.hparams.preprocess)
    with torch.no_grad():
        logits = module(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    assert module.temperature != 1.0  # fitted on val by tl.report, saved in the checkpoint
    probs = (logits / module.temperature).softmax(-1)  # predict reports calibrated probabilities
    names = module.hparams.class_names
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(-1)]
    assert [float(r["prob"]) for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    assert all(float(r["prob"]) >= float(r["prob_2"]) for r in rows)
    assert read_csv(tmp_path / "predictions.csv") == rows

    (tmp_path / "list.txt").write_text(f"# two files\n{files[0].relative_to(images.parent)}\n\n{files[3]}\n")
    (images.parent / "list.txt").write_text((tmp_path / "list.txt").read_text())
    listed, _ = predict(compose("predict", tmp_path, f"ckpt={results['best_ckpt']}",
                                f"inputs={images.parent / 'list.txt'}", f"output={tmp_path / 'listed.csv'}"))
    assert [(r["label"], r["prob"]) for r in listed] == [(rows[i]["label"], rows[i]["prob"]) for i in (0, 3)]
    single, _ = predict(compose("predict", tmp_path, f"ckpt={results['best_ckpt']}", f"inputs={files[5]}"))
    assert len(single) == 1 and single[0]["label"] == rows[5]["label"]


def test_predict_reports_unreadable_files_on_their_rows_and_predicts_the_rest(run, images, tmp_path):
    _, results, _ = run
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(images.rglob("*.png"))[:3]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "garbage.png").write_bytes(b"this is not an image")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    (folder / "notes.md").write_text("not an image extension: not listed")
    out = tmp_path / "out" / "pred.csv"
    rows, summary = predict(compose("predict", tmp_path, f"ckpt={results['best_ckpt']}", f"inputs={folder}",
                                    f"output={out}", "num_workers=2", "batch_size=2"))

    assert summary["files"] == 5 and summary["errors"] == 2
    by_name = {Path(r["path"]).name: r for r in read_csv(out)}
    assert set(by_name) == {f.name for f in good} | {"garbage.png", "truncated.png"}
    assert "UnidentifiedImageError" in by_name["garbage.png"]["error"]
    assert "truncated" in by_name["truncated.png"]["error"]
    for name in ("garbage.png", "truncated.png"):
        assert by_name[name]["label"] == "" and by_name[name]["prob"] == ""
    for f in good:
        row = by_name[f.name]
        assert row["error"] == "" and row["label"] in ("class_0", "class_1", "class_2", "class_3")
        assert 0 < float(row["prob"]) <= 1


# -- evaluate -------------------------------------------------------------------------------------------------------
def test_evaluate_reproduces_the_test_accuracy_of_training(run, tmp_path):
    run_dir, results, _ = run
    evaluated, objects = evaluate(compose("evaluate", tmp_path, f"ckpt={results['best_ckpt']}"))
    assert evaluated["test/acc"] == pytest.approx(results["test/acc"], abs=1e-6)
    assert evaluated["n_test"] == results["n_test"] and evaluated["members"] == [results["best_ckpt"]]
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["test/acc"] == evaluated["test/acc"]
    assert sum(map(sum, saved["confusion_matrix"])) == results["n_test"]

    by_dir, _ = evaluate(compose("evaluate", tmp_path, f"ckpt={run_dir}", f"output={tmp_path / 'e.json'}"))
    assert by_dir["members"] == [results["best_ckpt"]] and by_dir["test/acc"] == evaluated["test/acc"]


def test_evaluate_on_another_split_of_the_runs_data_is_refused(run, tmp_path, caplog):
    """The checkpoint's split digest: another seed (or files added or removed) re-carves test from the same pool as
    train, so the 'test' images could be training images; refused. With a given test folder only a warning."""
    from tl.data.datamodule import build_datamodule
    from tl.evaluate import check_same_split, data_config

    run_dir, results, _ = run
    with pytest.raises(TLError, match="test split is not the one .* was trained beside .*another seed="):
        evaluate(compose("evaluate", tmp_path, f"ckpt={results['best_ckpt']}", "seed=7",
                         f"output={tmp_path / 'e.json'}"))
    assert not (tmp_path / "e.json").exists()
    from omegaconf import OmegaConf

    data, seed = data_config(OmegaConf.create({}), Path(results["best_ckpt"]))
    same = build_datamodule(data, {}, augment=None, seed=seed)
    same.setup("test")
    assert check_same_split([Path(results["best_ckpt"])], same)
    other = build_datamodule(data, {}, augment=None, seed=seed + 1)
    other.setup("test")
    other.images.given_splits["test"] = other.split_indices["test"]  # as if test were a given folder
    assert not check_same_split([Path(results["best_ckpt"])], other)
    assert "given test folder is evaluated as it is now" in caplog.text
    # data named on the command line (data=...): the same images split again by another seed are warned of
    caplog.clear()
    evaluated, _ = evaluate(compose("evaluate", tmp_path, f"ckpt={results['best_ckpt']}", "seed=7", "data=synthetic",
                                    f"output={tmp_path / 'f.json'}"))
    assert "the test images may include training images" in caplog.text and evaluated["n_test"] > 0


def test_evaluate_an_export_copied_outside_its_run(run, tmp_path):
    """No training config is needed: the export's own preprocessing and the data named on the command line."""
    import shutil

    run_dir, results, _ = run
    copied = tmp_path / "elsewhere" / "export"
    shutil.copytree(run_dir / "export", copied)
    evaluated, _ = evaluate(compose("evaluate", tmp_path, f"ckpt={copied}", "data=synthetic",
                                    f"output={tmp_path / 'e.json'}"))
    assert evaluated["test/acc"] == pytest.approx(results["test/acc"], abs=1e-6)
    assert evaluated["n_test"] == results["n_test"]


def test_ensemble_scoring_covers_the_whole_test_split_under_a_distributed_trainer(run):
    """Under DDP the data module's loaders give each rank a shard; scoring (snapshot ensembles) must see it all."""
    from types import SimpleNamespace

    from tl.inference import evaluate_members

    _, results, objects = run
    datamodule = objects["datamodule"]
    datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    try:
        assert len(datamodule.test_dataloader().sampler) < results["n_test"]  # the rank's shard
        metrics, _ = evaluate_members([load_classifier(results["best_ckpt"])], datamodule)
    finally:
        datamodule.trainer = None
    assert metrics["n_test"] == results["n_test"]
    assert metrics["test/acc"] == pytest.approx(results["test/acc"], abs=1e-6)


def test_tta_is_deterministic_and_flip_averages_the_mirror(run, tmp_path):
    _, results, _ = run
    ckpt = f"ckpt={results['best_ckpt']}"
    plain = evaluate(compose("evaluate", tmp_path, ckpt))[1]
    flip1, flip2 = (evaluate(compose("evaluate", tmp_path, ckpt, "tta=flip"))[1] for _ in range(2))
    assert torch.equal(flip1["probs"], flip2["probs"])

    clf = load_classifier(results["best_ckpt"])
    model, t = clf.model, clf.temperature  # each view's softmax of logits / the fitted temperature
    x = torch.cat([x for x, _ in flip1["datamodule"].test_dataloader()])
    with torch.no_grad():
        by_hand = ((model(x) / t).softmax(-1) + (model(x.flip(-1)) / t).softmax(-1)) / 2
    assert torch.allclose(flip1["probs"], by_hand, atol=1e-5)
    assert not torch.allclose(flip1["probs"], plain["probs"], atol=1e-5)

    crops = [evaluate(compose("evaluate", tmp_path, ckpt, "tta=multicrop"))[1]["probs"] for _ in range(2)]
    assert torch.equal(crops[0], crops[1]) and not torch.allclose(crops[0], plain["probs"], atol=1e-5)

    # data that a mirror changes (digits, text): flip is skipped, the result is the plain one
    res, mirrored = evaluate(compose("evaluate", tmp_path, ckpt, "tta=flip", "data=synthetic",
                                     "data.mirror_invariant=false"))
    assert res["tta"] == "none" and torch.equal(mirrored["probs"], plain["probs"])


def test_mean_softmax_is_the_hand_computed_mean():
    ln3 = torch.log(torch.tensor(3.0))
    a, b = torch.tensor([[0.0, ln3]]), torch.tensor([[ln3, 0.0]])  # softmaxes [1/4, 3/4] and [3/4, 1/4]
    assert torch.allclose(mean_softmax([a, b]), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(mean_softmax([a, a, b]), torch.tensor([[5 / 12, 7 / 12]]))

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval() for _ in range(2)]
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        by_hand = [m(x).exp() / m(x).exp().sum(-1, keepdim=True) for m in models]
    probs = member_probs(models, x)  # (members, N, classes)
    assert probs.shape == (2, 5, 3)
    assert torch.allclose(probs.mean(0), (by_hand[0] + by_hand[1]) / 2, atol=1e-6)


def test_snapshot_ensemble_averages_the_last_snapshots(run, tmp_path):
    run_dir, results, _ = run
    snapshots = run_dir / "checkpoints" / "snapshots"
    snapshots.mkdir(exist_ok=True)
    state = torch.load(results["best_ckpt"], weights_only=True)
    head = next(k for k in state["state_dict"] if k.endswith("classifier.weight"))
    generator = torch.Generator().manual_seed(0)
    original = state["state_dict"][head].clone()
    for cycle in (1, 2, 10):  # numeric order: cycle10 is the last
        state["state_dict"][head] = original + 0.5 * torch.randn(original.shape, generator=generator)
        torch.save(state, snapshots / f"snapshot_cycle{cycle}.ckpt")
    try:
        ensemble, objects = evaluate(compose("evaluate", tmp_path, f"ckpt={run_dir}", "ensemble.last=2"))
        assert [Path(m).name for m in ensemble["members"]] == ["snapshot_cycle2.ckpt", "snapshot_cycle10.ckpt"]
        singles = [evaluate(compose("evaluate", tmp_path, f"ckpt={snapshots / name}"))[1]["probs"]
                   for name in ("snapshot_cycle2.ckpt", "snapshot_cycle10.ckpt")]
        assert torch.allclose(objects["probs"], (singles[0] + singles[1]) / 2, atol=1e-6)
        assert len(ensemble["member_acc"]) == 2
        with pytest.raises(TLError, match="ensemble.last=4 but .* has 3 snapshots"):
            evaluate(compose("evaluate", tmp_path, f"ckpt={run_dir}", "ensemble.last=4"))
    finally:
        for f in snapshots.glob("*.ckpt"):
            f.unlink()


# -- export ---------------------------------------------------------------------------------------------------------
def test_export_then_predict_gives_the_checkpoint_probabilities(run, images, tmp_path):
    import timm
    from safetensors.torch import load_file

    _, results, _ = run
    ckpt = results["best_ckpt"]
    out = export_model(load_module(Path(ckpt)), tmp_path / "export")
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "efficientnet_lite0" and meta["num_classes"] == 4 and len(meta["class_names"]) == 4
    assert meta["preprocess"]["input_size"] == [3, 32, 32]

    from_ckpt, from_export = (predict(compose("predict", tmp_path, f"ckpt={source}", f"inputs={images}",
                                              f"output={tmp_path / name}"))[0]
                              for source, name in ((ckpt, "a.csv"), (out, "b.csv")))
    assert from_export == from_ckpt and len(from_ckpt) == 12

    # plain timm + safetensors, no tl: the same logits as the checkpoint
    model = timm.create_model(meta["name"], num_classes=meta["num_classes"]).eval()
    model.load_state_dict(load_file(out / "model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), load_classifier(ckpt).model(x), atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_raises_one_line_naming_the_culprit(run, tmp_path):
    _, results, _ = run
    ckpt = f"ckpt={results['best_ckpt']}"
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.ckpt").write_text("hello")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.ckpt")
    cases = [
        ("predict", ["ckpt=/no/such.ckpt", f"inputs={tmp_path}"], "ckpt='/no/such.ckpt' not found"),
        ("predict", [f"ckpt={tmp_path / 'text.ckpt'}", f"inputs={tmp_path}"], "not a checkpoint that loads"),
        ("predict", [f"ckpt={tmp_path / 'plain.ckpt'}", f"inputs={tmp_path}"], "is not a tl checkpoint"),
        ("predict", [ckpt, "inputs=/no/such/dir"], "inputs='/no/such/dir' not found"),
        ("predict", [ckpt, f"inputs={tmp_path / 'empty'}"], "has no image files"),
        ("evaluate", [ckpt, "tta=mirror"], "tta='mirror' is unknown"),
        ("evaluate", [f"ckpt={tmp_path / 'empty'}"], "is a directory with no snapshots"),
        ("export", [f"ckpt={tmp_path / 'plain.ckpt'}"], "is not a tl checkpoint"),
    ]
    from tl.export import export

    entry = {"predict": predict, "evaluate": evaluate, "export": export}
    for name, overrides, message in cases:
        with pytest.raises(TLError, match=message.replace("(", r"\(")) as e:
            entry[name](compose(name, tmp_path, *overrides))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("tl.predict", ["inputs=x"], "ckpt is required: set it on the command line, e.g. ckpt=..."),
    ("tl.evaluate", ["ckpt=/no/such.ckpt"], "ckpt='/no/such.ckpt' not found"),
    ("tl.evaluate", ["ckpt=x", "data=digitz"], "data=digitz is not a known data: choose one of"),
    ("tl.evaluate", ["ckpt=x", "data.root=/other"], "add data=imagefolder (or digits, shards, ...), e.g. "
     "data=imagefolder data.root=/other"),
    ("tl.export", [], "ckpt is required"),
])
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: the module is imported here
def test_command_line_exits_2_with_one_line(module, argv, message, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [module, *argv, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")  # as `python -m module`, without a new interpreter
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tl: error:")]
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0]


def test_a_run_stopped_in_its_first_epoch_is_named_with_its_interrupted_checkpoint(tmp_path):
    from tl.evaluate import resolve_members

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "interrupted.ckpt").write_bytes(b"state")
    for ckpt in (run, run / "checkpoints"):
        with pytest.raises(TLError, match=f"hydra.run.dir={run} ckpt_path=auto, or give ckpt={run}/checkpoints/"
                                          "interrupted.ckpt"):
            resolve_members(str(ckpt), None)


def test_the_free_space_asked_for_is_sized_to_what_is_written(run, images, tmp_path, monkeypatch):
    """Found by a hostile tester: a fixed 200 MB refused a prediction CSV of a few KB and an export of 27 MB on a
    disk with 100 MB free. Now each asks for about what it writes, and says how much."""
    import collections
    import shutil

    _, results, objects = run
    usage = collections.namedtuple("usage", "total used free")
    free = {"mb": 3}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 0, free["mb"] * 2**20))
    out = tmp_path / "p.csv"
    rows, _ = predict(compose("predict", tmp_path, f"ckpt={results['best_ckpt']}", f"inputs={images}",
                              f"output={out}", "num_workers=0"))
    assert out.is_file() and len(rows) == 12  # 12 rows fit in 3 MB
    module = objects["module"]
    weights_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20
    free["mb"] = int(weights_mb)  # less than one copy of the weights: safetensors and ONNX cannot fit
    with pytest.raises(TLError, match=r"MB free, and this needs about \d+ MB"):
        export_model(module, tmp_path / "exp", "all")
    assert not (tmp_path / "exp").exists()
    free["mb"] = int(3 * weights_mb) + 5
    export_model(module, tmp_path / "exp", "safetensors")
    assert (tmp_path / "exp" / "model.safetensors").is_file()
