"""ResNets in JAX/Flax with torchvision's semantics: models, weight conversion, data, training."""

from resnet_jax import host_memory

# Before JAX allocates anything: see host_memory (RESNET_JAX_RETAIN_HOST_MEMORY=0 opts out).
if host_memory.wanted():
    host_memory.retain_freed_memory()
