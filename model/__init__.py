"""vdit_kernels.model: the thin video DiT on the package's fused ops (installed from model/)."""
from .dit import (PRESETS, DiTConfig, VideoDiT, family_backends, model_ops, timestep_embedding,
                  wan_rope_dims, why_not)

__all__ = ["DiTConfig", "PRESETS", "VideoDiT", "family_backends", "model_ops", "timestep_embedding",
           "wan_rope_dims", "why_not"]
