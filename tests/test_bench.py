"""``curvkit bench`` (:mod:`curvkit.bench`): tiny runs of the benchmark, its JSON, plots,
error reporting, option checks and the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import curvkit
from curvkit.bench import GENERIC_HYPERPARAMETERS, HYPERPARAMETERS, TASKS, hyperparameters_for, run_bench
from curvkit.cli import build_parser, main
from curvkit.errors import ConfigError

RUN_KEYS = {
    "task",
    "method",
    "seed",
    "status",
    "error",
    "stage",
    "hyperparameters",
    "optimizer",
    "steps",
    "final_train_loss",
    "test_accuracy",
    "ms_per_step",
    "state_bytes",
    "target_accuracy",
    "steps_to_target",
    "seconds_to_target",
    "train_seconds",
    "curve",
    "batch_loss",
    "parameter_norm",
    "guards",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _registry(*specs):
    """A registry with the core's components and ``specs`` registered by a test plugin."""

    class Plugin:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_register_methods(register):
            for spec in specs:
                register.add(spec)

    return curvkit.build_registry(autoload=False, plugins=[("bench-test", Plugin)])


def _kfac_spec():
    from curvkit_kfac import KFAC_SPEC

    return KFAC_SPEC


def _quiet(**kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("device", "cpu")
    return run_bench(**kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = _quiet(methods="kfac", seeds="0,1", steps=6, out=out)
    return out, results


def test_tiny_run_writes_json_with_every_figure(tiny):
    out, results = tiny
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))  # the file holds exactly what run_bench returned
    assert set(on_disk) >= {"config", "environment", "tasks", "runs", "summary", "files"}
    assert on_disk["config"]["methods"] == ["sgd", "adamw", "kfac"]  # baselines beside the method
    assert set(on_disk["tasks"]) == set(TASKS)
    runs = on_disk["runs"]
    assert len(runs) == len(TASKS) * 3 * 2  # tasks x methods x seeds
    for run in runs:
        assert set(run) == RUN_KEYS
        assert run["status"] == "ok", run["error"]
        assert run["steps"] == 6 and len(run["batch_loss"]) == 6
        curve = run["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == 6 and curve["seconds"][0] == 0.0
        assert len(curve["step"]) == len(curve["seconds"]) == len(curve["train_loss"]) == len(curve["test_accuracy"])
        assert curve["seconds"] == sorted(curve["seconds"]) and curve["seconds"][-1] == pytest.approx(
            run["train_seconds"]
        )
        assert run["final_train_loss"] == curve["train_loss"][-1]
        assert run["test_accuracy"] == curve["test_accuracy"][-1]
        assert run["final_train_loss"] < curve["train_loss"][0], (run["task"], run["method"])  # it trained
        assert run["ms_per_step"] > 0 and run["state_bytes"] > 0
        # time to target: the first evaluation at or above the target, or null
        hits = [i for i, a in enumerate(curve["test_accuracy"]) if a >= run["target_accuracy"]]
        if hits:
            assert run["steps_to_target"] == curve["step"][hits[0]]
            assert run["seconds_to_target"] == curve["seconds"][hits[0]]
        else:
            assert run["steps_to_target"] is None and run["seconds_to_target"] is None
    by = {(r["task"], r["method"], r["seed"]): r for r in runs}
    for task in TASKS:
        # same seed, same initialisation: every method starts from the same loss
        assert by[(task, "kfac", 0)]["curve"]["train_loss"][0] == by[(task, "sgd", 0)]["curve"]["train_loss"][0]
        assert by[(task, "kfac", 0)]["curve"]["train_loss"][0] != by[(task, "kfac", 1)]["curve"]["train_loss"][0]
        # SGD keeps one momentum buffer, AdamW two moments and a step count per tensor (float32),
        # K-FAC its Kronecker factors besides the momentum
        params = list(TASKS[task].model().parameters())
        n = sum(p.numel() for p in params)
        sgd, adamw, kfac = (by[(task, m, 0)]["state_bytes"] for m in ("sgd", "adamw", "kfac"))
        assert (sgd, adamw) == (4 * n, 8 * n + 4 * len(params)) and kfac > sgd
    summary = {(r["task"], r["method"]): r for r in on_disk["summary"]}
    row = summary[("digits-mlp", "kfac")]
    pair = [by[("digits-mlp", "kfac", s)]["test_accuracy"] for s in (0, 1)]
    assert row["seeds"] == row["seeds_ok"] == 2 and row["test_accuracy"] == pytest.approx(sum(pair) / 2)


def test_tiny_run_writes_one_nonempty_png_per_task(tiny):
    out, results = tiny
    assert set(results["files"]["plots"]) == set(TASKS)
    for task in TASKS:
        data = (out / f"{task}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_sequence_task_is_per_token_on_3d_inputs():
    task = TASKS["sequence"]
    X, y, X_te, y_te = task.data()
    assert X.ndim == 3 and y.shape == X.shape[:2] and y_te.shape == X_te.shape[:2]
    counts = torch.bincount(y.flatten(), minlength=4)
    assert counts.min() > 0.1 * y.numel()  # every class is common: accuracy is not a majority vote
    model = task.model()
    assert model(X[:5]).shape == (5, X.shape[1], 4)
    assert task.method_options == {"loss_average": "batch+sequence"}


def test_plugin_method_appears_with_no_change_to_bench():
    """A method a third party registers without recommended settings (K-FAC's spec under a
    new name) is benchmarked with the generic hyperparameters and trains exactly like K-FAC
    with those settings (and no trust region)."""
    mine = dataclasses.replace(_kfac_spec(), name="my-kfac", recommended={})
    registry = _registry(_kfac_spec(), mine)
    results = _quiet(
        registry=registry,
        tasks="digits-mlp",
        steps=8,
        out=None,
        baselines=False,
        hyperparameters={"kfac": {"kl_clip": None, "grad_ratio_clip": None}},
    )
    assert results["config"]["methods"] == ["kfac", "my-kfac"]
    kfac, my = results["runs"]
    assert my["method"] == "my-kfac" and my["status"] == "ok"
    assert my["optimizer"] == "curvkit.optim.optimizer.CurvatureOptimizer"
    assert my["hyperparameters"] == GENERIC_HYPERPARAMETERS
    assert my["curve"]["train_loss"] == kfac["curve"]["train_loss"]
    assert my["batch_loss"] == kfac["batch_loss"]


def _raising_spec(name, where):
    base = _kfac_spec()

    def factory(info, config, registry):
        if where == "construction":
            raise RuntimeError(f"{name} cannot build a block")
        block = base.block_factory(info, config, registry)

        def precondition(grad):
            raise FloatingPointError(f"{name} blew up while preconditioning")

        block.precondition = precondition
        return block

    return dataclasses.replace(base, name=name, block_factory=factory)


def test_failing_methods_are_reported_not_raised(tmp_path):
    registry = _registry(_raising_spec("bad-build", "construction"), _raising_spec("bad-step", "training"))
    results = _quiet(registry=registry, tasks="digits-mlp", steps=4, out=tmp_path)
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["bad-build"]["status"] == "failed" and runs["bad-build"]["stage"] == "construction"
    assert runs["bad-build"]["error"] == "RuntimeError: bad-build cannot build a block"
    assert runs["bad-step"]["status"] == "failed" and runs["bad-step"]["stage"] == "training"
    assert "FloatingPointError: bad-step blew up while preconditioning" == runs["bad-step"]["error"]
    assert runs["bad-step"]["final_train_loss"] is None and runs["bad-step"]["test_accuracy"] is None
    assert runs["sgd"]["status"] == runs["adamw"]["status"] == "ok"  # the benchmark went on
    table = curvkit.bench.format_table(results)
    assert "failed: RuntimeError: bad-build cannot build a block" in table
    assert (tmp_path / "digits-mlp.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"][2]["status"] == "failed"


def test_diverging_run_stops_and_is_reported():
    results = _quiet(
        methods="sgd", baselines=False, tasks="digits-mlp", steps=30, out=None, hyperparameters={"sgd": {"lr": 1e30}}
    )
    (run,) = results["runs"]
    assert run["status"] == "diverged" and "non-finite" in run["error"]
    assert run["steps"] < 30 and not math.isfinite(run["batch_loss"][-1] or math.nan)
    assert run["final_train_loss"] is None


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"methods": "kfac,nope"}, "'nope'"),
        ({"dtype": "float16"}, "'float16'"),
        ({"tasks": "imagenet"}, "'imagenet'"),
        ({"seeds": "zero"}, "'zero'"),
        ({"steps": 0}, "steps=0"),
        ({"steps": 5, "epochs": 1}, "epochs=1"),
        ({"target_accuracy": 1.5}, "1.5"),
        ({"device": "tpu:0"}, "'tpu:0'"),
    ],
)
def test_bad_options_name_the_value(kwargs, named):
    with pytest.raises(ConfigError) as err:
        _quiet(out=None, **kwargs)
    assert named in str(err.value)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="registered methods: kfac") as err:
        _quiet(registry=_registry(_kfac_spec()), methods="kfca", out=None)
    assert "'kfca'" in str(err.value) and "sgd, adamw" in str(err.value)


