"""Security: attacks on served tiers (``attacks``, ``attack_cli``), sealed bundles and attacks on
their weights (``sealing``, ``weight_attacks``, ``seal_cli``). What a tier's user extracts with a
few labels lives below, in ``nnobfuscator.extraction``."""
