#!/usr/bin/env python
"""The wheels tools/gpu_check.py needs on a bare lent GPU machine, prepared here, into .whl/ (git-ignored).

The lent machine runs Python 3.12 on x86-64 with torch, transformers, PEFT, accelerate, scipy, safetensors (and the
rest of its image) but no DeepSpeed, bitsandbytes, datasets or TRL, and it cannot reach a registry: those travel
with the working tree, which may hold 64 MiB in all. This tool takes the versions installed on this machine (the
ones the test suite ran), walks their requirements, leaves out what the image already holds (IMAGE below, from the
device tool's package list) and fetches the rest as Python 3.12 manylinux x86-64 wheels; DeepSpeed publishes no
wheel, so it is built here from its sdist with no op prebuilt (DS_BUILD_OPS=0: the ops compile on first use).

    python tools/gpu_wheels.py --dry-run   # what it would fetch, each size from the registry, the total vs 64 MiB
    python tools/gpu_wheels.py             # fetch and build into .whl/, then the same size check

Exit code 1 when the wheels and the working tree together exceed the limit; 2 on a requirement not installed here.
README's "Checking on a GPU" has the device call that installs them there and runs tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
ROOTS = ["bitsandbytes", "deepspeed", "trl", "datasets", "megatron-core"]
NO_WHEEL = {"deepspeed"}  # built here from the sdist
# The device image's packages (device tool, KINDS.md, read 2026-11-17); kasa_ds's own needs are among them.
IMAGE = set(map(canonicalize_name, """
accelerate aiohttp annotated-doc anyio attrs certifi charset-normalizer click einops filelock fsspec h11 hf-xet
httpcore httpx huggingface-hub idna jinja2 markupsafe mpi4py msgpack ninja numpy nvidia-ml-py packaging pandas peft
pip protobuf psutil py-cpuinfo pyarrow pygments python-dateutil pyyaml regex requests rich safetensors scipy
sentencepiece setuptools six tensorboard tokenizers torch tqdm transformers triton typer typing-extensions urllib3
wheel xxhash yarl""".split()))
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                       "manylinux1_x86_64"]
LIMIT = 64 * 2**20
INDEX = "https://pypi.org/simple"


def closure(roots: list[str]) -> dict[str, str]:
    """{name: version installed here} for ``roots`` and every requirement they pull in that the image lacks."""
    wanted, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted or name in IMAGE:
            continue
        try:
            wanted[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here; run `bash tools/setup.sh` (it installs the "
                             "versions the GPU check carries) and run this again") from None
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(req.name)
    return dict(sorted(wanted.items()))


def registry_file(name: str, version: str) -> tuple[str, int]:
    """(file name, bytes) of what the download would fetch: the best Python 3.12 x86-64 wheel, or the sdist for
    NO_WHEEL; from the registry's JSON simple index (PEP 691)."""
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    if name in NO_WHEEL:
        sdists = [f for f in files if f["filename"].endswith(".tar.gz") and f"-{version}.tar.gz" in f["filename"]]
        return sdists[0]["filename"], sdists[0]["size"]
    rank = {tag: i for i, tag in enumerate([*cpython_tags((3, 12), platforms=PLATFORMS),
                                            *compatible_tags((3, 12), platforms=PLATFORMS)])}
    best = []
    for f in files:
        if f["filename"].endswith(".whl"):
            _, v, _, tags = parse_wheel_filename(f["filename"])
            score = min((rank[t] for t in tags if t in rank), default=None)
            if str(v) == version and score is not None:
                best.append((score, f["filename"], f["size"]))
    if not best:
        raise SystemExit(f"error: the registry has no Python 3.12 x86-64 wheel of {name}=={version}")
    return min(best)[1:]


def fetch(name: str, version: str, out: Path) -> None:
    """pip download the wheel (pip chooses among PLATFORMS, as on the device), or build DeepSpeed's."""
    if name in NO_WHEEL:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
               f"{name}=={version}"]
        env = os.environ | {"DS_BUILD_OPS": "0"}
    else:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(out),
               f"{name}=={version}"]
        env = None
    subprocess.run(cmd, check=True, env=env)


def tree_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files of the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched and the sizes; write nothing")
    p.add_argument("--out", default=str(REPO / ".whl"), help="the wheel folder (carry it: git-ignored)")
    a = p.parse_args(argv)
    wanted = closure(ROOTS)
    out = Path(a.out)
    sizes = {}
    if a.dry_run:
        for name, version in wanted.items():
            sizes[name] = registry_file(name, version)
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, version in wanted.items():
            fetch(name, version, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        sizes = {f.name: (f.name, f.stat().st_size) for f in sorted(out.glob("*.whl"))}
    for file, size in sizes.values():
        print(f"{size / 2**20:8.2f} MiB  {file}")
    wheels, tree = sum(s for _, s in sizes.values()), tree_bytes()
    total = wheels + tree
    verdict = "fits" if total <= LIMIT else "EXCEEDS"
    estimate = f" (the sdist's size for {', '.join(sorted(NO_WHEEL))})" if a.dry_run else ""
    print(f"{wheels / 2**20:8.2f} MiB  {len(sizes)} wheel(s){estimate}\n{tree / 2**20:8.2f} MiB  the working tree\n"
          f"{total / 2**20:8.2f} MiB  in all: {verdict} the device tool's {LIMIT / 2**20:.0f} MiB")
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
