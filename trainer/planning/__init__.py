"""Memory and compute planner: will a fine-tuning job fit on its GPUs, and how long will it take.

Read in this order: shape (a model's shape from its config), inputs (one micro-step to estimate),
parameters and activations (the bytes of each), memory (the peak), compute (FLOPs and time),
request (a JobSpec as the trainer runs it), plan (the search over methods, speeds and batches)
and suggest (what would make a job fit).
"""

from trainer.planning.activations import layer_activation_bytes_per_token, logits_bytes
from trainer.planning.compute import ComputeEstimate, estimate_compute
from trainer.planning.inputs import LoraLayers, MemoryInputs
from trainer.planning.memory import MemoryEstimate, estimate, estimate_memory
from trainer.planning.parameters import freeze_trainable_params, ia3_params, prefix_params
from trainer.planning.plan import (AUTO_FAST_MIN_BATCH, AUTO_METHODS, MethodPlan, Plan, choose_method,
                                   min_gpu_memory_bytes, plan)
from trainer.planning.request import PlanRequest, estimate_for_spec, fewest_checkpoint_layers, request_of
from trainer.planning.shape import GiB, Shape, local_config, model_shape

__all__ = [
    "AUTO_FAST_MIN_BATCH", "AUTO_METHODS", "ComputeEstimate", "GiB", "LoraLayers", "MemoryEstimate", "MemoryInputs",
    "MethodPlan", "Plan", "PlanRequest", "Shape", "choose_method", "estimate", "estimate_compute",
    "estimate_for_spec", "estimate_memory", "fewest_checkpoint_layers", "freeze_trainable_params", "ia3_params",
    "layer_activation_bytes_per_token", "local_config", "logits_bytes", "min_gpu_memory_bytes", "model_shape", "plan",
    "prefix_params", "request_of",
]
