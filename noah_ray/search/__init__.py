"""Subnet search on Ray Tune: the stage's driver (:mod:`.driver`), the Tune searcher around an
:mod:`noah_ray.evolution` engine (:mod:`.searcher`), the search's tables and state
(:mod:`.store`) and the trainable that scores one candidate (:mod:`.trainable`).

Above ``nn``, beside ``interop`` (the two never import each other).
"""
