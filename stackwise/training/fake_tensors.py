"""Fake tensors (shapes, dtypes and devices, no memory) without loading PyTorch's compiler.

The exact activation estimate (`metrics.estimate_activation_bytes`) runs a stage's forward on
PyTorch's fake tensors. Creating a `FakeTensorMode` reads two settings of PyTorch's compiler
(``torch._dynamo.config``), and a mode's first dispatch asks the compiler to leave it alone
(``torch._dynamo.disable``); both import the whole compiler package, about a second of start-up
for `stackwise plan`, which compiles nothing.

`compiler_settings_only` stands in for that package while fake tensors are created and used:
the settings module is PyTorch's own, loaded by itself; ``disable`` hands over to PyTorch's
once the compiler is loaded (it can only trace something after it is); any other name loads
the real package, which then takes the stand-in's place. Where the compiler is already loaded,
or PyTorch's layout is not the one expected, nothing is replaced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

COMPILER = "torch._dynamo"


def compiler_loaded() -> bool:
    """Whether PyTorch's compiler package itself (not the stand-in) is loaded."""
    module = sys.modules.get(COMPILER)
    return module is not None and not isinstance(module, _CompilerStandIn)


class _CompilerStandIn(types.ModuleType):
    """``torch._dynamo`` with only its settings; anything else loads the real package."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_load_compiler(), name)

    @staticmethod
    def disable(fn: Any = None, recursive: bool = True, **kwargs: Any) -> Any:
        if fn is None:
            return functools.partial(_CompilerStandIn.disable, recursive=recursive, **kwargs)
        return _DisableWhenLoaded(fn, recursive, kwargs)


class _DisableWhenLoaded:
    """`fn`, run directly until the compiler is loaded, then through its ``disable``."""

    def __init__(self, fn: Callable[..., Any], recursive: bool, kwargs: dict[str, Any]):
        self.fn = fn
        self.recursive = recursive
        self.kwargs = kwargs
        self.disabled: Callable[..., Any] | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled is None:
            if not compiler_loaded():
                return self.fn(*args, **kwargs)
            compiler = sys.modules[COMPILER]
            self.disabled = compiler.disable(self.fn, self.recursive, **self.kwargs)
        return self.disabled(*args, **kwargs)


def _load_compiler() -> types.ModuleType:
    module = sys.modules.get(COMPILER)
    if isinstance(module, _CompilerStandIn):
        del sys.modules[COMPILER]
        # The package's own import reuses the settings module already loaded.
        module = importlib.import_module(COMPILER)
    assert module is not None
    return module


@contextlib.contextmanager
def compiler_settings_only() -> Iterator[None]:
    """Within this block, fake tensors do not import PyTorch's compiler (module docstring)."""
    stand_in = _install() if COMPILER not in sys.modules else None
    try:
        yield
    finally:
        if stand_in is not None:
            _remove(stand_in)


def _install() -> types.ModuleType | None:
    import torch

    spec = importlib.util.find_spec(COMPILER)
    if spec is None or not spec.submodule_search_locations:
        return None
    stand_in = _CompilerStandIn(COMPILER)
    stand_in.__path__ = list(spec.submodule_search_locations)
    stand_in.__spec__ = spec
    stand_in.__file__ = spec.origin
    stand_in.__package__ = COMPILER
    sys.modules[COMPILER] = stand_in
    torch._dynamo = stand_in
    try:
        stand_in.config = importlib.import_module(f"{COMPILER}.config")  # type: ignore[attr-defined]
    except Exception:  # not the layout expected: let PyTorch import its compiler
        _remove(stand_in)
        return None
    return stand_in


def _remove(stand_in: types.ModuleType) -> None:
    import torch

    if sys.modules.get(COMPILER) is stand_in:
        del sys.modules[COMPILER]
    if vars(torch).get("_dynamo") is stand_in:
        # torch loads the real package on first use of the name again.
        del torch._dynamo


def fake_tensor_mode() -> Any:
    """A mode in which tensors have shapes, dtypes and devices but no memory."""
    with compiler_settings_only():
        from torch._subclasses.fake_tensor import FakeTensorMode

        return FakeTensorMode(allow_non_fake_inputs=True)
