"""Per-service images and their locks, validated offline (no Docker engine here).

Each image target must install exactly its service's distributions from a lock
that pins every third-party package with hashes, satisfies what those
distributions declare, and leaves out what that process must never carry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy.project import (
    DOCKERFILE,
    IMAGE_MARKERS,
    REPO,
    REQUIREMENTS,
    console_scripts,
    distributions,
    dockerfile_stages,
    instructions,
    lineage,
    project,
    service_parser,
    stage,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERIGNORE = REPO / ".dockerignore"
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


@dataclass(frozen=True)
class Image:
    service: str
    lock: str
    distributions: frozenset[str]
    never: frozenset[str]  # third-party packages this image must not contain


SERVER = frozenset({"llmsuite-client", "llmsuite-runtime"})
IMAGES = {
    "tokenizer": Image("tokenizer", "tokenizer", SERVER | {"llmsuite-tokenizer"},
                       frozenset({*ONNXRUNTIMES, "numpy", "onnx"})),
    # onnx stays: the engine builds its KV gather/pad/concat graphs with it.
    "inference": Image("inference", "inference-cpu", SERVER | {"llmsuite-inference"},
                       frozenset({"onnxruntime-gpu", "tokenizers", "jinja2"})),
    "inference-gpu": Image("inference", "inference-gpu", SERVER | {"llmsuite-inference"},
                           frozenset({"onnxruntime", "tokenizers", "jinja2"})),
    # tokenizers is in: the gateway detokenizes streamed ids in process (docs/design.md, Streams).
    "gateway": Image("gateway", "gateway", SERVER | {"llmsuite-gateway"},
                     frozenset({*ONNXRUNTIMES, "numpy", "onnx", "jinja2"})),
}
MODEL_IMAGES = {"tokenizer", "inference", "inference-gpu"}


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make setup installs it from requirements-dev.txt)")
    return found


# --- locks ---------------------------------------------------------------------------

def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """package -> (pinned version, hashes), refusing anything but `name==version` + hashes."""
    text = (REQUIREMENTS / f"{name}.txt").read_text()
    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", entry)
        assert m, f"{name}.txt: not an exact, hashed pin: {entry[:100]}"
        pins[canonicalize_name(m[1])] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return pins


def lock_inputs(name: str) -> tuple[set[str], list[Requirement]]:
    """The llmsuite distributions a lock's .in file names (by folder) and its other requirements."""
    by_folder = {folder.resolve(): dist for dist, folder in distributions().items()}
    ours: set[str] = set()
    others: list[Requirement] = []
    for line in (REQUIREMENTS / f"{name}.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("./"):
            folder, _, extras = line.partition("[")
            dist = by_folder[(REPO / folder).resolve()]
            ours.add(dist)
            if extras:
                others += [r for extra in extras.rstrip("]").split(",") for r in requirements_of(dist, extra)]
        else:
            others.append(Requirement(line))
    return ours, others


def requirements_of(dist: str, extra: str = "") -> list[Requirement]:
    meta = project(dist)
    raw = meta["optional-dependencies"][extra] if extra else meta["dependencies"]
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**IMAGE_MARKERS, "extra": extra})]


def closure(dists: set[str]) -> list[Requirement]:
    """Third-party requirements of `dists` and the llmsuite distributions they pull in."""
    todo, seen, third_party = list(dists), set(), []
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        for req in requirements_of(dist):
            if req.name in distributions():
                assert req.name in dists, f"{dist} needs {req.name}, which the lock's .in does not name"
                todo.append(req.name)
                third_party += [r for extra in req.extras for r in requirements_of(req.name, extra)]
            else:
                third_party.append(req)
    return third_party


LOCKS = sorted(p.stem for p in REQUIREMENTS.glob("*.in"))


def test_every_lock_has_its_input_and_the_makefile_regenerates_them_all() -> None:
    assert sorted(p.stem for p in REQUIREMENTS.glob("*.txt")) == LOCKS
    makefile = (REPO / "Makefile").read_text()
    locks_line = re.search(r"^LOCKS\s*:?=(.*)$", makefile, re.M)
    assert locks_line and sorted(locks_line[1].split()) == LOCKS
    own = re.search(r"^OWN_DISTRIBUTIONS\s*:?=((?:.*\\\n)*.*)$", makefile, re.M)
    assert own and set(own[1].replace("\\", " ").split()) == set(distributions())


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_everything_with_hashes_and_satisfies_the_inputs(lock: str) -> None:
    pins = read_lock(lock)
    assert pins, f"{lock}.txt is empty"
    assert not [p for p in pins if p.startswith("llmsuite")], "our own distributions are built, not locked"
    ours, others = lock_inputs(lock)
    for req in [*closure(ours), *others]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}.txt lacks {req} (run `make lock`)"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{lock}.txt pins {name}=={pins[name][0]}, outside {req} (run `make lock`)"
    assert not (ONNXRUNTIMES <= set(pins)), "onnxruntime and onnxruntime-gpu clobber each other"


@pytest.mark.parametrize("target", sorted(IMAGES))
def test_lock_leaves_out_what_the_service_never_runs(target: str) -> None:
    image = IMAGES[target]
    pins = read_lock(image.lock)
    assert not image.never & set(pins), f"{target} image would carry {sorted(image.never & set(pins))}"
    assert lock_inputs(image.lock)[0] == image.distributions


# --- Dockerfile ----------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def venv_stage_of(target: str) -> str:
    copies = [m[1] for i in instructions(target) for m in [re.match(r"COPY --from=(\S+) /opt/venv /opt/venv$", i)] if m]
    assert len(copies) == 1, f"{target} must copy exactly one virtualenv"
    return copies[0]


