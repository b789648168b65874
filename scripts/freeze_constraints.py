"""Write constraints.txt and build-constraints.txt from the installed .venv (``make constraints``).

constraints.txt pins every installed distribution (pip included, the project itself left out)
at the version installed now, the set the test suite just passed with. Local version labels are
dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``): ``==2.13.0`` still matches the CPU wheel,
and the same file then also works where torch comes from another index.

build-constraints.txt pins what built the packages compiled here from source: llama-cpp-python's
wheel records its builder (``Generator: scikit-build-core X``) in its WHEEL file; setuptools
builds thoughtform itself.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "thoughtform"
HEADER = """\
# Exact versions of every dependency `make test` passed with (pip install -c constraints.txt).
# Written by `make constraints` from .venv ({python}); edit pyproject.toml, not this file.
"""
BUILD_HEADER = """\
# What built the source packages when `make test` passed (pip install --build-constraint).
# Written by `make constraints`.
"""


def canonical(name: str) -> str:
    """A distribution name as pip compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """Installed distributions (by canonical name) -> their public version."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or canonical(name) == PROJECT:
            continue
        out[canonical(name)] = dist.version.split("+", 1)[0]
    return out


def wheel_generator(dist: str) -> tuple[str, str] | None:
    """(builder, version) from an installed distribution's WHEEL file, if it names one."""
    try:
        text = metadata.distribution(dist).read_text("WHEEL") or ""
    except metadata.PackageNotFoundError:
        return None
    m = re.search(r"^Generator:\s*(\S+)\s+(\S+)\s*$", text, re.M)
    return (canonical(m.group(1)), m.group(2)) if m else None


def write(path: Path, text: str) -> None:
    """Write ``text`` only when it changed (the Makefile reinstalls when the file is newer)."""
    text += "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def main() -> int:
    """Write both files next to pyproject.toml."""
    found = pins()
    if "torch" not in found or "gradio" not in found:
        print("freeze_constraints: run it with the project's .venv python", file=sys.stderr)
        return 2
    py = ".".join(map(str, sys.version_info[:3]))
    lines = [f"{n}=={v}" for n, v in sorted(found.items())]
    write(ROOT / "constraints.txt", HEADER.format(python=f"Python {py}") + "\n".join(lines))
    build = {"setuptools": found.get("setuptools")}
    gen = wheel_generator("llama_cpp_python")
    if gen is not None:
        build[gen[0]] = gen[1]
    blines = [f"{n}=={v}" for n, v in sorted(build.items()) if v]
    write(ROOT / "build-constraints.txt", BUILD_HEADER + "\n".join(blines))
    print(f"constraints.txt: {len(lines)} pins; build-constraints.txt: {', '.join(blines)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
