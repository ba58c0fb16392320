"""The GPU machine's wheel list (benchmarks/gpu_wheels.py) covers curvkit's dependencies.

Without network: every dependency of curvkit and of its test extra, and every need of a
carried distribution (read from this environment's installed metadata, evaluated for Python
3.12 on Linux), is carried as a wheel or on the machine; every carried distribution is
pinned in constraints.txt. (``benchmarks/gpu_prepare.sh`` checks the downloaded wheels
themselves, with pip.)
"""

from __future__ import annotations

import importlib.metadata

import pytest
from _scripts import BENCHMARKS, load_benchmark
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SCRIPT = BENCHMARKS / "gpu_wheels.py"
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout")


@pytest.fixture(scope="module")
def gw():
    return load_benchmark("gpu_wheels.py", "gpu_wheels")


def _covered(gw) -> set[str]:
    return {canonicalize_name(n) for n in (*gw.CARRIED, *gw.ON_DEVICE)}


def _needs(requires: list[str], gw, extras=("",)) -> list[Requirement]:
    out = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(gw._marker_env(e)) for e in extras):
            out.append(req)
    return out


def test_curvkit_and_its_test_extra_are_covered(gw):
    requires = importlib.metadata.requires("curvkit") or []
    needs = _needs(requires, gw, extras=("", "test"))
    assert {"torch", "pluggy", "pytest", "singd", "laplace-torch"} <= {canonicalize_name(r.name) for r in needs}
    missing = [str(r) for r in needs if canonicalize_name(r.name) not in _covered(gw)]
    assert not missing, f"add these to CARRIED (or ON_DEVICE if the GPU machine has them) in {SCRIPT}: {missing}"


def test_every_carried_distribution_has_its_needs_covered(gw):
    missing = []
    for dist in gw.CARRIED:
        for req in _needs(importlib.metadata.requires(dist) or [], gw):
            if canonicalize_name(req.name) not in _covered(gw):
                missing.append(f"{dist} needs {req}")
    assert not missing, missing


def test_every_carried_distribution_is_pinned(gw):
    reqs = gw.requirements()
    assert len(reqs) == len(gw.CARRIED) and all("==" in r for r in reqs)
    for req in reqs:
        name, version = req.split("==")
        assert importlib.metadata.version(name) == version, f"{name}: installed here != constraints.txt"


def test_torch_numpy_transformers_never_travel(gw):
    assert not {"torch", "numpy", "transformers"} & {canonicalize_name(n) for n in gw.CARRIED}


def test_an_empty_folder_is_reported_incomplete(gw, tmp_path):
    problems = gw.check_folder(tmp_path)
    assert "no wheel of curvkit" in problems and "no wheel of laplace-torch" in problems
