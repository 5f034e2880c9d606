"""One small hook utility for reading, replacing or adding to module outputs during a forward pass.

Tracing, editing and second-moment statistics all go through :func:`trace`::

    with trace(model, ["transformer.h.3.mlp"], edit=fn) as tr:
        model(**batch)
    tr.outputs["transformer.h.3.mlp"]   # the (edited) output, detached unless keep_grad=True

Modules differ in what they return: an MLP returns a tensor; a transformer block returns a tuple whose
first element is the hidden state (transformers < 5) or a bare tensor (some blocks in transformers 5).
The utility always hands the *main tensor* (first element of a tuple) to ``edit`` and re-packs the result,
so callers never see the difference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

# edit(output_tensor, module_name) -> new tensor (or None to keep the output unchanged)
EditFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

# resume_at's reuse of lower layers can be switched off (benchmarks measure the naive path with it off)
REUSE_BELOW = True


def main_tensor(output: object) -> torch.Tensor:
    """Return the hidden-state tensor of a module output (the tensor itself, or a tuple's first item)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output).__name__}")


def _repack(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (dotted path), with an error that names it if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"model {type(model).__name__} has no module named {name!r}") from err


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The module's main input: first positional tensor, else ``hidden_states`` or the first tensor kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


@dataclass
class Trace:
    """What a :func:`trace` block recorded: ``outputs[name]`` and ``inputs[name]`` (first positional input)."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def trace(
    model: nn.Module,
    modules: str | Iterable[str],
    edit: EditFn | None = None,
    retain_output: bool = True,
    retain_input: bool = False,
    keep_grad: bool = False,
    stop: bool = False,
) -> Iterator[Trace]:
    """Hook ``modules`` of ``model`` for the duration of a ``with`` block.

    - ``edit(out, name)`` may return a replacement for the module's main output tensor (same shape),
      e.g. ``out + delta`` to add, or a modified clone to replace positions. Return None to keep it.
    - ``retain_output`` / ``retain_input`` record the (edited) output / main input per module
      (first positional tensor, else ``hidden_states``).
      Recorded tensors are detached unless ``keep_grad``.
    - ``stop=True`` raises :class:`StopForward` after the last listed module ran (the ``with`` block
      swallows it), for cheap partial forward passes such as statistics collection.

    Hooks are always removed on exit, exceptions included.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    rec = Trace()
    handles = []
    last = names[-1] if names else None

    def make_hook(name: str):
        def hook(_mod, args, kwargs, output):
            if retain_input:
                x = _first_input(args, kwargs)
                if x is not None:
                    rec.inputs[name] = x if keep_grad else x.detach()
            result = None
            if edit is not None:
                new = edit(main_tensor(output), name)
                if new is not None:
                    result = _repack(output, new)
                    output = result
            if retain_output:
                t = main_tensor(output)
                rec.outputs[name] = t if keep_grad else t.detach()
            if stop and name == last:
                raise StopForward
            return result

        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name), with_kwargs=True))
        try:
            yield rec
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised inside a forward pass to end it early (see ``trace(stop=True)``)."""


def add_at_positions(delta: torch.Tensor, positions: torch.Tensor | list[int]) -> EditFn:
    """Edit function adding ``delta`` (rows, d) or (d,) to the output at ``positions[row]`` of each row.

    ``positions`` has one token index per batch row. Used by ROME/MEMIT's v* optimisation. The index tensors
    live on ``delta``'s device (the model's).
    """
    pos = torch.as_tensor(positions, dtype=torch.long, device=delta.device)

    def fn(out: torch.Tensor, _name: str) -> torch.Tensor:
        rows = torch.arange(out.shape[0], device=out.device)
        d = delta if delta.dim() == 2 else delta.expand(out.shape[0], -1)
        new = out.clone()
        new[rows, pos] = new[rows, pos] + d.to(out.dtype)
        return new

    return fn


def _block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the model's transformer blocks (found from the architecture table)."""
    from .models import module_name

    first = module_name(model, "block", 0)  # e.g. "transformer.h.0"
    parent_name, attr = first.rsplit(".", 2)[0], first.rsplit(".", 2)[1]
    parent = get_module(model, parent_name)
    return parent, attr, getattr(parent, attr)


