"""A CPU stand-in for a CUDA device, so that device placement can be tested on a machine without a GPU.

Inside ``with FakeCuda() as dev:`` every tensor is still a CPU tensor (the numbers are the CPU's), but some are
*on the fake device*: the parameters and buffers of models passed to :meth:`FakeCuda.put_model`, tensors made
by a factory call with ``device="cuda"`` (or ``device=x.device`` of such a tensor), tensors moved with
``.to("cuda")`` / ``.to(x.device)`` / ``.cuda()``, and every result of an operation that reads one of them
(also inside autograd's backward and the optimizers, seen at the ATen level). Such a tensor reports
``.device == cuda:0`` and ``.is_cuda``; ``.cpu()`` / ``.to("cpu")`` return an ordinary copy.

What real CUDA refuses is refused here too, with a :class:`DeviceError`:

- an operation that mixes a fake-device tensor with an ordinary CPU tensor of one or more dimensions (0-d CPU
  tensors are allowed, as CUDA allows CPU scalars); indexing a fake-device tensor with CPU index tensors is
  allowed, as in PyTorch, but index tensors on the fake device cannot index a CPU tensor (tensors that
  autograd's engine makes from nothing inside a backward pass count as on the device, as on a GPU);
- ``.numpy()`` of a fake-device tensor;
- a CPU ``torch.Generator`` passed together with ``device="cuda"`` or with tensors on the device
  (``torch.multinomial(device_probs, 1, generator=cpu_generator)``).

``FakeCuda(strict_under=folder)`` also refuses what CUDA allows but costs a host-to-device copy on every call:
a CPU index tensor (of one or more dimensions) indexing a device tensor, ``x[cpu_rows, cpu_cols]``, in code
under ``folder`` (the package under test; Python lists as indices stay allowed).

So code that creates a tensor on the CPU implicitly (``torch.zeros(d)``) where it meets model activations, or
that feeds CPU ``input_ids`` to a model on the device, fails here as it would on a GPU.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_GETTERS = torch._C.TensorBase.__dict__
_DEVICE, _IS_CUDA, _GRAD = _GETTERS["device"], _GETTERS["is_cuda"], _GETTERS["grad"]
# ATen ops that may take CPU index tensors for a device tensor (args: self, indices[, values])
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_COPY_OPS = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize"}


class DeviceError(RuntimeError):
    """What CUDA would have raised: tensors on two devices met."""


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Dispatch(TorchDispatchMode):
    """ATen level: propagate the fake device to every output and refuse mixed-device operations."""

    def __init__(self, dev: "FakeCuda"):
        super().__init__()
        self.dev = dev

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _tensors((args, kwargs))
        on = [self.dev.on_device(t) for t in flat]
        if any(on):
            name = func.overloadpacket.__name__
            if name in _INDEX_OPS:
                checked = _tensors([args[0], args[2] if len(args) > 2 else None])
            elif name in _COPY_OPS:
                checked = []
            else:
                checked = flat
            cpu = [t for t in checked if not self.dev.on_device(t) and t.dim() > 0]
            if cpu:
                raise DeviceError(f"{func}: CPU tensor(s) of shape {[tuple(t.shape) for t in cpu]} met tensors on "
                                  "the device")
        elif func.overloadpacket.__name__ in _INDEX_OPS:
            idx = _tensors(args[1] if len(args) > 1 else ())
            if any(self.dev.on_device(t) for t in idx):
                raise DeviceError(f"{func}: indices on the device for a CPU tensor")
        out = func(*args, **kwargs)
        # autograd's engine materializes zero gradients for unused outputs on the device of the node it runs
        # (on the GPU, the GPU): a tensor made from nothing inside a backward node belongs to the device
        engine_made = not flat and torch._C._current_autograd_node() is not None
        if any(on) or engine_made:
            self.dev.mark(out)
        return out


def _caller_file() -> str:
    """The file of the innermost frame outside torch and this module (the code that made the call)."""
    f = sys._getframe(2)
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    while f is not None and (os.path.abspath(f.f_code.co_filename) == here
                             or os.path.abspath(f.f_code.co_filename).startswith(torch_dir)):
        f = f.f_back
    return os.path.abspath(f.f_code.co_filename) if f is not None else ""


class _Function(TorchFunctionMode):
    """Python API level: fake ``.device``, device factories and moves, refuse ``.numpy()``, CPU generators with
    device tensors, and (``strict_under``) CPU index tensors for device tensors."""

    def __init__(self, dev: "FakeCuda"):
        super().__init__()
        self.dev = dev

    def _check_indices(self, func, args) -> None:
        if len(args) < 2 or not self.dev.on_device(args[0]):
            return
        idx = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        cpu = [t for t in idx if isinstance(t, torch.Tensor) and t.dim() > 0 and t.dtype != torch.bool
               and not self.dev.on_device(t)]
        if cpu and _caller_file().startswith(self.dev.strict_under):
            raise DeviceError(f"{func.__name__}: a CPU index tensor of shape {tuple(cpu[0].shape)} indexes a device "
                              f"tensor (a host-to-device copy on every call), in {_caller_file()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.dev.strict_under and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            self._check_indices(func, args)
        if kwargs.get("generator") is not None and any(self.dev.on_device(t) for t in _tensors(args)):
            raise DeviceError(f"{getattr(func, '__name__', func)}: a CPU generator with tensors on the device")
        getter = getattr(func, "__self__", None)
        if getter is _DEVICE:
            return CUDA if self.dev.on_device(args[0]) else CPU
        if getter is _IS_CUDA:
            return self.dev.on_device(args[0])
        if getter is _GRAD:
            g = func(*args, **kwargs)
            return self.dev.mark(g) if g is not None and self.dev.on_device(args[0]) else g
        if func is torch.Tensor.numpy and self.dev.on_device(args[0]):
            raise DeviceError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        if func is torch.Tensor.cpu:
            return self._move(args[0], CPU, (), {})
        if func is torch.Tensor.cuda:
            return self._move(args[0], CUDA, (), {})
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cuda":
            if kwargs.get("generator") is not None:
                raise DeviceError("a CPU generator cannot draw on the device")
            out = func(*args, **{**kwargs, "device": "cpu"})
            if any(out is t for t in _tensors(args)):  # as_tensor(cpu_tensor, device=cuda) copies on CUDA
                out = out.clone()
            return self.dev.mark(out)
        return func(*args, **kwargs)

    def _to(self, func, args, kwargs):
        x, rest = args[0], list(args[1:])
        target = None
        if "device" in kwargs:
            target = torch.device(kwargs.pop("device"))
        elif rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
            target = CUDA if self.dev.on_device(other) else CPU
            kwargs.setdefault("dtype", other.dtype)
        elif rest and isinstance(rest[0], (str, torch.device, int)):
            target = torch.device(rest.pop(0))
        if target is None:
            return func(*args, **kwargs)
        return self._move(x, target, tuple(rest), kwargs)

    def _move(self, x: torch.Tensor, target: torch.device, rest: tuple, kwargs: dict) -> torch.Tensor:
        y = x.to(*rest, **kwargs) if (rest or kwargs) else x
        here = self.dev.on_device(x)
        if target.type == "cuda":
            if y is x and not here:
                y = x.clone()
            return self.dev.mark(y)
        if here:
            if y is x:
                y = x.clone()
            self.dev.unmark(y)
        return y


class FakeCuda:
    """``with FakeCuda(strict_under=...) as dev: dev.put_model(model); ...`` (see the module docstring)."""

    def __init__(self, strict_under: str | os.PathLike | None = None) -> None:
        self._on: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.strict_under = os.path.abspath(strict_under) if strict_under else ""
        self._modes: list = []

    def on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t in self._on

    def mark(self, tree: Any) -> Any:
        for t in _tensors(tree):
            self._on[t] = True
        return tree

    def unmark(self, tree: Any) -> Any:
        for t in _tensors(tree):
            self._on.pop(t, None)
        return tree

    def put_model(self, model: nn.Module) -> nn.Module:
        """Put the model's parameters and buffers on the fake device (as ``model.to("cuda")``)."""
        self.mark(list(model.parameters()) + list(model.buffers()))
        return model

    def __enter__(self) -> "FakeCuda":
        self._modes = [_Dispatch(self), _Function(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []
