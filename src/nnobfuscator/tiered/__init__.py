"""The tiered model: ``TieredModel`` and ``obfuscate`` wire strategies into a user's model, the
one tier executor runs a batch of mixed tiers, ``cost`` measures a tier's FLOPs."""
