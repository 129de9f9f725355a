"""Checks, without a GPU, that every tensor vtok hands to a torch.distributed collective is on the
training device (NCCL, the backend whenever CUDA is present, cannot reduce a CPU tensor).

Two layers, used by tests/test_collective_devices.py:

- :func:`install` wraps the collectives of ``torch.distributed`` (looked up at call time by
  core.dist, the quantizers, open_clip's gather and ``torch.distributed.nn``) and records every
  call: its name, and a violation when a tensor argument is not on the expected device.
- :class:`FakeCuda` pretends the training device is a GPU. On a CPU-only machine the training
  device and the default device are both "cpu", so the device attribute cannot tell them apart;
  instead the mode follows where each tensor came from. A tensor is ON THE HOST when a factory made
  it without a ``device=`` (``torch.tensor([x])``, ``torch.zeros(n)``), when ``.cpu()`` produced
  it, or when it was computed from host tensors only; ``.to(<device or tensor>)`` / ``.cuda()``
  put it on the "GPU", as do factories given a device. Under this mode the wrapper reports a host
  tensor as a violation: exactly the tensors that a CUDA run would hand to NCCL on the CPU.
  (It trusts any explicit device argument, so a hard-coded ``device="cpu"`` is not caught, and a
  no-op ``.to(device)`` marks the tensor itself, so a host tensor still used after
  ``y = x.to(device)`` is missed: the check has false negatives, no false positives by design.)
"""
from __future__ import annotations

import functools
import traceback
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch.overrides import TorchFunctionMode

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv")
HOST = "_vtok_on_host"


def tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from tensors(item)


def on_host(t: torch.Tensor) -> bool:
    return bool(getattr(t, HOST, False))


def _mark(out: Any, host: bool) -> None:
    for t in tensors(out):
        try:
            setattr(t, HOST, host)
        except (AttributeError, RuntimeError):  # some internal tensors take no attributes
            pass


class FakeCuda(TorchFunctionMode):
    """Tracks which tensors a CUDA run would hold on the host (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(True for _ in tensors(out)):
            return out
        name = getattr(func, "__name__", "")
        inputs = list(tensors((args, kwargs)))
        if name == "cpu":
            if args and out is args[0] and not on_host(out):  # already on the CPU: returned itself,
                out = out.view_as(out)  # but a CUDA run would copy; the original stays on the device
            _mark(out, True)
        elif name == "cuda":
            _mark(out, False)
        elif name == "to":
            rest = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
            targets = [a for a in rest if isinstance(a, (torch.device, str, torch.Tensor))]
            # moved: to a device (trusted: the training device) or to another tensor's device. A
            # no-op move returns the tensor itself, whose mark then changes (x = x.to(device))
            if targets:
                _mark(out, any(on_host(a) for a in targets if isinstance(a, torch.Tensor)))
            elif inputs:  # dtype only
                _mark(out, on_host(inputs[0]))
        elif args and out is args[0]:  # in place (add_, __setitem__, __iadd__, ...): same storage, same device
            pass
        elif kwargs.get("device") is not None:
            _mark(out, False)
        elif not inputs:  # a factory without a device: the default device, i.e. the host
            _mark(out, True)
        else:  # computed from tensors: on the host only if every input is
            _mark(out, all(on_host(t) for t in inputs))
        return out


class Record:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.violations: list[str] = []


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "collective_check" not in f.filename]
    vtok = [f for f in frames if "/core/" in f.filename or "/plugins/" in f.filename] or frames
    f = vtok[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"


def install(expected: torch.device, fake_cuda: bool = False, setattr=setattr) -> Record:
    """Wrap the torch.distributed collectives; every call is recorded, and any tensor argument not
    on ``expected`` (or, with ``fake_cuda``, on the host) is a violation. Returns the record.
    ``setattr``: pass pytest's ``monkeypatch.setattr`` to undo the wrapping after the test."""
    rec = Record()
    expected = torch.device(expected)

    def wrap(name: str, fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            rec.calls.append(name)
            for t in tensors((args, kwargs)):
                if t.device != expected or (fake_cuda and on_host(t)):
                    where = "host" if t.device == expected else str(t.device)
                    rec.violations.append(f"{name} got a {where} tensor {tuple(t.shape)} at {_where()}")
            return fn(*args, **kwargs)

        return checked

    for name in COLLECTIVES:
        if hasattr(tdist, name):
            setattr(tdist, name, wrap(name, getattr(tdist, name)))
    return rec
