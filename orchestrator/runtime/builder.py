"""The one module that applies Ray decorators and options to pdserve's plain classes.

Workers (``workers.service.host.WorkerHost``) and the controller
(``orchestrator.runtime.controller.Controller``) are plain classes; here they
become actors with their resources (CPUs, GPUs, pool resource), their
placement-group bundle, a name to find them again, and a lifetime. Workers are
detached so that they outlive a controller crash: the restarted controller
lists them by name and adopts them.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.core.types import Role
from orchestrator.runtime.placement import POOL_RESOURCE, BundleShape, GroupPlan
from workers.service.host import WorkerHost, WorkerSpec

WORKER_NAME_PREFIX = "worker"


def worker_actor_name(cluster: str, instance_id: str) -> str:
    """Ray actor name of a worker."""
    return f"{cluster}/{WORKER_NAME_PREFIX}/{instance_id}"


def group_name(cluster: str, plan: GroupPlan) -> str:
    """Ray placement-group name of a group plan."""
    return f"{_group_prefix(cluster)}{plan.name}"


def _group_prefix(cluster: str) -> str:
    return f"{cluster}/pg/"


def remove_groups(cluster: str) -> None:
    """Remove every placement group named for ``cluster``, pending ones included."""
    # By name rather than by handle: a restarted controller, or one whose start still waits for a
    # group, holds no handle to the groups it must remove.
    prefix = _group_prefix(cluster)
    for entry in ray.util.placement_group_table().values():
        if entry["state"] != "REMOVED" and entry["name"].startswith(prefix):
            try:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(entry["placement_group_id"])))
            except Exception:  # removed meanwhile
                pass


def ensure_group(cluster: str, plan: GroupPlan, shape: BundleShape, timeout_s: float = 60.0) -> PlacementGroup:
    """Get the named placement group of ``plan``, creating it (detached) if missing."""
    name = group_name(cluster, plan)
    try:
        return get_placement_group(name)
    except ValueError:
        pass
    pg = placement_group(
        [shape.bundle(slot.role) for slot in plan.slots],
        strategy=plan.strategy.ray_strategy,
        name=name,
        lifetime="detached",
    )
    if not pg.wait(timeout_s):
        ray.util.remove_placement_group(pg)
        need = [shape.bundle(slot.role) for slot in plan.slots]
        raise RuntimeError(
            f"placement group {name} ({plan.strategy.value}, bundles {need}) could not be placed in {timeout_s:.0f}s; "
            f"cluster resources: {ray.available_resources()}"
        )
    return pg


def start_worker(
    cluster: str,
    namespace: str,
    spec: WorkerSpec,
    shape: BundleShape,
    group: PlacementGroup | None,
    bundle_index: int,
) -> Any:
    """Create a detached, named worker actor in ``group``'s bundle; returns its handle."""
    options: dict[str, Any] = {
        "name": worker_actor_name(cluster, spec.instance_id),
        "namespace": namespace,
        "lifetime": "detached",
        "num_cpus": shape.num_cpus,
        "num_gpus": shape.num_gpus,
        "resources": {POOL_RESOURCE[spec.role]: 1.0},
        "max_restarts": 0,  # the controller replaces dead workers itself, under a new id
        "max_concurrency": 4,
    }
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle_index
        )
    return ray.remote(WorkerHost).options(**options).remote(spec)


def list_workers(cluster: str, namespace: str) -> list[str]:
    """Names of the live named worker actors of ``cluster``."""
    prefix = worker_actor_name(cluster, "")
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        entry["name"]
        for entry in names
        if isinstance(entry, dict) and entry.get("namespace") == namespace and entry["name"].startswith(prefix)
    )


def start_controller(config: Any, namespace: str, detached: bool, max_restarts: int = -1) -> Any:
    """Create the named controller actor (restarted by Ray up to ``max_restarts`` times, -1: always)."""
    from orchestrator.runtime.controller import Controller

    options: dict[str, Any] = {
        "name": f"{config.cluster}/controller",
        "namespace": namespace,
        "num_cpus": 0,
        "max_restarts": max_restarts,
        "max_task_retries": -1,
        "max_concurrency": 64,
    }
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(Controller).options(**options).remote(config, namespace)


def pool_of(role: Role) -> str:
    """The custom Ray resource naming ``role``'s pool."""
    return POOL_RESOURCE[role]