class _Skip(nn.Module):
    """Stands in for a block that :func:`resume_at` skips: returns its input stream unchanged (as a bare tensor,
    what blocks return in transformers >= 5; a 1-tuple for older versions, whose models read ``outputs[0]``)."""

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        return x if _BARE_BLOCK_OUTPUT else (x,)


def _transformers_major() -> int:
    try:
        import transformers

        return int(transformers.__version__.split(".")[0])
    except Exception:  # pragma: no cover
        return 5


_BARE_BLOCK_OUTPUT = _transformers_major() >= 5


@contextlib.contextmanager
def resume_at(model: nn.Module, layer: int, hidden: torch.Tensor, force: bool = False) -> Iterator[None]:
    """Within the ``with`` block, a forward pass skips blocks ``< layer`` and feeds ``hidden`` (B, T, d), the
    residual stream entering block ``layer`` recorded earlier for the *same inputs*, into that block.

    Everything an edit at ``layer`` or above cannot change (embeddings, noise, lower blocks) is then reused
    instead of recomputed: the optimisation loops of ROME, MEMIT and fine-tuning call the model many times
    on one batch. The remaining blocks run exactly as in a full pass (same tensors in, same ops), so outputs
    are bitwise equal to it. Record ``hidden`` with ``trace(model, block(layer), retain_input=True)``.
    Hooks on modules (``trace``) keep working; the block list is restored on exit, exceptions included.
    ``force=True`` always resumes (tracing feeds a stream the inputs do not produce: positions >= t only);
    otherwise ``REUSE_BELOW = False`` switches the reuse off for benchmarks.
    """
    if layer == 0 or not (REUSE_BELOW or force):  # nothing below to skip (the embeddings are cheap), or switched off
        yield
        return
    parent, attr, blocks = _block_list(model)
    if type(blocks) is not nn.ModuleList or any(isinstance(b, _Skip) for b in blocks):
        raise RuntimeError(f"resume_at needs the model's full block list (nested resume_at?), got {type(blocks).__name__}")

    def feed(_mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True)
    # The blocks below ``layer`` are swapped for pass-throughs in place, so every block keeps its index (models
    # that pick a block's mask, rotary table or cache layer by its index - Gemma 3 - see the same layout).
    below = [blocks._modules[str(i)] for i in range(layer)]
    for i in range(layer):
        blocks._modules[str(i)] = _Skip()
    try:
        yield
    finally:
        for i, blk in enumerate(below):
            blocks._modules[str(i)] = blk
        handle.remove()



@dataclass
class Replay:
    """What a :func:`reuse_below` pass recorded: ``stream`` is the input of block ``layer`` (None if the pass
    replayed an earlier stream or did not record)."""

    block: str
    trace: Trace

    @property
    def stream(self) -> torch.Tensor | None:
        return self.trace.inputs.get(self.block)


@contextlib.contextmanager
def reuse_below(model: nn.Module, layer: int, below: torch.Tensor | None, record: bool = True) -> Iterator[Replay]:
    """One forward pass of an optimisation loop that either replays ``below`` (the stream entering block
    ``layer`` recorded by an earlier pass on the same inputs; see :func:`resume_at`) or, when ``below`` is None
    and ``record``, records it into the yielded :class:`Replay`. Pass ``record=False`` when the stream changes
    between passes (fresh input noise): then every pass runs from the embeddings up."""
    from .models import module_name

    block = module_name(model, "block", layer)
    with trace(model, block, retain_output=False, retain_input=record and below is None) as tr, \
            resume_at(model, layer, below) if below is not None else contextlib.nullcontext():
        yield Replay(block, tr)
