"""The image definitions install Baton exactly as the README does, as a non-root user.

The Dockerfiles are parsed (instructions, continuation lines, RUN commands), not built: building
needs a container runtime and network access to base images.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling continuation line"
    return instructions


def resolve_args(instructions: list[Instruction], text: str) -> str:
    """Substitute ARG defaults into ``text`` (``${NAME}`` / ``$NAME``)."""
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            text = text.replace("${" + name + "}", default).replace("$" + name, default)
    return text


@dataclass(frozen=True)
class LocalInstall:
    """``pip install <local source>[extras]``: the source directory and the extras, flags ignored."""

    source: str
    extras: frozenset[str]


_LOCAL_SPEC = re.compile(r"^(?P<source>\.|\./?|/[^\[]*|\.\.?/[^\[]*)(?:\[(?P<extras>[^\]]*)\])?$")


def local_installs(command: str) -> list[LocalInstall]:
    """Every ``pip install`` of a local directory in one shell command line."""
    found: list[LocalInstall] = []
    for segment in re.split(r"&&|;|\|\|", command):
        words = shlex.split(segment)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        skip_next = False
        for word in args:
            if skip_next:
                skip_next = False
                continue
            if word in (
                "-r",
                "--requirement",
                "-c",
                "--constraint",
                "--index-url",
                "-i",
                "--extra-index-url",
            ):
                skip_next = True
                continue
            if word.startswith("-"):
                continue
            match = _LOCAL_SPEC.match(word)
            if match:
                extras = match.group("extras") or ""
                found.append(
                    LocalInstall(
                        match.group("source"), frozenset(e.strip() for e in extras.split(",") if e.strip())
                    )
                )
    return found


def readme_installs(path: Path) -> list[LocalInstall]:
    """``pip install`` commands of the local tree in a README's fenced code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.DOTALL)
    installs: list[LocalInstall] = []
    for block in blocks:
        for line in block.splitlines():
            code = line.split("#", 1)[0].strip()
            if code.startswith("pip install"):
                installs.extend(local_installs(code))
    return installs


def install_readmes() -> list[Path]:
    """The README quick start (when written) and the deploy README, which must both agree."""
    return [p for p in (REPO / "README.md", DEPLOY / "README.md") if p.exists()]


def image_install(dockerfile: Path) -> LocalInstall:
    instructions = parse_dockerfile(dockerfile)
    installs = [i for ins in instructions if ins.keyword == "RUN" for i in local_installs(ins.args)]
    assert len(installs) == 1, (
        f"{dockerfile.name}: expected one pip install of the source tree, got {installs}"
    )
    return installs[0]


@pytest.mark.parametrize(("dockerfile", "extras"), [("Dockerfile", {"gpu"}), ("Dockerfile.cpu", set())])
def test_image_installs_the_package_as_the_readme_does(dockerfile: str, extras: set[str]) -> None:
    install = image_install(DEPLOY / dockerfile)
    assert install.source == "." and install.extras == frozenset(extras)
    readmes = install_readmes()
    assert DEPLOY / "README.md" in readmes
    for readme in readmes:
        assert install in readme_installs(readme), (
            f"{readme} has no `pip install` matching {dockerfile}'s {install}"
        )


def test_install_parser_reads_extras_and_ignores_flags() -> None:
    assert local_installs("pip install --no-cache-dir '.[gpu,test]'") == [
        LocalInstall(".", frozenset({"gpu", "test"}))
    ]
    assert local_installs("cd /src && pip install -e .") == [LocalInstall(".", frozenset())]
    assert local_installs("pip install torch --index-url https://x/cpu") == []
    assert local_installs("pip install baton-serve[gpu]") == []


def test_gpu_image_uses_a_cuda_base_with_python_3_11_or_newer() -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile")
    (base,) = [resolve_args(instructions, i.args) for i in instructions if i.keyword == "FROM"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    # Ubuntu 24.04 ships Python 3.12 (22.04 would give 3.10, too old for the package).
    assert "ubuntu24.04" in base
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "python3-venv" in runs and "gcc" in runs  # Triton compiles launcher stubs at run time


def test_cpu_image_takes_torch_from_the_cpu_wheel_index_first() -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile.cpu")
    (base,) = [resolve_args(instructions, i.args) for i in instructions if i.keyword == "FROM"]
    version = re.match(r"python:3\.(\d+)", base)
    assert version and int(version.group(1)) >= 11
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    torch_step = next(k for k, r in enumerate(runs) if "pip install torch" in r)
    install_step = next(k for k, r in enumerate(runs) if local_installs(r))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]
    assert torch_step < install_step


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_image_runs_the_entrypoint_as_a_non_root_user(dockerfile: str) -> None:
    instructions = parse_dockerfile(DEPLOY / dockerfile)
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] == "1000", "the last USER must be the numeric non-root uid 1000"
    copies = [i.args for i in instructions if i.keyword == "COPY"]
    assert any("deploy/entrypoint.sh /usr/local/bin/baton-entrypoint" in c for c in copies)
    (entrypoint,) = [i.args for i in instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoint == '["tini", "-g", "--", "baton-entrypoint"]'
    lines = (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ".git" in ignore and "deploy" not in ignore and "README.md" not in ignore
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "tini" in runs and "wget" in runs  # PID 1, and KubeRay's default exec probes
