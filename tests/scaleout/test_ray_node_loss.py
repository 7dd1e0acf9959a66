"""Losing a Ray node (issue 31): a two-worker ``ray.cluster_utils.Cluster`` on 127.0.0.1, fpedit's front and
shared store on the head, one replica per worker node; then a worker node is removed.

The store must be on the front's node (so no worker's loss takes it), new edits must be served again within
seconds, inversion ids must keep editing (their records outlive the node), and health, ``/readyz`` and the
metrics must say what is true. The two tests share one cluster and run in order: the first removes the node
that held a replica (and, were the store placed on a worker, the store); the second adds a node, removes a
replica-only node, and then the last worker node, where health must turn NOT_SERVING.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from helpers import make_image, png_bytes, scrape, value

from fpedit.server.ray.install import local_ray_on_loopback

local_ray_on_loopback()  # before Ray is imported: every node of the test cluster on loopback

pytestmark = pytest.mark.ray

STEPS = 2
#: Ray's node failure detection (GCS health checks of each raylet): a removed node is declared dead after
#: about period x threshold, 1.5 s here instead of Ray's default 15 s.
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
#: How long the service may take to serve new edits again after a node is removed (measured: see README).
RECOVERY_LIMIT_S = 15.0
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024**2}


def wait_for(condition: Callable[[], bool], limit_s: float, what: str) -> float:
    """Poll ``condition`` until true; returns the seconds it took (fails the test past ``limit_s``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            pytest.fail(f"{what}: not within {limit_s} s")
        time.sleep(0.2)
    return time.monotonic() - started


#: What ray.cluster_utils raises when a node's raylet has not registered with the GCS within Ray's fixed 30 s.
NODE_START_TIMEOUT = "timed out during startup"


def start_cluster(cluster_class: type) -> tuple[Any, list[Any]]:
    """The head and two worker nodes, started once more (in a new cluster) when a node misses Ray's fixed 30 s
    start-up wait: on 2 busy cores the driver's node-info query to the GCS has timed out for 30 s although the
    GCS had registered the node (2 of 7 full runs). Any other failure is raised at once."""
    for attempt in (1, 2):
        cluster = cluster_class(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                "object_store_memory": 80 * 1024**2,
                "_system_config": FAST_NODE_DEATH,
            },
        )
        try:
            return cluster, [cluster.add_node(**NODE) for _ in range(2)]
        except Exception as exc:
            cluster.shutdown()
            if attempt == 2 or NODE_START_TIMEOUT not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster_front():
    """A head node without CPUs (the driver, the front, the store, Serve's controller) and two one-CPU worker
    nodes (one replica each); the front serves gRPC, HTTP and metrics on ephemeral loopback ports."""
    pytest.importorskip("ray.serve")
    import ray
    from ray.cluster_utils import Cluster

    from fpedit.engine.config import EngineConfig
    from fpedit.server.app import build_server
    from fpedit.server.config import ServerConfig
    from fpedit.server.ray import RayService, ReplicaSettings, replica_server_config

    cluster, workers = start_cluster(Cluster)
    service = front = None
    try:
        settings = ReplicaSettings(
            engine=EngineConfig(model="tiny", batching=False),
            server=replica_server_config(ServerConfig(), max_ongoing_requests=2, batching=False),
        )
        service = RayService.start(
            settings,
            replicas=2,
            address=cluster.address,
            max_ongoing_requests=2,
            health_check_period_s=0.5,
            ray_init={"log_to_driver": False},
        )
        front = build_server(service.runner, ServerConfig(port=0, metrics_port=0, http_port=0))
        yield {"cluster": cluster, "workers": workers, "service": service, "front": front}
    finally:
        if front is not None:
            front.drain(2)
        if service is not None:
            service.close()
        ray.shutdown()
        cluster.shutdown()


def client_of(front):
    from fpedit.server.client import EditClient

    return EditClient(f"127.0.0.1:{front.port}", timeout=30)


def replica_nodes(service) -> dict[str, str]:
    """{replica name: node id} of the replicas that answer."""
    return {s["name"]: s["node_id"] for s in service.runner.replica_stats()}


def store_node(service) -> str:
    return service.runner.store.ping()["node_id"]


def edit_new_image(client, seed: int) -> grpc.StatusCode:
    from fpedit.server.client import edit_options

    try:
        image = png_bytes(make_image(64, 64, seed=seed))
        client.edit("a red car", image=image, options=edit_options(steps=STEPS), timeout=20)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def time_to_serve_again(client) -> tuple[float, list[grpc.StatusCode]]:
    """Seconds until a new edit with an image succeeds, and the codes of the attempts before it."""
    started, failures = time.monotonic(), []
    while (code := edit_new_image(client, seed=len(failures))) != grpc.StatusCode.OK:
        failures.append(code)
        assert time.monotonic() - started < RECOVERY_LIMIT_S, failures
        time.sleep(0.2)
    return time.monotonic() - started, failures


def edits_by_id(client, ids: list[str]) -> dict[str, str]:
    """{id: "OK" or the status code name}; a NOT_FOUND must tell the client to send the image again."""
    outcomes = {}
    for inversion_id in ids:
        try:
            client.edit("a blue car", inversion_id=inversion_id, timeout=30)
            outcomes[inversion_id] = "OK"
        except grpc.RpcError as exc:
            outcomes[inversion_id] = exc.code().name
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                assert "send the image again" in exc.details(), exc.details()
    return outcomes


def invert_some(client, count: int, seed: int) -> dict[str, str]:
    """{inversion id: holder replica} of ``count`` new inversions."""
    from fpedit.server.client import edit_options

    made = {}
    for i in range(count):
        inverted = client.invert(
            png_bytes(make_image(64, 64, seed=seed + i)), options=edit_options(steps=STEPS)
        )
        made[inverted.inversion_id] = inverted.stats.replica
    return made


