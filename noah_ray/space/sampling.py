"""The supernet's per-step sampling rules (``supernet.sampling``), pure Python: one entry per rule,
the subnets a training step trains given the search space and that step's random subnet.

:class:`noah_ray.config.SupernetConfig` accepts exactly the names here and the Ray Train workers
(:func:`noah_ray.train.worker.step_subnets`) apply them, so a new rule is one entry in :data:`SAMPLING`.
"""

from __future__ import annotations

from collections.abc import Callable

from noah_ray.space.subnet import SearchSpace, SubnetConfig

#: ``(space, the step's random subnet) -> the subnets the step trains`` (their gradients are averaged)
SamplingRule = Callable[[SearchSpace, SubnetConfig], list[SubnetConfig]]


def uniform(space: SearchSpace, rnd: SubnetConfig) -> list[SubnetConfig]:
    """NOAH: the one random subnet."""
    return [rnd]


def sandwich(space: SearchSpace, rnd: SubnetConfig) -> list[SubnetConfig]:
    """BigNAS / AttentiveNAS: the largest, the smallest and one random subnet."""
    return [space.largest(), space.smallest(), rnd]


#: per sampling rule (``supernet.sampling``): the subnets one step trains, given its random one
SAMPLING: dict[str, SamplingRule] = {"uniform": uniform, "sandwich": sandwich}
