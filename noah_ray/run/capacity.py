"""Can the cluster ever run this job?  One bundle of every stage checked against the node types.

A Ray Train worker, a search trial or an HPO trial asks for one bundle of resources (e.g.
``{CPU: 1, GPU: 1}``).  If no node the cluster has - or, on an autoscaling cluster, no node type
its autoscaler may start - can hold that bundle, Ray leaves the request pending for ever (an
"infeasible" warning in its logs).  :func:`check` refuses such a job before any stage starts, in one
line naming the stage, the resource and the largest node type.

Where the node types come from (:func:`node_types`):

* the autoscaler's cluster config: ``$NOAH_RAY_CLUSTER_CONFIG``, else ``~/ray_bootstrap_config.yaml``
  (the file ``ray up`` writes on the head node from ``cluster/aws.yaml``): every
  ``available_node_types`` entry with its ``resources`` (``GPU`` counts like any other resource);
* else, on a local Ray this process started (a laptop, where nothing can autoscale), the live node
  (``ray.nodes()``).  An attached cluster without a config (``--address``, ``$RAY_ADDRESS``,
  KubeRay: its autoscaler may still add the node) is not checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError

#: the environment variable naming a cluster config; else the head node's bootstrap config
CONFIG_ENV = "NOAH_RAY_CLUSTER_CONFIG"
BOOTSTRAP = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class Bundle:
    """What one unit of a stage's work asks Ray for, and the option that sets it."""

    stage: str
    what: str
    resources: Mapping[str, float]
    option: str


@dataclass(frozen=True)
class NodeTypes:
    """Node type name -> its resources; ``source`` says where they were read (for the message)."""

    types: Mapping[str, Mapping[str, float]]
    source: str

    def fits(self, bundle: Bundle) -> bool:
        return any(all(node.get(k, 0.0) >= v for k, v in bundle.resources.items() if v > 0)
                   for node in self.types.values())

    def largest(self, resource: str) -> tuple[str, Mapping[str, float]]:
        name = max(self.types, key=lambda n: (self.types[n].get(resource, 0.0), self.types[n].get("CPU", 0.0)))
        return name, self.types[name]


def bundles(job: JobConfig, stages: tuple[str, ...]) -> list[Bundle]:
    """The one bundle each requested stage asks for."""
    out = []
    for stage, tc in (("supernet", job.supernet), ("retrain", job.retrain)):
        if stage in stages:
            res = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {})}
            out.append(Bundle(stage, "a Ray Train worker", res, f"{stage}.cpus_per_worker / {stage}.use_gpu"))
    if "search" in stages:
        s = job.search
        out.append(Bundle("search", "a search trial", {"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial},
                          "search.cpus_per_trial / search.gpus_per_trial"))
    if "race" in stages and job.race.enabled:
        r = job.race
        out.append(Bundle("race", "a race trial", {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial},
                          "race.cpus_per_trial / race.gpus_per_trial"))
    if "hpo" in stages and job.hpo is not None:
        h = job.hpo
        out.append(Bundle("hpo", "an HPO trial", {"CPU": h.cpus_per_trial, "GPU": h.gpus_per_trial},
                          "hpo.cpus_per_trial / hpo.gpus_per_trial"))
    return out


def check(job: JobConfig, stages: tuple[str, ...], nodes: NodeTypes | None) -> None:
    """Raise :class:`ConfigError` (one line) for the first bundle no node type can hold."""
    if nodes is None or not nodes.types:
        return
    for b in bundles(job, stages):
        if nodes.fits(b):
            continue
        short = max(b.resources, key=lambda k: b.resources[k] - max(n.get(k, 0.0) for n in nodes.types.values()))
        name, node = nodes.largest(short)
        raise ConfigError(
            f"{b.stage}: {b.what} needs {_fmt(b.resources)} but no node in {nodes.source} can hold it "
            f"(largest {short}: {name} {_fmt(node)}); lower {b.option} or add a node type that has it")


def _fmt(res: Mapping[str, float]) -> str:
    skip = ("memory", "object_store_memory")
    keep = {k: v for k, v in res.items() if v and not k.startswith("node:") and k not in skip}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


def from_cluster_yaml(path: str | Path) -> NodeTypes:
    """The node types of a Ray cluster config (``available_node_types``)."""
    from noah_ray.config.sections import load_yaml

    p = Path(path).expanduser()
    try:
        data = load_yaml(p.read_text(), str(p)) or {}
    except OSError as e:
        raise ConfigError(f"cluster config {str(p)!r} cannot be read ({e.strerror}); fix ${CONFIG_ENV}") from None
    types = data.get("available_node_types") if isinstance(data, Mapping) else None
    if not isinstance(types, Mapping) or not types:
        raise ConfigError(f"cluster config {str(p)!r} has no available_node_types; is it a Ray cluster YAML?")
    out = {}
    for name, t in types.items():
        res = (t or {}).get("resources") or {}
        if not isinstance(res, Mapping):
            raise ConfigError(f"{p}: available_node_types.{name}.resources must be a mapping, e.g. {{CPU: 8, GPU: 1}}")
        out[str(name)] = {str(k): float(v) for k, v in res.items()}
    return NodeTypes(out, str(p))


def from_live_cluster() -> NodeTypes:
    """The nodes of the Ray this process is connected to (alive ones)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return NodeTypes({f"{n.get('NodeManagerAddress', '?')}#{i}": dict(n.get("Resources") or {})
                      for i, n in enumerate(nodes)}, "the running Ray cluster")


def configured() -> NodeTypes | None:
    """The autoscaler's node types when a cluster config is known, else None."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return from_cluster_yaml(env)
    boot = Path(BOOTSTRAP).expanduser()
    return from_cluster_yaml(boot) if boot.is_file() else None


def node_types() -> NodeTypes | None:
    """:func:`configured` node types, else a local Ray's one node, else None (nothing to check)."""
    nodes = configured()
    if nodes is not None:
        return nodes
    import ray

    if not ray.is_initialized() or not _started_here():
        return None
    live = from_live_cluster()
    return live if len(live.types) == 1 else None


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` on a laptop), as
    opposed to attaching to a running cluster (``--address``, ``$RAY_ADDRESS``, ``ray job
    submit``), whose autoscaler may add nodes that are not there yet."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False)) and not os.environ.get("RAY_ADDRESS")
