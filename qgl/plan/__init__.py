"""Memory planner: predict the peak GPU memory of a training step, and its parts, from the config.

    from qgl.plan import plan_memory
    plan = plan_memory("7b", batch_size=1, seq_len=256, checkpointing=True, rank=1024)
    print(plan.table())                  # plan.parts (bytes by part), plan.total
    plan.fit(12 * 2**30)                 # settings (offload, checkpointing, micro-batch) that fit

`qgl plan RECIPE [key=value ...] [--gpu-mem 16GiB]` prints the same. Formulas: `qgl.plan.inventory`
(weights, optimizer state, gradients, update temporaries), `qgl.plan.activations`, `qgl.plan.plan`.
"""

from qgl.plan.plan import CUDA_CONTEXT_BYTES, WORKSPACE_BYTES, Fit, MemoryPlan, plan_memory, predicted_parts
from qgl.plan.settings import PlanError, PlanSettings

__all__ = ["CUDA_CONTEXT_BYTES", "WORKSPACE_BYTES", "Fit", "MemoryPlan", "PlanError", "PlanSettings",
           "plan_memory", "predicted_parts"]
