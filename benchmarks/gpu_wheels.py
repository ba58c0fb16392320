#!/usr/bin/env python
"""The wheels the GPU machine needs, and checks that a wheel folder is complete for it.

The GPU machine (see /work/.library/device/KINDS.md) has Python 3.12 with torch 2.11 (CUDA),
numpy, transformers, scipy, scikit-learn, matplotlib and more, no network, and none of our
peer libraries. :data:`CARRIED` travels as wheels (pinned by ``constraints.txt``), plus a
wheel of curvkit itself; :data:`ON_DEVICE` is what the machine is known to have.

``python benchmarks/gpu_wheels.py requirements`` prints the pinned requirements to download;
``python benchmarks/gpu_wheels.py check .whl`` checks a folder (``benchmarks/gpu_prepare.sh``
runs both):

1. one wheel per distribution, every carried one and curvkit present, every wheel
   installable on CPython 3.12 / manylinux x86_64 (its tags);
2. every requirement of every wheel (curvkit's with the ``test`` extra), evaluated for
   Python 3.12 on Linux x86_64, is met by a carried wheel or by the machine's packages,
   with the version where the machine's version is known;
3. pip itself resolves ``curvkit[test]`` for Python 3.12 from the folder alone (``--no-index``)
   plus stand-in wheels of the machine's packages (at their known versions), and installs
   the folder as the device command does (``--no-deps --target``), both as ``--dry-run``;
4. the folder and the rest of the working tree that travels stay under 64 MiB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64

#: Distributions that travel as wheels (versions from constraints.txt): curvkit's and its
#: test extra's dependencies the machine lacks, their own needs, and the test tools (the
#: machine has pytest, pluggy, einops and hypothesis, in versions nobody has read; ours are
#: small and pinned, so they travel too).
CARRIED = (
    "backpack-for-pytorch",
    "asdfghjkl",
    "curvlinops-for-pytorch",
    "singd",
    "laplace-torch",
    "unfoldNd",
    "einconv",
    "einops",
    "pluggy",
    "pytest",
    "pytest-xdist",
    "execnet",
    "iniconfig",
    "hypothesis",
    "sortedcontainers",
)

#: What the machine has (KINDS.md, "Python packages already there", read 2026-11-17), with
#: the version where a session read it ("pip list" row), else ``None`` (present, version
#: unread: assumed to satisfy). Never carried: torch and its CUDA libraries, numpy,
#: transformers.
ON_DEVICE: dict[str, str | None] = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "numpy": "2.5.2",
    "transformers": "5.17.0",
    "torchmetrics": "1.9.0",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0",
    "triton": "3.6.0",
    "scipy": None,
    "scikit-learn": None,
    "matplotlib": None,
    "tqdm": None,
    "opt-einsum": None,
    "linear-operator": None,
    "lightning-utilities": None,
    "packaging": None,
    "pygments": None,
    "typing-extensions": None,
    "joblib": None,
    "threadpoolctl": None,
    "pillow": None,
    "filelock": None,
    "networkx": None,
    "sympy": None,
    "jinja2": None,
    "fsspec": None,
    "setuptools": None,
}

PYTHON = (3, 12)
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


def pins() -> dict[str, str]:
    """``constraints.txt`` as ``{canonical name: version}``."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def requirements() -> list[str]:
    """``name==version`` for every carried distribution."""
    pinned = pins()
    missing = [n for n in CARRIED if canonicalize_name(n) not in pinned]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}; add them there first.")
    return [f"{n}=={pinned[canonicalize_name(n)]}" for n in CARRIED]


def _supported_tags() -> set:
    abis = ["cp312", "abi3", "none"]
    return set(cpython_tags(PYTHON, abis=abis, platforms=PLATFORMS)) | set(
        compatible_tags(PYTHON, "cp312", platforms=PLATFORMS)
    )


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = HeaderParser().parsestr(zf.read(name).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def _marker_env(extra: str) -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version="3.12",
        python_full_version="3.12.3",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        extra=extra,
    )
    return env