def test_epochs_and_float64():
    results = _quiet(methods="kfac", baselines=False, tasks="digits-mlp", epochs=1, dtype="float64", out=None)
    n_train = results["tasks"]["digits-mlp"]["n_train"]
    assert results["tasks"]["digits-mlp"]["steps"] == math.ceil(n_train / 64) == 22
    (run,) = results["runs"]
    assert run["status"] == "ok" and run["steps"] == 22
    # float64 K-FAC stores its factors in float64: twice the float32 state of the same run
    run32 = _quiet(methods="kfac", baselines=False, tasks="digits-mlp", steps=2, out=None)["runs"][0]
    assert run["state_bytes"] == 2 * run32["state_bytes"]


def test_threads_are_set_for_the_run_and_restored():
    before = torch.get_num_threads()
    results = _quiet(methods="sgd", baselines=False, tasks="digits-mlp", steps=1, out=None, threads=before + 1)
    assert results["environment"]["torch_threads"] == results["config"]["threads"] == before + 1
    assert torch.get_num_threads() == before


def test_bfloat16_parameters():
    results = _quiet(methods="kfac,singd", tasks="digits-mlp", steps=3, dtype="bfloat16", out=None)
    runs = {r["method"]: r for r in results["runs"]}
    for name in ("sgd", "adamw", "kfac", "singd"):  # these train in bf16 (a refusal would be "failed")
        assert runs[name]["status"] == "ok", runs[name]["error"]
        assert all(math.isfinite(v) for v in runs[name]["batch_loss"])
    n = sum(p.numel() for p in TASKS["digits-mlp"].model().parameters())
    assert runs["sgd"]["state_bytes"] == 2 * n  # the momentum buffer is bf16 like the parameters
    assert results["config"]["dtype"] == "bfloat16"


