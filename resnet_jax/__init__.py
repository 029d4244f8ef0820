"""ResNets in JAX/Flax with torchvision's semantics: models, weight conversion, data, training.

Importing the package or any of its modules changes nothing process-wide; the settings that make
XLA:CPU fast are applied by `resnet_jax.cpu.configure()`.
"""