def check_folder(folder: Path) -> list[str]:
    """Problems of the wheel folder (empty: complete). Prints what it checked."""
    problems: list[str] = []
    wheels = sorted(folder.glob("*.whl"))
    have: dict[str, tuple[Version, Path]] = {}
    tags = _supported_tags()
    for w in wheels:
        name, version, _, wtags = parse_wheel_filename(w.name)
        if name in have:
            problems.append(f"two wheels of {name}: {have[name][1].name} and {w.name} (keep one)")
        have[name] = (version, w)
        if not wtags & tags:
            problems.append(f"{w.name} does not install on CPython 3.12 / Linux x86_64")
    for n in (*CARRIED, "curvkit"):
        if canonicalize_name(n) not in have:
            problems.append(f"no wheel of {n}")
    pinned = pins()
    for n in CARRIED:
        cn = canonicalize_name(n)
        if cn in have and cn in pinned and str(have[cn][0]) != pinned[cn]:
            problems.append(f"{have[cn][1].name} is not the pinned {n}=={pinned[cn]}")
    device = {canonicalize_name(k): v for k, v in ON_DEVICE.items()}
    assumed: set[str] = set()
    for name, (_version, w) in sorted(have.items()):
        extras = ["", "test"] if name == "curvkit" else [""]
        for line in _metadata(w):
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(_marker_env(e)) for e in extras):
                continue
            rn = canonicalize_name(req.name)
            if rn in have:
                if not req.specifier.contains(have[rn][0], prereleases=True):
                    problems.append(f"{w.name} needs {req}, the folder has {rn} {have[rn][0]}")
            elif rn in device:
                known = device[rn]
                if known is None:
                    assumed.add(f"{rn} ({req.specifier or 'any'})")
                elif not req.specifier.contains(Version(known), prereleases=True):
                    problems.append(f"{w.name} needs {req}, the machine has {rn} {known}: carry a wheel of it")
            else:
                problems.append(f"{w.name} needs {req}: neither in the folder nor on the machine")
    print(f"{len(wheels)} wheels in {folder}; carried requirements and curvkit[test] resolved against the folder")
    print("machine packages assumed to satisfy (version not read on the machine): " + ", ".join(sorted(assumed)))
    return problems


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel of ``name==version`` with no content (a stand-in for a machine package)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


def _pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    platform = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", *platform, *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def check_with_pip(folder: Path) -> list[str]:
    """pip's own resolution of ``curvkit[test]`` from the folder plus stand-ins of the
    machine's packages, and the device command's ``--no-deps`` install, as dry runs."""
    problems: list[str] = []
    pinned = pins()
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "machine"
        stubs.mkdir()
        for name, version in ON_DEVICE.items():
            # unread versions: our pin (or a high placeholder); the check is about presence
            _stub_wheel(stubs, name, version or pinned.get(canonicalize_name(name), "999"))
        report = Path(tmp) / "report.json"
        proc = _pip(
            [
                "--find-links",
                str(folder),
                "--find-links",
                str(stubs),
                "--target",
                str(Path(tmp) / "site"),
                "--report",
                str(report),
                "curvkit[test]",
            ]
        )
        if proc.returncode != 0:
            problems.append("pip cannot resolve curvkit[test] from the folder:\n" + proc.stderr[-3000:])
        else:
            installed = json.loads(report.read_text())["install"]
            machine = {canonicalize_name(n) for n in ON_DEVICE}
            carried = {canonicalize_name(n) for n in (*CARRIED, "curvkit")}
            names = {canonicalize_name(item["metadata"]["name"]) for item in installed}
            extra = sorted(names - machine - carried)
            if extra:
                problems.append(f"pip resolved distributions outside the carried set: {extra}")
            unused = sorted(carried - names)
            print(
                f"pip resolved curvkit[test] for Python 3.12: {len(names)} distributions, {len(names & machine)} "
                f"from the machine's packages"
                + (f"; carried but not needed by curvkit[test]: {unused}" if unused else "")
            )
        proc = _pip(["--no-deps", "--target", str(Path(tmp) / "site2"), *map(str, sorted(folder.glob("*.whl")))])
        if proc.returncode != 0:
            problems.append("pip would not install the folder with --no-deps:\n" + proc.stderr[-3000:])
        else:
            print(
                f"pip would install all {len(list(folder.glob('*.whl')))} wheels with --no-deps --target (Python 3.12)"
            )
    return problems


def travelling_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the wheel folder and of the rest of the working tree that travels (tracked
    and untracked-not-ignored files)."""
    whl = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / f.decode()).stat().st_size for f in listed if f and (REPO / f.decode()).is_file())
    return whl, tree


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"]:
        print("\n".join(requirements()))
        return 0
    if argv[:1] != ["check"] or len(argv) != 2:
        print("usage: gpu_wheels.py requirements | check FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    problems = check_folder(folder)
    problems += check_with_pip(folder)
    whl, tree = travelling_bytes(folder)
    total = whl + tree
    print(
        f"size: wheels {whl / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
        f"(limit {LIMIT_MIB} MiB)"
    )
    if total >= LIMIT_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB would travel, over the {LIMIT_MIB} MiB limit")
    if problems:
        print("INCOMPLETE:\n  " + "\n  ".join(problems))
        return 1
    print("complete: the folder and the machine's packages cover curvkit[test] on Python 3.12")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
