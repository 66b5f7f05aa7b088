"""The job config, pure Python (no torch, no Ray): one schema for the CLI, the jobs and the
tests.  The sections (:mod:`.schema`), how a section is read (:mod:`.sections`), the ``hpo:``,
``race:`` and ``tracking:`` sections (:mod:`.hpo`, :mod:`.race`, :mod:`.tracking`), the whole job
(:mod:`.job`), the dataset registry (:mod:`.datasets`) and what the one validation pass worked out (:mod:`.resolved`).

Above ``space``; imports nothing else of the package but the ground.  Public names re-exported.
"""

from noah_ray.config.hpo import (
                                 HPO_DEFAULT_RANGES,
                                 HPO_DEFAULT_SPACE,
                                 HPO_METHOD_RANGES,
                                 HPO_METRICS,
                                 HPO_SCHEDULERS,
                                 HPO_SEARCHERS,
                                 HpoConfig,
                                 HpoParam,
                                 hpo_default,
)
from noah_ray.config.job import STAGES, JobConfig
from noah_ray.config.race import RaceConfig, race_budget
from noah_ray.config.schema import (
                                 HPO_ALIASES,
                                 HPO_RETRAIN_KEYS,
                                 PRUNABLE,
                                 PRUNE_SCORES,
                                 SAMPLING_RULES,
                                 SEARCH_ALGORITHMS,
                                 SEARCH_ENGINES,
                                 TRAIN_SECTIONS,
                                 DataConfig,
                                 ModelConfig,
                                 PruneConfig,
                                 RetrainConfig,
                                 SearchConfig,
                                 SupernetConfig,
                                 TrainConfig,
                                 hpo_is_int,
                                 hpo_module,
                                 hpo_path,
)
from noah_ray.config.tracking import MlflowConfig, TrackingConfig

__all__ = ["HPO_ALIASES", "HPO_DEFAULT_RANGES", "HPO_DEFAULT_SPACE", "HPO_METHOD_RANGES", "HPO_METRICS",
           "HPO_RETRAIN_KEYS", "HPO_SCHEDULERS", "HPO_SEARCHERS", "PRUNABLE", "PRUNE_SCORES", "SAMPLING_RULES",
           "SEARCH_ALGORITHMS", "SEARCH_ENGINES", "STAGES", "TRAIN_SECTIONS", "DataConfig", "HpoConfig", "HpoParam",
           "JobConfig", "MlflowConfig", "ModelConfig", "PruneConfig", "RaceConfig", "RetrainConfig", "SearchConfig",
           "SupernetConfig", "TrackingConfig", "TrainConfig", "hpo_default", "hpo_is_int", "hpo_module", "hpo_path",
           "race_budget"]
