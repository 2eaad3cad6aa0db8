"""TALoRA: LoRA factors for Dense/Conv kernels, K banks per quantized layer and the shared timestep router.

The update plugs into the quantization interceptor through its `kernel_update(path, kernel)` hook.
"""
from msfp_jax.lora.factors import init_lora_bank, lora_delta, mixed_lora_delta
from msfp_jax.lora.router import (
    RouterConfig,
    TimestepRouter,
    allocation,
    balance_loss,
    init_router,
    route,
    sinusoidal_embedding,
    straight_through_one_hot,
)
from msfp_jax.lora.talora import (
    LoRAAttachError,
    TALoRAConfig,
    check_banks_match,
    flat_banks,
    init_talora,
    make_kernel_update,
    route_batch,
    select_layers,
)

__all__ = [
    "LoRAAttachError", "RouterConfig", "TALoRAConfig", "TimestepRouter", "allocation", "balance_loss",
    "check_banks_match", "flat_banks", "init_lora_bank", "init_router", "init_talora", "lora_delta",
    "make_kernel_update", "mixed_lora_delta", "route", "route_batch", "select_layers", "sinusoidal_embedding",
    "straight_through_one_hot",
]
