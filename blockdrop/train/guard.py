"""Stop training at the first non-finite number: a NaN or infinite loss, gradient norm or weight.

A diverged run must not go on to save a checkpoint, write metrics or register a model built from NaNs.
The training loops call :func:`check_step` after each backward pass (before the optimiser applies the
gradients) and :func:`check_weights` at the end of each epoch (before the resume state is saved); both
raise :class:`NonFiniteError`, which ``blockdrop.stage.failures_reported`` turns into one line and exit 1.

Cost: one fused norm over the gradients (``torch.nn.utils.get_total_norm``, which reads them and changes
nothing, so training stays bit-identical) and one host sync per step for both numbers together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NonFiniteError", "check_step", "check_weights"]


class NonFiniteError(ArithmeticError):
    """Training produced NaN or inf; the message names what, where (epoch and step, 1-based) and its value."""


def check_step(loss: torch.Tensor, parameters: Iterable[torch.Tensor], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteError` if ``loss`` or the total norm of the gradients of ``parameters`` is not
    finite. Call it after ``backward()`` and before ``optimizer.step()``; ``epoch`` and ``step`` are 1-based."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
    # One host round trip for both numbers: stacking keeps the check at a single sync per step.
    values = torch.stack([loss.detach().float().reshape(()), norm.float().to(loss.device)])
    if bool(torch.isfinite(values).all()):
        return
    loss_value, norm_value = values.tolist()
    what, value = ("loss", loss_value) if not torch.isfinite(values[0]) else ("gradient norm", norm_value)
    raise NonFiniteError(f"non-finite {what} ({value}) at epoch {epoch} step {step}")


def check_weights(modules: dict[str, torch.nn.Module], epoch: int) -> None:
    """Raise :class:`NonFiniteError` naming the first module and tensor (weights or BatchNorm statistics)
    holding a NaN or inf after ``epoch`` (1-based)."""
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"non-finite weights in {name} ({key}) after epoch {epoch}")
