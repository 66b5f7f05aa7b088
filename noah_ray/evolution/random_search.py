"""Random search over feasible, unseen subnets (the baseline)."""

from __future__ import annotations

from noah_ray.evolution.engine import SearchEngine


class RandomEngine(SearchEngine):
    """Random search over feasible, unseen configs (the baseline)."""

    algorithm = "random"
