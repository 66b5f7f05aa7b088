"""What the one validation pass of a command worked out: :class:`ResolvedJob` (made by
:func:`noah_ray.run.preflight.resolve`, taken by every stage), and the job's parameter budget
(:func:`param_limit`)."""

from __future__ import annotations

import dataclasses

from noah_ray.config.job import JobConfig
from noah_ray.space import VPT, BackboneShape, ParamLimit


@dataclasses.dataclass(frozen=True)
class ResolvedJob:
    """A job checked for ``stages``, with what the checks worked out (see :func:`resolve`)."""

    job: JobConfig
    stages: tuple[str, ...]
    num_classes: int
    shape: BackboneShape                  # of the backbone with a 1-class head
    limit: ParamLimit | None              # the search's parameter limit (when the search runs)
    backbone: str                         # backbone checkpoint URI (models.backbone_uri)
    splits: dict[str, tuple[str, ...]]    # stage -> the splits it reads
    lease: str | None = None              # the token of the job's lease the command holds (the writes' fence)

    def with_job(self, job: JobConfig) -> ResolvedJob:
        """The same checks for a variant of the job (e.g. hpo's final runs: other values)."""
        return dataclasses.replace(self, job=job)


def param_limit(job: JobConfig, shape: BackboneShape) -> ParamLimit:
    """The job's limit; raises :class:`ConfigError` if no subnet of the space fits it."""
    recipe = job.model.resolved_recipe()
    vpt = job.space.modules.get(VPT)
    limit = ParamLimit(job.search.param_limit, shape, job.search.param_min,
                       recipe.kv_shared, recipe.param_count, vpt.max_width if vpt else 0)
    limit.check(job.space)
    return limit


def resolved(job: ResolvedJob | JobConfig, stage: str) -> ResolvedJob:
    """``job`` when it is a :class:`ResolvedJob`; a plain :class:`JobConfig` is refused, naming the
    call that checks it (the stages never check a job a second time)."""
    if not isinstance(job, ResolvedJob):
        raise TypeError(f"the {stage} stage takes a ResolvedJob; check the job first with "
                        f"noah_ray.run.preflight.resolve(job, ({stage!r},))")
    return job
