"""`GradientClipping`: clips gradients once per applied optimizer step.

``Trainer(gradient_clip_val=...)`` adds one of these to the default stack.
"""

from __future__ import annotations

import torch

from hookrt._errors import MisconfigurationError
from hookrt._events import OptimizerPayload
from hookrt._plugin import Plugin, on

__all__ = ["GradientClipping"]

#: Runs after every other ``before_optimizer_step`` handler at the default orders, so
#: the mixed-precision plugin has unscaled the gradients and user hooks saw them unclipped.
CLIPPING_ORDER = 10_000


class GradientClipping(Plugin):
    """Clip the gradients of each optimizer just before it steps.

    Args:
        clip_val: the maximum norm (``"norm"``) or the maximum absolute value (``"value"``).
        algorithm: ``"norm"`` clips the total norm of the optimizer's gradients
            (``torch.nn.utils.clip_grad_norm_``); ``"value"`` clamps each element.
        norm_type: the p of the p-norm for ``"norm"``.
    """

    def __init__(self, clip_val: float, algorithm: str = "norm", norm_type: float = 2.0) -> None:
        if isinstance(clip_val, bool) or not isinstance(clip_val, (int, float)) or clip_val <= 0:
            raise MisconfigurationError(
                f"GradientClipping(clip_val={clip_val!r}) is not valid: clip_val must be a number > 0."
            )
        if algorithm not in ("norm", "value"):
            raise MisconfigurationError(
                f"GradientClipping(algorithm={algorithm!r}) is not valid: use 'norm' or 'value'."
            )
        self.clip_val = float(clip_val)
        self.algorithm = algorithm
        self.norm_type = norm_type
        self.state_key = f"GradientClipping[{algorithm}={self.clip_val}]"
        #: The total gradient norm before the last clip by norm, or None.
        self.last_norm: torch.Tensor | None = None

    @on("before_optimizer_step", order=CLIPPING_ORDER)
    def clip(self, payload: OptimizerPayload) -> None:
        """Clip the gradients of ``payload.optimizer``'s parameters in place."""
        parameters = [p for group in payload.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not parameters:
            return
        if self.algorithm == "norm":
            self.last_norm = torch.nn.utils.clip_grad_norm_(parameters, self.clip_val, norm_type=self.norm_type)
        else:
            torch.nn.utils.clip_grad_value_(parameters, self.clip_val)

    def __repr__(self) -> str:
        return f"GradientClipping(clip_val={self.clip_val}, algorithm={self.algorithm!r})"

