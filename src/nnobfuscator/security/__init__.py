"""Security: what a tier's user can extract (`extract`, `decode`, `distill`), attacks on served
tiers (`attacks`, `augment`, `oracle`, `attack_cli`), sealed bundles and attacks on their weights
(`sealing`, `weight_attacks`, `seal_cli`)."""
