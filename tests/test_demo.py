"""``curvkit demo``: its numbers are finite and agree with curvlinops on a small subset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from curvkit.cli import main
from curvkit.demo import DemoConfig, factor_summary, relative_difference, run_demo

SMALL = {"subset": 192, "batch_size": 64, "progress": False}


def _check(summary: dict, tolerance: float, backends: list[str] | None = None) -> None:
    assert summary["backends"]["errors"] == {}
    assert summary["layers"], "no layer was summarised"
    for layer in summary["layers"]:
        for key in ("A", "G"):
            f = layer[key]
            for stat in ("trace", "eig_max", "eig_min"):
                assert math.isfinite(f[stat]), (layer["name"], key, stat, f[stat])
            assert f["trace"] > 0 and f["eig_max"] > 0
            assert f["cond"] >= 1 and not math.isnan(f["cond"])  # inf where singular
            for backend in backends or [summary["config"]["backend"]]:
                assert f["rel_diff"][backend] < tolerance, (layer["name"], key, backend, f["rel_diff"])


def test_mlp_factors_agree_with_curvlinops():
    summary = run_demo(DemoConfig(**SMALL))
    assert [layer["name"] for layer in summary["layers"]] == ["0", "2", "4"]
    shapes = [(layer["A"]["shape"], layer["G"]["shape"]) for layer in summary["layers"]]
    assert shapes == [([65, 65], [32, 32]), ([33, 33], [32, 32]), ([33, 33], [10, 10])]
    assert summary["data"] == {"dataset": "sklearn digits (standardised)", "num_data": 192, "num_batches": 3}
    # every backend that claims the request agrees with curvlinops (type-2 is deterministic)
    _check(summary, 1e-6, backends=summary["backends"]["compared"])
    # the softmax output layer's G annihilates the all-ones vector: singular
    assert summary["layers"][-1]["G"]["cond"] == math.inf


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_cnn_factors_agree_with_curvlinops_in_float64(approx):
    summary = run_demo(DemoConfig(model="cnn", kfac_approx=approx, dtype="float64", **SMALL))
    assert [layer["module"] for layer in summary["layers"]] == ["Conv2d", "Conv2d", "Linear"]
    assert summary["layers"][0]["A"]["shape"] == [10, 10]  # 1 channel x 3x3 kernel + bias
    _check(summary, 1e-10)


def test_mc_factors_draw_curvlinops_targets():
    summary = run_demo(DemoConfig(fisher="mc", mc_samples=2, dtype="float64", **SMALL))
    _check(summary, 1e-10)


def test_factor_summary_against_known_spectrum():
    s = factor_summary(torch.diag(torch.tensor([1.0, 2.0, 4.0])))
    assert s["shape"] == [3, 3] and s["trace"] == pytest.approx(7.0)
    assert (s["eig_max"], s["eig_min"], s["cond"]) == pytest.approx((4.0, 1.0, 4.0))
    v = torch.tensor([[1.0], [2.0], [3.0]])
    assert factor_summary(v @ v.T)["cond"] == math.inf  # rank one


def test_relative_difference():
    x = torch.tensor([3.0, 4.0])
    assert relative_difference(x, x) == 0.0
    assert relative_difference(x * 1.5, x) == pytest.approx(0.5)
    assert relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0


def test_config_reports_every_bad_value():
    with pytest.raises(ValueError) as exc:
        DemoConfig(model="resnet", fisher="hessian", batch_size=0, dtype="float16")
    message = str(exc.value)
    for fragment in ("model='resnet'", "fisher='hessian'", "batch_size=0", "dtype='float16'"):
        assert fragment in message
    assert DemoConfig(fisher="GGN").fisher == "type-2"  # aliases are normalised


def test_cli_demo_prints_table_and_writes_strict_json(tmp_path, capsys):
    path = tmp_path / "summary.json"
    argv = ["demo", "--subset", "128", "--batch-size", "64", "--no-progress", "--seed", "3", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "vs curvlinops [hooks]" in out and "eig max" in out and "time (after a one-batch warm-up)" in out

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    summary = json.loads(path.read_text(), parse_constant=refuse)
    assert summary["config"]["seed"] == 3 and summary["data"]["num_data"] == 128
    for layer in summary["layers"]:
        for key in ("A", "G"):
            assert layer[key]["rel_diff"]["hooks"] < 1e-6
            assert layer[key]["cond"] is None or layer[key]["cond"] >= 1  # null where singular


def test_cli_demo_unknown_backend_is_one_message(capsys):
    assert main(["demo", "--backend", "nope", "--subset", "16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "unknown statistics backend 'nope'" in err and "'hooks'" in err and "Traceback" not in err
