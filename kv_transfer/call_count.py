"""Counting one thread's calls from Python into torch, to keep the transfer's host path short.

A transfer of a few hundred MiB is bound by host-side calls before the first byte moves, not by the
copies: on a busy GPU host each call from Python into torch (a view, a copy launch, an NCCL post, a
stream or event operation) costs tens of microseconds. The benchmark and the tests count them with
``CallCounter``.

What counts as one call: a tensor operation or factory seen by a ``TorchFunctionMode`` (attribute
reads such as ``.shape`` excluded; operations that torch runs inside another are not seen), plus
every call into torch's C++ extension on an object that is not a tensor (process groups and their
work, CUDA streams and events), seen by a profile hook. Both are per thread and slow the thread down,
so count in runs that are not timed.
"""

from __future__ import annotations

import sys
from collections import Counter
from types import ModuleType

import torch
from torch.overrides import TorchFunctionMode

POSTS = ("_distributed_c10d.send", "_distributed_c10d.recv")  # how process-group posts are named


class _TensorOps(TorchFunctionMode):
    def __init__(self, counter: CallCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", None) or str(func)
        if "__get__" not in name and not name.startswith("getset_descriptor"):
            name = name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
            self.counter.calls.append(name)
        return func(*args, **(kwargs or {}))


class CallCounter:
    """Counts the calls into torch made by the thread that ``start``s it, until ``stop``.

    ``mark(label)`` remembers how many calls were made so far, to split the count into phases.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.marks: list[tuple[str, int]] = []
        self._mode: _TensorOps | None = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self) -> CallCounter:
        self._mode = _TensorOps(self)
        self._mode.__enter__()
        sys.setprofile(self._profile)
        return self

    def stop(self) -> None:
        sys.setprofile(None)
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def mark(self, label: str) -> None:
        self.marks.append((label, len(self.calls)))

    def _profile(self, frame, event: str, arg) -> None:
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if isinstance(owner, torch.Tensor):
            return  # a tensor method: the TorchFunctionMode saw it
        module = getattr(arg, "__module__", None) or ""
        if module.startswith("torch._C"):  # pybind functions: process groups, works, stores
            self.calls.append(f"{module.rsplit('.', 1)[-1]}.{arg.__name__}")
        elif owner is not None and not isinstance(owner, ModuleType):
            if type(owner).__module__.startswith("torch"):  # streams, events
                self.calls.append(f"{type(owner).__name__}.{arg.__name__}")

    # ------------------------------------------------------------------------------------ reading

    def first(self, names: tuple[str, ...] = POSTS) -> int | None:
        """How many calls came before the first call named in ``names`` (None if there was none)."""
        return next((i for i, name in enumerate(self.calls) if name in names), None)

    def at(self, label: str, last: bool = False) -> int | None:
        """The count at the first (or last) mark of ``label``."""
        found = [count for name, count in self.marks if name == label]
        return (found[-1] if last else found[0]) if found else None

    def summary(self, lo: int = 0, hi: int | None = None) -> dict[str, int]:
        """Calls ``[lo, hi)`` by name, most frequent first."""
        return dict(Counter(self.calls[lo:hi]).most_common())
