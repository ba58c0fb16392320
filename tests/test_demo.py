"""``curvkit demo``: K-FAC and AdamW on scikit-learn's digits, a table and a PNG plot."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

from curvkit.cli import main
from curvkit.demo import (
    DEFAULT_EPOCHS,
    DEFAULT_OUT,
    PLOT_SIZE,
    QUICK_EPOCHS,
    DemoConfig,
    build_model,
    check_factors,
    digits_split,
    format_summary,
    run_demo,
)
from curvkit.optim import KFAC


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run, shared: ``(summary, plot path)``."""
    path = tmp_path_factory.mktemp("demo") / "plot.png"
    return run_demo(DemoConfig(epochs=QUICK_EPOCHS, progress=False, out=str(path))), path


def _read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path), format="png")


def test_quick_run_writes_a_readable_png_of_the_documented_size(quick):
    summary, path = quick
    assert summary["plot"] == str(path)
    assert path.stat().st_size > 10_000  # two panels with curves, not an empty canvas
    image = _read_png(path)
    width, height = PLOT_SIZE
    assert image.shape == (height, width, 4)
    assert float(image[..., :3].std()) > 0.05  # not a blank image


def test_quick_run_kfac_reaches_90_percent(quick):
    summary, _ = quick
    kfac, adamw = summary["histories"]["K-FAC"], summary["histories"]["AdamW"]
    for h in (kfac, adamw):
        assert len(h["train_loss"]) == len(h["test_accuracy"]) == QUICK_EPOCHS + 1
        assert all(math.isfinite(x) for x in h["train_loss"])
        assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
        assert h["seconds"] > 0
    # both start from the same initialisation
    assert kfac["train_loss"][0] == adamw["train_loss"][0]
    assert kfac["test_accuracy"][0] == adamw["test_accuracy"][0]
    assert kfac["test_accuracy"][-1] >= 0.9
    assert summary["data"] == {
        "dataset": "sklearn digits (pixels / 16)",
        "num_train": 1347,
        "num_test": 450,
        "steps_per_epoch": 22,
    }
    check = summary["factor_check"]
    assert check["ok"] and check["max"] < 1e-5 and set(check["layers"]) == {"0", "2"}


def test_table_lists_every_epoch_and_the_timings(quick):
    summary, _ = quick
    text = format_summary(summary)
    assert "K-FAC loss" in text and "AdamW test acc" in text and "curvkit.optim.KFAC(lr=0.03" in text
    for epoch in range(QUICK_EPOCHS + 1):
        assert re.search(rf"^{epoch}\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d\.\d{{4}}$", text, re.MULTILINE)
    assert re.search(r"^time\s+\d+\.\d\d s\s+\d+\.\d\d s$", text, re.MULTILINE)
    assert "(agree)" in text and f"plot written to {summary['plot']}" in text


def test_same_seed_same_run_other_seed_other_run():
    def run(seed):
        return run_demo(DemoConfig(epochs=1, seed=seed, progress=False, out=None, check=False))["histories"]

    first, again, other = run(3), run(3), run(4)
    for name in ("K-FAC", "AdamW"):
        assert first[name]["train_loss"] == again[name]["train_loss"]
        assert first[name]["test_accuracy"] == again[name]["test_accuracy"]
        assert first[name]["train_loss"] != other[name]["train_loss"]


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_other_fisher_types_train(fisher):
    summary = run_demo(DemoConfig(epochs=1, fisher=fisher, progress=False, out=None))
    assert summary["histories"]["K-FAC"]["train_loss"][-1] < 0.5 * summary["histories"]["K-FAC"]["train_loss"][0]
    if fisher == "mc":  # curvlinops draws other samples: no check
        assert summary["factor_check"] is None
        assert "skipped for fisher='mc'" in format_summary(summary)
    else:
        assert summary["factor_check"]["ok"]


def test_factor_check_sees_a_difference():
    """The check compares what it is given: factors from another batch fail it."""
    X, y, _, _ = digits_split()
    model = build_model(0)
    net = copy.deepcopy(model)
    opt = KFAC(net, lr=0.03, damping=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(net(X[:64]), y[:64]).backward()
    opt.step()
    same = check_factors(copy.deepcopy(model), X[:64], y[:64], opt.preconditioner.blocks, "empirical")
    other = check_factors(copy.deepcopy(model), X[64:128], y[64:128], opt.preconditioner.blocks, "empirical")
    assert max(max(v) for v in same.values()) < 1e-5
    assert min(max(v) for v in other.values()) > 1e-2


def test_inputs_are_scaled_pixels_and_split_stratified():
    X_train, y_train, X_test, y_test = digits_split()
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64)
    assert X_train.dtype == torch.float32 and float(X_train.min()) == 0.0 and float(X_train.max()) == 1.0
    counts_train = torch.bincount(y_train, minlength=10).double()
    counts_test = torch.bincount(y_test, minlength=10).double()
    assert torch.allclose(counts_test / counts_train, torch.full((10,), 1 / 3, dtype=torch.float64), atol=0.02)


def test_config_reports_every_bad_value():
    with pytest.raises(ValueError) as exc:
        DemoConfig(epochs=0, batch_size=-1, kfac_lr=0.0, momentum=1.0, fisher="hessian")
    message = str(exc.value)
    for fragment in ("epochs=0", "batch_size=-1", "kfac_lr=0.0", "momentum=1.0", "fisher='hessian'"):
        assert fragment in message
    assert DemoConfig(fisher="GGN").fisher == "type-2"  # aliases are normalised


def test_cli_quick_prints_table_writes_plot_and_strict_json(tmp_path, capsys):
    plot, summary_path = tmp_path / "out" / "demo.png", tmp_path / "summary.json"
    argv = ["demo", "--quick", "--no-progress", "--seed", "1", "--out", str(plot), "--json", str(summary_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "K-FAC loss" in out and "AdamW loss" in out and "factor check" in out and str(plot) in out
    assert _read_png(plot).shape == (PLOT_SIZE[1], PLOT_SIZE[0], 4)

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    summary = json.loads(summary_path.read_text(), parse_constant=refuse)
    assert summary["config"]["epochs"] == QUICK_EPOCHS and summary["config"]["seed"] == 1
    assert summary["histories"]["K-FAC"]["test_accuracy"][-1] >= 0.9


def test_cli_default_plot_goes_to_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--epochs", "1", "--no-progress", "--no-check"]) == 0
    assert (tmp_path / DEFAULT_OUT).stat().st_size > 0
    out = capsys.readouterr().out
    assert "factor check" not in out and f"plot written to {DEFAULT_OUT}" in out


def test_cli_defaults_match_the_module(capsys):
    from curvkit.cli import build_parser

    demo = build_parser().parse_args(["demo"])
    assert (demo.epochs, demo.quick, demo.out, demo.fisher) == (None, False, DEFAULT_OUT, "empirical")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    assert f"default: {DEFAULT_EPOCHS}; with --quick: {QUICK_EPOCHS}" in " ".join(text.split())


def test_cli_bad_value_is_one_message(capsys):
    assert main(["demo", "--epochs", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "epochs=0" in err and "Traceback" not in err
