"""Counting the host-device transfers a piece of the loop makes, on any device, the CPU included.

On a GPU, a read of a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``, a Python
``float(t)``) waits until every kernel queued before it has run, and so does an ordinary
host-to-device copy (``torch.tensor(data, device=...)``, ``t.to(device)``: PyTorch synchronises the
stream after a blocking copy). Either one in a denoising step stops the host from queueing the next
step's kernels while the GPU works, and rules out capturing the step as a CUDA graph.

On the CPU nothing is transferred, so the counter counts what *would* cross on a GPU:

- ``reads``: ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()``, ``int()`` of a tensor)
  and calls of ``Tensor.tolist`` / ``Tensor.numpy``, which dispatch no aten op;
- ``writes``: ``aten.lift_fresh`` (a tensor made from host data: ``torch.tensor([...])``, indexing
  with a Python list), and every ``Tensor.to`` call that names a device (on the CPU a move to the
  same device dispatches nothing, so the call itself is counted). The one exception: calls from
  diffusers' model code (``diffusers/models/``), whose ``.to(x.device)`` move tensors that were
  made on the device already (the rotary embedding to its activations' device): no transfer on a GPU.

A step that makes none of these on the CPU makes no blocking transfer on a GPU either, which is
what tests/test_host_reads.py holds, and what the device benchmark reports per step.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.ops.aten._local_scalar_dense.default}
_WRITES = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
_SAME_DEVICE_CALLERS = ("diffusers/models/",)  # see the module's docstring


def _names_a_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    for arg in args:
        if isinstance(arg, (torch.device, torch.Tensor)):  # .to(other) takes other's device
            return True
        if isinstance(arg, str):
            try:
                torch.device(arg)
            except RuntimeError:
                continue
            return True
    return False


@dataclass
class HostTransfers:
    """What a block of code made: device-to-host reads and host-to-device writes, by op name."""

    by_op: Counter = field(default_factory=Counter)
    reads: int = 0
    writes: int = 0

    @property
    def count(self) -> int:
        return self.reads + self.writes


class _Counting(TorchDispatchMode):
    def __init__(self, transfers: HostTransfers) -> None:
        super().__init__()
        self.transfers = transfers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self._note("read", str(func))
        elif func in _WRITES:
            self._note("write", str(func))
        return func(*args, **kwargs)

    def _note(self, kind: str, name: str) -> None:
        self.transfers.by_op[name] += 1
        if kind == "read":
            self.transfers.reads += 1
        else:
            self.transfers.writes += 1


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostTransfers]:
    """Count the host-device transfers made inside the block (see the module's docstring)."""
    transfers = HostTransfers()
    mode = _Counting(transfers)
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "to")}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if name != "to":
                mode._note("read", f"Tensor.{name}")
            elif _names_a_device(args, kwargs):
                caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                if not any(part in caller for part in _SAME_DEVICE_CALLERS):
                    mode._note("write", "Tensor.to(device)")
            return original(self, *args, **kwargs)

        return counted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with mode:
            yield transfers
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class DeviceConstants:
    """Small tensors a step needs that depend only on host values (an output size's position ids,
    the rows of a forward's samples), made on the device the first time and reused after, so a
    step in a steady state makes no host-to-device copy. Least recently used dropped past ``size``."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._made: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            if key in self._made:
                self._made.move_to_end(key)
                return self._made[key]
        value = make()
        with self._lock:
            self._made[key] = value
            while len(self._made) > self.size:
                self._made.popitem(last=False)
        return value