def node_of(cluster_front, node_id: str):
    (node,) = [n for n in cluster_front["cluster"].worker_nodes if n.node_id == node_id]
    return node


def readyz(front) -> int:
    return httpx.get(f"{front.http.url}readyz", timeout=5).status_code


def test_losing_the_node_of_a_replica_keeps_store_ids_and_serving(cluster_front):
    """(a) The node that held a replica, and would have held the store were it placed on a worker, is
    removed: new edits are served again within seconds, every inversion id keeps editing, health stays
    SERVING, /readyz 200, and the metrics count one replica alive and no store restart."""
    import ray

    service, front = cluster_front["service"], cluster_front["front"]
    head = ray.get_runtime_context().get_node_id()  # the driver's node: the front's
    replicas = replica_nodes(service)
    assert len(replicas) == 2 and head not in replicas.values(), replicas
    assert len(set(replicas.values())) == 2  # one replica per worker node
    with client_of(front) as client:
        made = invert_some(client, 6, seed=100)
        store_at = store_node(service)
        # The node to lose: the store's if it ran on a worker, else a replica's that holds some ids.
        victim = store_at if store_at != head else next(replicas[h] for h in made.values())
        assert victim in replicas.values()  # it runs a replica: the loss is real
        lost_replicas = {name for name, node in replicas.items() if node == victim}
        assert any(holder in lost_replicas for holder in made.values())  # some ids lose their holder

        # Killed, not shut down: the node's processes get no chance to say goodbye, as in a crash.
        cluster_front["cluster"].remove_node(node_of(cluster_front, victim), allow_graceful=False)
        recovery_s, failures = time_to_serve_again(client)
        outcomes = edits_by_id(client, list(made))
        # Once the front has seen the loss (one replica alive), health must still say SERVING.
        seen_s = wait_for(
            lambda: value(scrape(front.metrics_port), "fpedit_ray_replicas_alive") == 1, 10, "one alive"
        )
        assert client.health() == "SERVING"
        assert readyz(front) == 200
    print(f"\nnode loss (a): served again after {recovery_s:.1f} s {failures}; ids {outcomes}")
    print(f"the front counted one replica alive {recovery_s + seen_s:.1f} s after the node was removed")
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures
    assert "UNAVAILABLE" not in outcomes.values()
    assert list(outcomes.values()) == ["OK"] * 6  # every record outlived the node (the store's is the head)
    assert value(scrape(front.metrics_port), "fpedit_ray_store_restarts_total") == 0
    # Placement, last (so a misplaced store fails the behaviour above first): the store is on the head.
    assert store_node(service) == head


def test_losing_a_replica_only_node_then_the_last_one(cluster_front):
    """(b) A node is added (the lost replica is rescheduled there), then that replica-only node is removed:
    edits are served again within seconds with every id kept. Removing the last worker node leaves no
    replica: health and /readyz say NOT_SERVING within seconds, and SERVING again once a node returns."""
    import ray

    service, front, cluster = cluster_front["service"], cluster_front["front"], cluster_front["cluster"]
    head = ray.get_runtime_context().get_node_id()
    cluster.add_node(**NODE)
    wait_for(lambda: len(replica_nodes(service)) == 2, 60, "the lost replica rescheduled on the new node")
    replicas = replica_nodes(service)
    with client_of(front) as client:
        made = invert_some(client, 4, seed=200)
        victim = next(replicas[h] for h in made.values())
        assert store_node(service) == head != victim  # replica-only
        cluster.remove_node(node_of(cluster_front, victim))
        recovery_s, failures = time_to_serve_again(client)
        outcomes = edits_by_id(client, list(made))
        print(f"\nnode loss (b): served again after {recovery_s:.1f} s {failures}; ids {outcomes}")
        assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures
        assert list(outcomes.values()) == ["OK"] * 4

        (last,) = cluster.worker_nodes
        cluster.remove_node(last)
        down_s = wait_for(lambda: client.health() == "NOT_SERVING", 15, "NOT_SERVING without replicas")
        assert readyz(front) == 503
        assert value(scrape(front.metrics_port), "fpedit_ray_replicas_alive") == 0
        cluster.add_node(**NODE)
        up_s = wait_for(lambda: client.health() == "SERVING", 60, "SERVING once a replica is back")
        assert readyz(front) == 200
        assert edit_new_image(client, seed=300) == grpc.StatusCode.OK
        print(f"no replica: NOT_SERVING after {down_s:.1f} s; SERVING {up_s:.1f} s after a node was added")

        # The store's process dies: Ray restarts it on the head, the front counts the restart, and the ids
        # whose holders are gone (all of them: both replicas that held them were removed) lost their data.
        store = ray.get_actor(service.settings.store_name, namespace=service.settings.store_namespace)
        ray.kill(store, no_restart=False)
        wait_for(
            lambda: value(scrape(front.metrics_port), "fpedit_ray_store_restarts_total") == 1, 20, "restart"
        )
        assert store_node(service) == head
        assert list(edits_by_id(client, list(made)).values()) == ["NOT_FOUND"] * 4
        assert client.health() == "SERVING"
    # A store the front cannot reach is not serving either (a watch over a store name that does not exist).
    from fpedit.server.ray.store import StoreClient
    from fpedit.server.ray.watch import ServiceWatch

    blind = ServiceWatch(service.app_name, "EditReplica", StoreClient("no-such-store", timeout_s=1.0))
    try:
        serving, reason = blind.readiness()
    finally:
        blind.close()
    assert not serving and "store" in reason, reason