def wheels_installed(venv_stage: str) -> set[str]:
    body = " ".join(stage(venv_stage).instructions)
    return {name.replace("_", "-") for name in re.findall(r"/wheels/(llmsuite_[a-z]+)-\*\.whl", body)}


def lock_installed(venv_stage: str) -> str:
    copied = [m[1] for i in stage(venv_stage).instructions
              for m in [re.match(r"COPY docker/requirements/(\S+)\.txt /tmp/requirements\.txt$", i)] if m]
    assert len(copied) == 1, f"{venv_stage} must install exactly one lock"
    runs = " ".join(i for i in stage(venv_stage).instructions if i.startswith("RUN"))
    assert "--require-hashes -r /tmp/requirements.txt" in runs, f"{venv_stage} must install its lock with hashes"
    assert "--no-deps --no-index /wheels/" in runs, f"{venv_stage}: own wheels go in without resolving anything"
    assert re.search(r"pip --python /opt/venv/bin/python check", runs), f"{venv_stage} must `pip check`"
    return copied[0]


@pytest.mark.parametrize("target", sorted(IMAGES))
def test_image_installs_only_its_service(target: str) -> None:
    image = IMAGES[target]
    venv = venv_stage_of(target)
    assert lock_installed(venv) == image.lock
    assert wheels_installed(venv) == image.distributions
    body = instructions(target)
    users = [i.split()[1] for i in body if i.startswith("USER")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{target} must run as non-root"
    assert any(i.startswith("HEALTHCHECK") and "llmsuite health" in i for i in body), target
    assert "llmsuite" in console_scripts(set(image.distributions)), "the health probe needs the llmsuite CLI"


@pytest.mark.parametrize("target", sorted(IMAGES))
def test_image_runs_its_service_on_the_services_own_ports(target: str) -> None:
    image = IMAGES[target]
    body = instructions(target)
    cmds = [i for i in body if i.startswith("CMD")]
    command = f"llmsuite-{image.service}"
    assert cmds[-1] == f'CMD ["{command}"]'
    assert console_scripts(set(image.distributions))[command] == f"llmsuite-{image.service}"
    listen = service_parser(image.service).get_default("listen")
    env = " ".join(i for i in body if i.startswith("ENV"))
    assert f"LLMSUITE_LISTEN={listen}" in env, "the HEALTHCHECK reads the port from LLMSUITE_LISTEN"
    grpc_port = int(listen.rsplit(":", 1)[1])
    exposed = {int(p) for i in body if i.startswith("EXPOSE") for p in i.split()[1:]}
    assert exposed == {grpc_port, grpc_port + 1000}, "gRPC port and metrics port (gRPC + 1000)"
    device = re.search(r"LLMSUITE_DEVICE=(\S+)", env)
    if image.service == "inference":
        assert device and device[1] == ("cuda" if target == "inference-gpu" else "cpu")
    else:
        assert device is None


def test_only_model_serving_images_carry_the_default_model() -> None:
    model_stage = stage("model")
    assert any("llmsuite-build-model --preset tiny --out /models/tiny " in i for i in model_stage.instructions)
    assert any("llmsuite-build-model --kind encoder --preset tiny --out /models/tiny-embed" in i
               for i in model_stage.instructions), "the embedding model make run serves ships too"
    assert lineage("model")[1].name == "venv-builder"
    assert lock_installed("venv-builder") == "builder"
    assert wheels_installed("venv-builder") == {"llmsuite-builder"}
    for target in IMAGES:
        copies_model = "COPY --from=model /models /models" in instructions(target)
        assert copies_model == (target in MODEL_IMAGES), target
        assert all("venv-builder" != s.name for s in lineage(target)), f"{target} must not carry the builder"


def test_own_wheels_are_built_with_the_pinned_backend() -> None:
    body = stage("wheels").instructions
    assert "RUN pip install --no-cache-dir --require-hashes -r docker/requirements/build.txt" in body
    build = next(i for i in body if "pip wheel" in i)
    assert "--no-build-isolation" in build and "--no-deps" in build
    built = {distributions()[d].relative_to(REPO).as_posix() for i in IMAGES.values() for d in i.distributions}
    built.add("services/builder")
    assert {w.removeprefix("./") for w in build.split() if w.startswith("./")} == built


def test_dockerfile_never_fetches_a_model_and_pins_its_base() -> None:
    stages = dockerfile_stages()
    names = {s.name for s in stages}
    for external in {s.base for s in stages if s.base not in names}:
        image, _, tag = external.partition(":")
        assert image == "python" and tag.startswith("3.11.") and tag != "latest", external
    runs = [i for s in stages for i in s.instructions if i.startswith("RUN")]
    for r in runs:
        assert not re.search(r"\b(curl|wget|git clone|huggingface-cli|hf download|snapshot_download)\b", r), r
        assert "http://" not in r and "https://" not in r, r
        if "pip install" in r or "pip wheel" in r:
            assert "--no-cache-dir" in r, r
        if re.search(r"pip[^&]* install[^&]* -r ", r):
            assert "--require-hashes" in r, r
    assert re.search(r"^ENV\b.*\bHF_HUB_OFFLINE=1\b", re.sub(r"\\\n", " ", DOCKERFILE.read_text()), re.M)


def test_dockerignore_admits_everything_the_dockerfile_copies() -> None:
    rules = [r.strip() for r in DOCKERIGNORE.read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for s in dockerfile_stages():
        for i in s.instructions:
            words = i.split()
            if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
                for src in words[1:-1]:
                    src = src.removeprefix("./").rstrip("/")
                    assert any(src == a or src.startswith(a + "/") for a in allowed), \
                        f"{src} is copied but excluded from the build context"
