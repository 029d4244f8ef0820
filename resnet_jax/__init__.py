"""ResNets in JAX/Flax with torchvision's semantics: models, weight conversion, data, training."""

import warnings

from resnet_jax import backend, cpu_fusion, host_memory, xla_cpu

# Before JAX allocates anything or starts its backend: see host_memory, xla_cpu and cpu_fusion
# (RESNET_JAX_RETAIN_HOST_MEMORY=0, RESNET_JAX_EIGEN_CONVS=0 and RESNET_JAX_MULTI_OUTPUT_FUSION=0
# opt out).
_applied = []
if host_memory.wanted() and host_memory.retain_freed_memory():
    _applied.append(host_memory)
if xla_cpu.wanted() and xla_cpu.use_eigen_convolutions():
    _applied.append(xla_cpu)
if cpu_fusion.wanted():
    cpu_fusion.use_multi_output_fusion()
    _applied.append(cpu_fusion)
if _applied and backend.jax_started():
    warnings.warn(
        "resnet_jax was imported after JAX started its backends: its CPU settings ("
        + ", ".join(m.__name__ for m in _applied)
        + ") come too late to take full effect in this process. Import resnet_jax before the "
        "first JAX computation, or opt out with " + " ".join(f"{m.ENV_VAR}=0" for m in _applied),
        RuntimeWarning,
        stacklevel=2,
    )
del _applied
