"""DDPStrategy's own arguments under DiLoCo: accepted as DDP takes them, and said plainly where they do nothing.

``DiLoCoStrategy`` takes ``DDPStrategy``'s positional arguments in their order and DDP's keywords
(``find_unused_parameters``, ``static_graph``, ..., any ``DistributedDataParallel`` keyword), so code and configs
written for DDP work unchanged. They configure the ``DistributedDataParallel`` inside a worker of several processes; a
worker of one process has none, and the strategy says so. What cannot mean what it says under DiLoCo (DDP's
post-local SGD, a number where the accelerator goes) is refused with what to do instead.
"""

import inspect
from typing import Any, Callable, Optional

from torch.nn.parallel import DistributedDataParallel

# DistributedDataParallel arguments that the strategy sets itself
_SET_BY_STRATEGY = {"self", "module", "device_ids", "process_group", "device_mesh"}
_DEFAULTS = {"find_unused_parameters": False, "static_graph": False, "gradient_as_bucket_view": False,
             "broadcast_buffers": True}


def ddp_keywords(**keywords: Any) -> dict[str, Any]:
    """The keyword arguments of the worker's ``DistributedDataParallel``, as ``DDPStrategy`` keeps them: those given
    (``None`` stands for DDP's default); an unknown one is refused with the list of what is accepted."""
    accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters) - _SET_BY_STRATEGY
    unknown = sorted(set(keywords) - accepted)
    if unknown:
        raise TypeError(
            f"DiLoCoStrategy got unexpected keyword argument(s) {', '.join(f'`{k}`' for k in unknown)}. Besides its own"
            f" options it takes DDPStrategy's and those of `DistributedDataParallel`: {', '.join(sorted(accepted))}."
        )
    return {name: value for name, value in keywords.items() if value is not None}


_ONE_PROCESS = (
    "Each worker here is one process, with no DistributedDataParallel and no gradient communication between outer"
    " steps, so they have no effect."
)
SHARDED = "Each worker here is sharded with FSDP2 instead of DistributedDataParallel, so they have no effect."


def unused_ddp_arguments(keywords: dict[str, Any], comm_hook: Optional[Callable], why: str = _ONE_PROCESS) -> str:
    """What a run without DistributedDataParallel inside its workers is told about DDP arguments it was given (``""``
    if none); ``why`` says why they do nothing (workers of one process by default, or :data:`SHARDED`)."""
    given = ["ddp_comm_hook"] * (comm_hook is not None) + sorted(
        k for k, v in keywords.items() if k != "process_group" and _DEFAULTS.get(k, object()) != v
    )
    if not given:
        return ""
    return (
        f"DiLoCoStrategy: {', '.join(given)} configure the DistributedDataParallel inside a worker of several"
        f" processes. {why}"
    )


def check_ddp_arguments(
    accelerator: Optional[object], model_averaging_period: Optional[int], ddp_comm_state: Optional[object]
) -> None:
    """Refuse DDP arguments that cannot mean what they say under DiLoCo, saying what to do."""
    if isinstance(accelerator, (bool, int, float, str)):
        raise TypeError(
            f"DiLoCoStrategy's first positional argument is DDPStrategy's `accelerator`, got {accelerator!r}. Pass"
            f" DiLoCo's options by keyword, e.g. `DiLoCoStrategy(inner_steps={accelerator!r})`, and the accelerator as"
            " `Trainer(accelerator=...)`."
        )
    if model_averaging_period is not None or _is_post_local_sgd(ddp_comm_state):
        raise ValueError(
            "`model_averaging_period` and a post-local SGD `ddp_comm_state` configure DDP's post-local SGD, another"
            " periodic averaging of the workers' weights. DiLoCo is the periodic averaging here: remove them and set"
            " the period with `inner_steps`."
        )


def _is_post_local_sgd(state: Optional[object]) -> bool:
    if state is None:
        return False
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState

    return isinstance(state, PostLocalSGDState)
