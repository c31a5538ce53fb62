"""Extraction: what a tier's user gets out of its answers with a few labels (``extract``), by
decoding them (``decode``), distilling a knock-off (``distill``) or voting over repeated and
changed queries (``augment``), all through the tier as an oracle (``oracle``)."""
