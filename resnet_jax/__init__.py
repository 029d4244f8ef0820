"""ResNets in JAX/Flax with torchvision's semantics: models, weight conversion, data, training."""

from resnet_jax import host_memory, xla_cpu

# Before JAX allocates anything or starts its backend: see host_memory and xla_cpu
# (RESNET_JAX_RETAIN_HOST_MEMORY=0 and RESNET_JAX_EIGEN_CONVS=0 opt out).
if host_memory.wanted():
    host_memory.retain_freed_memory()
if xla_cpu.wanted():
    xla_cpu.use_eigen_convolutions()
