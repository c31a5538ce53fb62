"""The core: tiers, wrapping a model in place, the one tier executor, the tiered model, its
artifacts, outputs, registries, answer formats, data splits, the training loop and the model's
secret key.

Nothing here imports calibration, tasks' pictures, security attacks, serving or the zoo.
"""