def test_hyperparameters_are_the_specs_recommended_settings():
    kfac = curvkit.default_registry().methods.get("kfac")
    expected = {"lr": 0.03, "momentum": 0.9, "damping": 0.1, "kl_clip": 1e-2, "grad_ratio_clip": 100.0}
    assert hyperparameters_for("kfac", "digits-mlp") == kfac.recommended_settings("digits-mlp") == expected
    skfac_cnn = hyperparameters_for("skfac", "digits-cnn")
    assert skfac_cnn["conv_strategy"] == "reduce_sum" and skfac_cnn["lr"] == 0.1 and "tasks" not in skfac_cnn
    assert hyperparameters_for("skfac", "digits-mlp")["lr"] == 0.03
    # overrides are merged over them
    assert hyperparameters_for("kfac", "sequence", overrides={"kfac": {"lr": 0.1}}) == {**expected, "lr": 0.1}
    assert hyperparameters_for("sgd", "sequence") == HYPERPARAMETERS["sgd"]
    # a method that recommends nothing gets the generic ones, minus options its configuration lacks
    from curvkit_singd import SINGD_SPEC

    other = dataclasses.replace(SINGD_SPEC, name="other", recommended={})
    assert hyperparameters_for("other", "sequence", other) == GENERIC_HYPERPARAMETERS
    # every bundled method recommends settings, and every entry names a real option
    for name in curvkit.optim.available_methods():
        spec = curvkit.default_registry().methods.get(name)
        assert spec.recommended, name
        known = {f.name for f in dataclasses.fields(spec.config_cls)} | curvkit.bench.OPTIMIZER_OPTIONS
        for task in TASKS:
            assert set(hyperparameters_for(name, task)) <= known, (name, task)


def test_cli_parser_accepts_the_options():
    args = build_parser().parse_args(
        [
            "bench",
            "--methods",
            "kfac,singd",
            "--tasks",
            "sequence",
            "--seeds",
            "0,1",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--steps",
            "5",
            "--out",
            "somewhere",
            "--quick",
            "--target-accuracy",
            "0.5",
            "--no-progress",
            "--no-baselines",
            "--no-plots",
        ]
    )
    assert (args.methods, args.tasks, args.seeds, args.device, args.dtype) == (
        "kfac,singd",
        "sequence",
        "0,1",
        "cpu",
        "bfloat16",
    )
    assert (args.steps, args.epochs, args.out, args.quick, args.target_accuracy) == (5, None, "somewhere", True, 0.5)
    assert args.no_progress and args.no_baselines and args.no_plots
    defaults = build_parser().parse_args(["bench"])
    assert (defaults.methods, defaults.seeds, defaults.dtype, defaults.out) == (None, "0", "float32", "curvkit-bench")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--steps", "3", "--epochs", "1"])
    assert exc.value.code == 2


def test_cli_runs_and_prints_the_table(capsys, tmp_path):
    out = tmp_path / "res"
    argv = ["bench", "--methods", "kfac", "--tasks", "digits-mlp", "--steps", "3", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "curvkit bench" in captured.err or "digits-mlp" in captured.err  # the progress bar, on stderr
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["task", "method", "status"]
    assert any(line.split()[:3] == ["digits-mlp", "kfac", "ok"] for line in lines)
    assert f"results written to {out / 'results.json'}" in captured.out
    assert (out / "digits-mlp.png").stat().st_size > 0


def test_cli_bad_option_is_one_clear_error(capsys):
    assert main(["bench", "--methods", "nope", "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "curvkit bench: error:" in err and "unknown method 'nope'" in err and "Traceback" not in err
    assert main(["bench", "--dtype", "float16", "--device", "cpu"]) == 1
    assert "dtype='float16' is not supported; use one of float32, float64, bfloat16" in capsys.readouterr().err
