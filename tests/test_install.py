"""The installed stack is the pinned one (requirements/constraints.txt), and nothing that breaks CPU torch is there."""
import importlib.metadata as md
import re
from pathlib import Path

import pytest
import torch

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "constraints.txt"


def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def test_every_installed_locked_package_has_its_pinned_version():
    pins = lock()
    wrong = {}
    for name, version in pins.items():
        have = installed(name)
        if have is not None and have.split("+")[0] != version:  # torch's local "+cpu" / "+cu130" is one build
            wrong[name] = f"{have} installed, {version} pinned"
    assert not wrong, wrong


@pytest.mark.parametrize("name", ["torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "bm25s"])
def test_what_the_figures_depend_on_is_installed_and_pinned(name):
    assert name in lock(), f"{name} has no exact version in {LOCK.name}"
    assert installed(name) is not None


@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA builds of torch have matching torchvision builds")
@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_no_cuda_built_torch_companions_beside_cpu_torch(name):
    # PyPI's builds of these break `import transformers` beside torch 2.13.0+cpu ("torchvision::nms does not exist")
    assert installed(name) is None, f"{name} {installed(name)} is installed beside {torch.__version__}"


def test_the_package_metadata_requires_exactly_the_locked_versions():
    pins, reqs = lock(), md.requires("mem1_fast") or []
    assert reqs, "mem1_fast is not installed (install.sh installs it editable)"
    for req in reqs:
        spec = req.split(";", 1)[0].strip()
        name, _, version = spec.partition("==")
        name = re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()
        assert version and pins.get(name) == version, f"setup.py requires {spec!r}; the lock pins {pins.get(name)}"
