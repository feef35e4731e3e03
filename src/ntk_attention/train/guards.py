"""Numerical guards: stop a run at the first NaN or infinity, naming where it appeared.

    with NonFiniteGuard(model) as guard:      # forward hooks on every submodule
        loss = model(**batch).loss            # raises in the first layer whose output is not finite
        loss.backward()
        guard.check_gradients(step)           # a trainable parameter's gradient
        optimizer.step()
        guard.check_parameters(step)          # a trainable parameter after the update

Forward hooks fire in execution order, so the layer named is the one that produced the first
non-finite value, not one that merely passed it on. The checks synchronise with the device and
cost a reduction per module output, which is why they are opt-in (``--detect-nonfinite``).
A guard made with ``enabled=False`` installs nothing and its checks do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Self

import torch
from torch import nn

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(ArithmeticError):
    """A NaN or infinity in an activation, a gradient or a parameter (the message names it)."""


def _tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The floating-point tensors in a module's output, with where they sit in it."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield "", value
    elif isinstance(value, dict):  # ModelOutput is a dict as well
        for key, item in value.items():
            for where, tensor in _tensors(item):
                yield f"[{key!r}]{where}", tensor
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            for where, tensor in _tensors(item):
                yield f"[{index}]{where}", tensor


def _describe(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} infinite of {tensor.numel()} values, shape {tuple(tensor.shape)}"


class NonFiniteGuard:
    """Context manager checking ``model``'s activations (and, on request, its trainable
    parameters and their gradients) for NaN/inf; see the module docstring."""

    def __init__(self, model: nn.Module, *, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self.step: int | None = None
        self._handles: list[Any] = []

    def _at(self) -> str:
        return "" if self.step is None else f" at step {self.step}"

    def _hook(self, name: str):
        def check(module: nn.Module, inputs: Any, output: Any) -> None:
            for where, tensor in _tensors(output):
                if not torch.isfinite(tensor).all():
                    raise NonFiniteError(
                        f"non-finite activation in layer {name!r} ({type(module).__name__}) "
                        f"output{where}{self._at()}: {_describe(tensor)}"
                    )

        return check

    def __enter__(self) -> Self:
        if self.enabled:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_hook(self._hook(name or "<model>")))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_gradients(self, step: int | None = None) -> None:
        self._check("gradient of", step, lambda p: p.grad)

    def check_parameters(self, step: int | None = None) -> None:
        self._check("parameter", step, lambda p: p)

    def _check(self, what: str, step: int | None, get) -> None:
        if not self.enabled:
            return
        self.step = step if step is not None else self.step
        for name, param in self.model.named_parameters():
            tensor = get(param) if param.requires_grad else None
            if tensor is not None and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"non-finite {what} {name!r}{self._at()}: {_describe(tensor)}")
