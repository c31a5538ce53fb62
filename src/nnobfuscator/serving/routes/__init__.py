"""The HTTP routes, one router per concern: ``service`` (pages, health, metrics), ``tiers``
(tiers and the calling key), ``owner`` (policy and statistics, owner keys) and ``inference``
(classify, segment, generate, compare)."""
