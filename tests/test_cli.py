"""The ``curvkit`` command: ``curvkit plugins`` and the installed console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest

import curvkit
from curvkit.cli import main
from curvkit.plugins import AUTOLOAD_ENV, BLOCK_ENV


def _report(capsys, *args: str) -> dict:
    assert main(["plugins", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _by_plugin(report: dict) -> dict[str, set[tuple[str, str]]]:
    """plugin name -> {(component kind, component name)}."""
    out: dict[str, set[tuple[str, str]]] = {}
    for kind, entries in report["components"].items():
        for entry in entries:
            out.setdefault(entry["plugin"], set()).add((kind, entry["name"]))
    return out


def _fake_distribution(site: Path, dist: str, entry_point: str, module: str, source: str) -> None:
    """Install a minimal distribution with one ``curvkit`` entry point into ``site``."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[curvkit]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


BROKEN_IMPORT = """
raise ImportError("this plugin needs a library that is not installed")
"""

BROKEN_HOOK = """
import curvkit

@curvkit.hookimpl
def curvkit_register_statistics_backends(register):
    raise RuntimeError("backend set-up exploded")
"""


def test_plugins_lists_core_components_with_their_plugin(capsys, clean_plugin_env):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("hooks", "linear", "conv"):
        assert re.search(rf"^\s+{name}\s+curvkit\s", out, re.MULTILINE), out
    for heading in ("layer handlers", "statistics backends", "factor structures", "inverters", "methods"):
        assert heading in out
    assert "damping strategies" in out
    assert "loaded plugins" in out and "blocked plugins" in out


def test_plugins_json_names_every_kind_and_the_core(capsys, clean_plugin_env):
    report = _report(capsys)
    assert set(report["components"]) == {
        "layer_handlers",
        "backends",
        "structures",
        "inverters",
        "dampings",
        "inverses",
        "methods",
    }
    core = _by_plugin(report)["curvkit"]
    assert {("backends", "hooks"), ("layer_handlers", "linear"), ("layer_handlers", "conv")} <= core
    assert report["autoload"] is True
    assert report["plugins"][0]["name"] == "curvkit"
    # the bundled plugins are entry points of the installed distribution
    assert {"backpack", "asdl"} <= {p["name"] for p in report["plugins"]}


@pytest.mark.parametrize("how", ["env", "flag"])
def test_autoload_off_leaves_out_bundled_backends(capsys, clean_plugin_env, how):
    everything = _report(capsys)
    bundled = set().union(*(c for p, c in _by_plugin(everything).items() if p in {"backpack", "asdl"}))
    if how == "env":
        clean_plugin_env.setenv(AUTOLOAD_ENV, "1")
        report = _report(capsys)
    else:
        report = _report(capsys, "--no-autoload")
    assert report["autoload"] is False
    assert [p["name"] for p in report["plugins"]] == ["curvkit"]
    assert [e["name"] for e in report["components"]["backends"]] == ["hooks"]
    assert not bundled & set().union(*_by_plugin(report).values())
    assert {"backpack", "asdl"} <= set(report["not_loaded"])
    if how == "env":
        assert main(["plugins"]) == 0
        assert f"off ({AUTOLOAD_ENV} is set)" in capsys.readouterr().out


def test_block_list_is_honoured(capsys, clean_plugin_env):
    bundled_methods = "kfac,singd,lowrank,kldwrm,transformers"
    clean_plugin_env.setenv(BLOCK_ENV, f"backpack,{bundled_methods}")
    report = _report(capsys, "--block", "asdl")
    blocked = {"backpack", "asdl", *bundled_methods.split(",")}
    assert blocked <= set(report["blocked"])
    assert not blocked & {p["name"] for p in report["plugins"]}
    assert set(_by_plugin(report)) == {"curvkit"}


def test_broken_plugin_is_one_clear_message(capsys, clean_plugin_env, tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "curvkit_broken", "broken", "curvkit_test_broken_import", BROKEN_IMPORT)
    clean_plugin_env.syspath_prepend(str(site))

    assert main(["plugins"]) == 1
    out = capsys.readouterr()
    assert "plugin 'broken'" in out.err and "failed to load" in out.err
    assert "needs a library that is not installed" in out.err
    assert f"{BLOCK_ENV}=broken" in out.err  # says how to get going again
    assert "Traceback" not in out.err and "--traceback" in out.err

    assert main(["plugins", "--traceback"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    clean_plugin_env.setenv(BLOCK_ENV, "broken")
    report = _report(capsys)
    assert "broken" in report["blocked"]


def test_plugin_whose_hook_raises_is_named(capsys, clean_plugin_env, tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "curvkit_broken_hook", "exploding", "curvkit_test_broken_hook", BROKEN_HOOK)
    clean_plugin_env.syspath_prepend(str(site))
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert "plugin 'exploding'" in err and "backend set-up exploded" in err
    assert "Traceback" not in err


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("curvkit")
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from curvkit.cli import main; sys.exit(main())"]
    )


def test_console_script_reports_broken_plugin_with_exit_status_1(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "curvkit_broken", "broken", "curvkit_test_broken_import", BROKEN_IMPORT)
    env = {k: v for k, v in os.environ.items() if k not in {AUTOLOAD_ENV, BLOCK_ENV}}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # cwd is a scratch directory, so the installed package is what runs
    proc = subprocess.run(
        [*_console_script(), "plugins"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    assert "plugin 'broken'" in proc.stderr and "Traceback" not in proc.stderr
    env[BLOCK_ENV] = "broken"
    proc = subprocess.run(
        [*_console_script(), "plugins"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+hooks\s+curvkit\s", proc.stdout, re.MULTILINE), proc.stdout


def test_usage_errors_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--fisher", "hessian"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"curvkit {curvkit.__version__}"


def test_tests_import_the_installed_distribution():
    """The suite must test what ``pip install`` installed, not a source tree on sys.path.

    For a regular install the imported package must be the distribution's own files; for
    an editable install (development) the source tree *is* the installed package.
    """
    dist = distribution("curvkit")
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("editable install: the source tree is the installed package")
    installed = Path(str(dist.locate_file("curvkit/__init__.py"))).resolve()
    assert Path(curvkit.__file__).resolve() == installed, (
        f"tests imported curvkit from {curvkit.__file__}, but the installed distribution is at {installed}; "
        "run pytest as a command (not 'python -m pytest') from a directory that does not shadow it."
    )
