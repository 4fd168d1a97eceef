"""Few-step DMD sampling for one causal block (docs/MODEL.md, "DMD sampling per block" and "Timesteps").

The distilled student was trained on a handful of fixed points of a shifted 1000-step flow-matching
schedule. For a schedule index ``idx`` (``T = num_train_timesteps``)::

    sigma  = 1 - idx / T
    sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    t      = T * sigma'

Each step turns the model's flow prediction ``v`` into a clean estimate ``x0 = x_t - sigma'_t * v``
and, unless it is the last step, re-noises it to the next level with fresh noise drawn from the
session's generator: ``x = (1 - sigma'_next) * x0 + sigma'_next * eps``. The last ``x0`` is the block.

``timestep_format`` says which number the model is given (docs/MODEL.md, "Timesteps"): ``"float"``
is ``t`` above, as the reference server feeds it; ``"int"`` is the authors' offline script, whose
grid is ``sigma = (1 - 1/T)(1 - idx / T)`` and whose model input is ``floor(T * sigma')`` as an
integer (``sigma'`` itself stays a float). Which one the distillation used is not public.

The defaults (indices [0, 179, 358, 679], shift 10) and why: docs/MODEL.md, "Timesteps".

Step counts (docs/PROTOCOL.md, ``num_inference_steps``): ``num_inference_steps ==
len(timestep_indices)`` uses the indices as given. Any other count uses evenly spaced indices over
the same range, ``round(linspace(first, last, n))``; one step keeps only the first index. The
student was distilled for its own points, so other counts are an approximation; the rule is
deterministic and keeps the schedule's end points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import TIMESTEP_FORMATS, V1_SHIFT, V1_TIMESTEP_INDICES

logger = logging.getLogger(__name__)

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000

# flow_fn(x_t [B,C,F,h,w] fp32, t: float) -> flow prediction with the same shape
FlowFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class DMDSchedule:
    """Host-side schedule of one block: the model's timesteps ``t`` and the noise levels ``sigma``
    (``t / T`` with the float format; see the module docstring for the int one)."""

    indices: tuple[int, ...]
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]


class DMDSampler:
    """Runs the DMD few-step loop of one block. Holds only schedule parameters; no session state."""

    def __init__(
        self,
        timestep_indices: tuple[int, ...] | list[int] = V1_TIMESTEP_INDICES,
        shift: float = V1_SHIFT,
        num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
        timestep_format: str = TIMESTEP_FORMATS[0],
    ):
        indices = tuple(int(i) for i in timestep_indices)
        if timestep_format not in TIMESTEP_FORMATS:
            raise ValueError(f"timestep_format={timestep_format!r}: must be one of {TIMESTEP_FORMATS}")
        if int(num_train_timesteps) <= 0:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r}: must be positive")
        if not indices:
            raise ValueError(f"timestep_indices={timestep_indices!r}: must not be empty")
        if any(i < 0 or i >= num_train_timesteps for i in indices):
            raise ValueError(
                f"timestep_indices={timestep_indices!r}: each must lie in [0, {num_train_timesteps})"
            )
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"timestep_indices={timestep_indices!r}: must be strictly increasing")
        if not float(shift) > 0.0:
            raise ValueError(f"shift={shift!r}: must be positive")
        self.timestep_indices = indices
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_format = timestep_format

    def __repr__(self) -> str:
        return (
            f"DMDSampler(timestep_indices={self.timestep_indices}, shift={self.shift}, "
            f"num_train_timesteps={self.num_train_timesteps}, timestep_format={self.timestep_format!r})"
        )

    def indices_for(self, num_inference_steps: int | None = None) -> tuple[int, ...]:
        """The schedule indices used for ``num_inference_steps`` (see the module docstring)."""
        if num_inference_steps is None or num_inference_steps == len(self.timestep_indices):
            return self.timestep_indices
        n = int(num_inference_steps)
        if n != num_inference_steps or n < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an integer >= 1")
        first, last = self.timestep_indices[0], self.timestep_indices[-1]
        if n == 1:
            return (first,)
        if n > last - first + 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r}: at most {last - first + 1} distinct "
                f"steps fit between schedule indices {first} and {last}"
            )
        return tuple(round(first + (last - first) * k / (n - 1)) for k in range(n))

    def schedule(self, num_inference_steps: int | None = None) -> DMDSchedule:
        indices = self.indices_for(num_inference_steps)
        total = self.num_train_timesteps
        integer = self.timestep_format == "int"
        top = 1.0 - 1.0 / total if integer else 1.0
        sigmas = []
        for idx in indices:
            sigma = top * (1.0 - idx / total)
            sigmas.append(self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma))
        timesteps = (float(math.floor(total * s)) if integer else total * s for s in sigmas)
        return DMDSchedule(indices=indices, timesteps=tuple(timesteps), sigmas=tuple(sigmas))

    def sample(
        self,
        flow_fn: FlowFn,
        noise: torch.Tensor,
        *,
        generator: torch.Generator,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Denoise one block from pure noise ``noise`` (fp32) and return its clean latents ``x0``.

        ``flow_fn(x_t, t)`` runs the model (with guidance, if any) at timestep ``t``. Re-noising draws
        from ``generator`` so that a session's whole stream is a function of its seed.
        """
        plan = self.schedule(num_inference_steps)
        x = noise.float()
        x0 = x
        for step, (t, sigma) in enumerate(zip(plan.timesteps, plan.sigmas)):
            # Step 1: the model's flow prediction at this noise level
            flow = flow_fn(x, t).float()
            # Step 2: clean estimate from the flow (x_t = (1 - s) x0 + s eps, v = eps - x0)
            x0 = x - sigma * flow
            if step == len(plan.sigmas) - 1:
                break
            # Step 3: re-noise to the next level with fresh session noise
            sigma_next = plan.sigmas[step + 1]
            eps = randn_like_session(x0, generator)
            x = (1.0 - sigma_next) * x0 + sigma_next * eps
        return x0


def randn_like_session(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (fp32).

    Drawing on the generator's device and then moving keeps a seed's stream identical whichever
    device the model runs on when the generator lives on the CPU.
    """
    eps = torch.randn(like.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return eps.to(like.device)
