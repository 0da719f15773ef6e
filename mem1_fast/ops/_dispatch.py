"""Backend choice, shared by the op fronts (state_attention, logprob_entropy, ppo_loss).

Each front names its backends and the module implementing each one (imported on first use, so a missing Triton or
CUDA extension costs nothing until asked for). A backend module answers `available(device)` and may list the input
dtypes it computes in `DTYPES`; the default for a tensor is the first backend of the device's preference list that is
available and takes the tensor's dtype (fp64 on CUDA therefore falls to the reference), and an environment variable
or the `backend=` keyword overrides it.
"""
from __future__ import annotations

import importlib
import os

import torch


class Backends:
    def __init__(self, op: str, modules: dict[str, str | object], env: str, prefer: dict[str, tuple[str, ...]]):
        self.op, self.modules, self.env, self.prefer = op, modules, env, prefer
        self.names = tuple(modules)

    def module(self, name: str):
        if name not in self.modules:
            raise ValueError(f"{self.op}: unknown backend {name!r}; known: {self.names}")
        mod = self.modules[name]
        return importlib.import_module(mod, __package__) if isinstance(mod, str) else mod

    def available(self, device: str = "cpu") -> list[str]:
        """Backends that can run on `device` here."""
        out = []
        for name in self.names:
            try:
                if self.module(name).available(device):
                    out.append(name)
            except ImportError:
                pass
        return out

    def default(self, x: torch.Tensor) -> str:
        # only the device's preferred backends are asked (importing the others, e.g. Triton on a CPU, costs seconds)
        for name in self.prefer.get(x.device.type, ()):
            try:
                mod = self.module(name)
                if mod.available(x.device.type) and x.dtype in getattr(mod, "DTYPES", (x.dtype,)):
                    return name
            except ImportError:
                pass
        return "reference"

    def asked(self, backend: str | None) -> str:
        """The backend asked for (keyword, then environment), validated; "" when none was (the op picks the
        default when it runs: traced code must not probe extensions)."""
        name = backend or os.environ.get(self.env, "")
        if name and name not in self.modules:
            raise ValueError(f"{self.op}: unknown backend {name!r}; known: {self.names}")
        return name

    def pick(self, backend: str | None, x: torch.Tensor) -> str:
        """The backend asked for (keyword, then environment), else the default for x; validated."""
        name = backend or os.environ.get(self.env) or self.default(x)
        if name not in self.modules:
            raise ValueError(f"{self.op}: unknown backend {name!r}; known: {self.names}")
        return name


def check_local(op: str, **tensors) -> None:
    """The ops have no DTensor sharding rules: a DTensor gets an error that says what to pass instead."""
    for name, x in tensors.items():
        if x is not None and hasattr(x, "full_tensor"):
            raise TypeError(f"{op}: {name} is a DTensor; pass local tensors ({name}.to_local()), or gather it first "
                            f"({name}.full_tensor()) when the op needs all of it (a vocabulary-sharded LM head)")


def contiguous(*tensors):
    """The op's outputs in the layout its fake kernel promises (a no-op for the kernels' own outputs)."""
    return tuple(t.contiguous() for t in tensors)
