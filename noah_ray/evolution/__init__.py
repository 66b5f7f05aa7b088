"""Search engines over :class:`~noah_ray.space.SubnetConfig` (pure Python: no Ray, no torch).

An engine hands out candidates (``ask``) and takes their scores back (``tell``); it never
proposes a config twice and never proposes one outside the parameter limit.  Ray Tune
searchers in :mod:`noah_ray.search.searcher` wrap these engines; tests and benchmarks drive them
directly.

* :class:`EvolutionEngine` - NOAH's evolution: generation 0 is random; each later generation
  takes the top-k of everything scored so far as parents, makes ``mutations`` mutants and
  ``crossovers`` children and fills up to ``population`` with random configs.  A generation
  is evaluated completely before the next is proposed (a barrier, as in the paper).
* :class:`RandomEngine` - feasible unseen random configs, no barrier.
* :class:`AgingEvolutionEngine` - asynchronous steady-state evolution with aging (regularized
  evolution, Real et al. 2019): no barrier, every free worker at once gets a child of the
  living population (the ``population`` most recently scored candidates; the oldest leaves).
* :class:`NSGA2Engine` - Optuna's NSGA-II on (maximise score, minimise parameters) with the
  parameter limit as a constraint; infeasible proposals are answered from the parameter count
  alone and never evaluated.

Every engine counts ``generations`` x ``population`` candidates (failed ones included) and
groups them into generations for bookkeeping.  ``get_state`` / ``set_state`` round-trip
through JSON, so an interrupted search resumes exactly where it stopped; ``take_delta`` gives
what changed since its last call (constant size per result) and :func:`apply_deltas` replays
such deltas onto a saved state (incremental persistence, :mod:`noah_ray.store.statelog`).

One module per concept: :mod:`.candidate` (``Candidate``, ``ParamLimit``, ``pareto_front``),
:mod:`.engine` (``SearchEngine``, ``apply_deltas``), :mod:`.generational`, :mod:`.aging`,
:mod:`.nsga2`, :mod:`.random_search`, :mod:`.objective`; the registry :data:`ENGINES` is here.
"""

from noah_ray.config.entries import load_entry
from noah_ray.config.schema import SEARCH_ENGINES
from noah_ray.evolution.aging import AgingEvolutionEngine
from noah_ray.evolution.candidate import (
                                          ATTEMPT_KEYS,
                                          DONE,
                                          FAILED,
                                          QUEUED,
                                          RUNNING,
                                          Candidate,
                                          GenerationRecord,
                                          pareto_front,
)
from noah_ray.evolution.engine import STATE_VERSION, SearchEngine, apply_deltas
from noah_ray.evolution.generational import EvolutionEngine
from noah_ray.evolution.nsga2 import NSGA2Engine
from noah_ray.evolution.objective import TargetObjective
from noah_ray.evolution.random_search import RandomEngine
from noah_ray.space.budget import ParamLimit


def engine_for(algorithm: str) -> type[SearchEngine]:
    """The engine class of ``search.algorithm`` (``engine_for(name).from_config(search, space, limit)``),
    the one :data:`noah_ray.config.schema.SEARCH_ENGINES` names."""
    cls = load_entry(SEARCH_ENGINES[algorithm])
    if not (isinstance(cls, type) and issubclass(cls, SearchEngine)):
        raise TypeError(f"search algorithm {algorithm!r}: {SEARCH_ENGINES[algorithm]} is not a SearchEngine")
    return cls


#: the engines by ``search.algorithm``, in the order of :data:`~noah_ray.config.schema.SEARCH_ENGINES`
ENGINES: dict[str, type[SearchEngine]] = {name: engine_for(name) for name in SEARCH_ENGINES}

__all__ = ["ATTEMPT_KEYS", "DONE", "ENGINES", "FAILED", "QUEUED", "RUNNING", "STATE_VERSION",
           "AgingEvolutionEngine", "Candidate", "EvolutionEngine", "GenerationRecord", "NSGA2Engine", "ParamLimit",
           "RandomEngine", "SearchEngine", "TargetObjective", "apply_deltas", "engine_for", "pareto_front"]
