"""The Kubernetes manifests, with no cluster: every resource under deploy/kubernetes/ validates
strictly against the Kubernetes 1.30 schemas (PyPI kubernetes-validate), and the manifests agree
with the code they run: the front end's arguments parse with ``python -m server``'s parser and
its probes are the app's routes; Triton's flags and health paths are those of a real tritonserver
of the image's release; images, entry points and commands are the Dockerfile's; selectors,
ports, the autoscaler, the disruption budget and the network policies fit together.

deploy/ray/rayjob.yaml is a KubeRay custom resource, outside the core schemas: its pod templates
and its claim are validated, the rest is checked for structure and against
``python -m clients.ray_batch``'s flags.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from packaging.requirements import Requirement

from server.flags import parse_settings
from server.main import create_app
from server.metrics import Metrics
from server.settings import Settings
from testkit import REPOSITORY_ROOT as ROOT
from testkit import dockerfile
from testkit.ports import free_port
from tritonlocal import prepare

KUBERNETES_VERSION = "1.30"
MANIFESTS = ROOT / "deploy" / "kubernetes"
MODEL_LOADER = ROOT / "deploy" / "model-loader.yaml"
RAYJOB = ROOT / "deploy" / "ray" / "rayjob.yaml"
RAY_BATCH = ROOT / "clients" / "ray_batch.py"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)
PART_OF = "vggserve"


# --- reading the manifests -------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of ``path`` (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    """deploy/kubernetes/'s files, in the order kubectl applies them (by name)."""
    return sorted(MANIFESTS.glob("*.yaml"))


def resources() -> list[dict[str, Any]]:
    """Every resource ``kubectl apply -f deploy/kubernetes/`` creates, in apply order."""
    return [doc for path in manifest_files() for doc in documents(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    """The one resource of deploy/kubernetes/ of this kind and name."""
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    """Every resource of deploy/kubernetes/ of this kind."""
    return [r for r in resources() if r["kind"] == kind]


def rayjob() -> dict[str, Any]:
    """The RayJob of deploy/ray/rayjob.yaml."""
    (job,) = [doc for doc in documents(RAYJOB) if doc["kind"] == "RayJob"]
    return job


def ray_pods(job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod template) of the Ray head, then of each worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    return [("ray head", cluster["headGroupSpec"]["template"])] + [
        (f"ray workers {group['groupName']}", group["template"])
        for group in cluster["workerGroupSpecs"]
    ]


def ray_pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of the Ray head and of each worker group."""
    return [template for _, template in ray_pods(job)]


def the_container(pod_template: dict[str, Any]) -> dict[str, Any]:
    """The pod's only container."""
    (container,) = pod_template["spec"]["containers"]
    return container


def triton() -> dict[str, Any]:
    """Triton's Deployment."""
    return resource("Deployment", "triton")


def frontend() -> dict[str, Any]:
    """The front end's Deployment."""
    return resource("Deployment", "frontend")


def container_port(container: dict[str, Any], port: int | str) -> dict[str, Any]:
    """The container's port named ``port``, or numbered ``port``."""
    (found,) = [p for p in container["ports"] if port in (p.get("name"), p["containerPort"])]
    return found


def named(image: str) -> str:
    """``registry.example.com/team/vggserve-triton:1.0`` -> ``vggserve-triton``."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def prestop_seconds(container: dict[str, Any]) -> int:
    """How long the container's preStop hook sleeps (an exec of sleep, or a sleep action)."""
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's probes by kind (startupProbe, readinessProbe, livenessProbe)."""
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {kind: container[kind] for kind in kinds if kind in container}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def namespace_labels() -> dict[str, str]:
    """The labels the namespace has in a cluster: its own, and the name Kubernetes adds."""
    (namespace,) = of_kind("Namespace")
    name = namespace["metadata"]["name"]
    return {**namespace["metadata"].get("labels", {}), "kubernetes.io/metadata.name": name}


def admits(policy: dict[str, Any], labels: dict[str, str], port: int, target: dict) -> bool:
    """Whether ``policy`` lets a pod with ``labels`` in the policy's own namespace connect to
    ``port`` of the ``target`` container (a pod the policy selects)."""
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(
            container_port(target, p["port"])["containerPort"] == port for p in ports
        ):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            namespace_ok = "namespaceSelector" not in peer or selects(
                peer["namespaceSelector"], namespace_labels()
            )
            pod_ok = "podSelector" not in peer or selects(peer["podSelector"], labels)
            if "ipBlock" not in peer and namespace_ok and pod_ok:
                return True
    return False


def policy_for(pod_labels: dict[str, str]) -> dict[str, Any]:
    """The one NetworkPolicy that selects pods with these labels."""
    (policy,) = [
        p for p in of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels)
    ]
    return policy


# --- reading the Dockerfile ------------------------------------------------------------------


def target_tags() -> dict[str, str]:
    """The Dockerfile header's {target: tag}, at least the two images deployed here."""
    tags = dockerfile.target_tags()
    assert {"triton", "frontend"} <= set(tags), tags
    return tags


# --- schemas ---------------------------------------------------------------------------------


def core_documents() -> list[tuple[str, dict[str, Any]]]:
    """(id, resource) of every core Kubernetes resource this repository ships: deploy/kubernetes/,
    the model loader, the RayJob's claim, and the RayJob's pod templates as PodTemplates."""
    found = [
        (f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in [*manifest_files(), MODEL_LOADER, RAYJOB]
        for doc in documents(path)
        if doc["kind"] != "RayJob"
    ]
    for name, template in ray_pods(rayjob()):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name.replace(" ", "-")},
            "template": template,
        }
        found.append((f"{RAYJOB.relative_to(ROOT)}:{name}", wrapped))
    return found


CORE_DOCUMENTS = core_documents()


@pytest.mark.parametrize(
    "document", [doc for _, doc in CORE_DOCUMENTS], ids=[name for name, _ in CORE_DOCUMENTS]
)
def test_every_resource_validates_strictly_against_kubernetes_130(document):
    """Strict: an unknown or misspelt field is an error, as ``kubectl apply`` makes it."""
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {exc.message}")


def test_the_namespace_is_created_first_and_holds_every_resource():
    """``kubectl apply -f deploy/kubernetes/`` applies the files in name order; a resource
    applied before its namespace exists fails."""
    first = documents(manifest_files()[0])
    assert [doc["kind"] for doc in first] == ["Namespace"], manifest_files()[0].name
    (namespace,) = of_kind("Namespace")
    name = namespace["metadata"]["name"]
    others = [r for r in resources() if r["kind"] != "Namespace"]
    others += documents(MODEL_LOADER) + documents(RAYJOB)
    assert {r["metadata"].get("namespace") for r in others} == {name}


def test_every_resource_and_pod_carries_the_recommended_labels():
    labelled = [r for r in resources() if r["kind"] != "Namespace"]
    labelled += documents(MODEL_LOADER) + documents(RAYJOB)
    pods = [d["spec"]["template"] for d in of_kind("Deployment")] + ray_pod_templates(rayjob())
    for item in labelled + pods:
        labels = item["metadata"]["labels"]
        assert all(key in labels for key in RECOMMENDED_LABELS), item["metadata"]
        assert labels["app.kubernetes.io/part-of"] == PART_OF
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["labels"]["app.kubernetes.io/part-of"] == PART_OF


# --- the Dockerfile's images -----------------------------------------------------------------


def test_images_are_the_dockerfiles_targets():
    tags = target_tags()
    assert named(the_container(triton()["spec"]["template"])["image"]) == tags["triton"]
    assert named(the_container(frontend()["spec"]["template"])["image"]) == tags["frontend"]


def test_triton_runs_the_dockerfiles_command_plus_what_a_pod_needs():
    """args replace the image's CMD (the ENTRYPOINT, tritonserver, stays): they must begin with
    the CMD's flags, serve the mounted repository and expose the image's ports."""
    container = the_container(triton()["spec"]["template"])
    assert "command" not in container  # the image's ENTRYPOINT runs
    assert dockerfile.exec_form("triton", "ENTRYPOINT") == ["tritonserver"]
    command = dockerfile.exec_form("triton", "CMD")
    args = container["args"]
    assert args[: len(command)] == command
    (repository,) = [a.partition("=")[2] for a in args if a.startswith("--model-repository=")]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in triton()["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[repository]["name"]]["persistentVolumeClaim"]
    assert mounts[repository].get("readOnly") is True
    assert resource("PersistentVolumeClaim", claim["claimName"])
    (expose,) = [i for i in dockerfile.stages()["triton"] if i.startswith("EXPOSE ")]
    exposed = sorted(int(port) for port in expose.split()[1:])
    assert sorted(p["containerPort"] for p in container["ports"]) == exposed
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def tritonserver_options() -> set[str]:
    """The options ``tritonserver --help`` lists, from the bundled tritonserver 2.51: the release
    of the image's tritonserver:24.10 (tests/test_dockerfile.py holds the Dockerfile to 24.x)."""
    install = prepare()
    result = subprocess.run(
        [str(install.binary), "--help"],
        env=install.environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # It prints its usage on stderr and exits 1.
    usage = result.stdout + result.stderr
    options = set(re.findall(r"^\s+(--[a-z0-9-]+)", usage, re.M))
    assert "--model-repository" in options, usage
    return options


def test_triton_flags_are_tritonservers_and_the_grace_period_covers_its_exit():
    container = the_container(triton()["spec"]["template"])
    flags = {arg.partition("=")[0] for arg in container["args"]}
    unknown = flags - tritonserver_options()
    assert not unknown, f"not options of tritonserver: {sorted(unknown)}"
    # On SIGTERM Triton waits up to --exit-timeout-secs (default 30) for requests in flight.
    exit_timeout = 30
    for arg in container["args"]:
        if arg.startswith("--exit-timeout-secs="):
            exit_timeout = int(arg.partition("=")[2])
    assert triton()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > exit_timeout


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET."""
    # Straight to the server: an http_proxy in the environment must not intercept 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_triton_probes_and_metrics_answer_on_a_real_tritonserver(triton_server):
    """Each probe's path, on the port it names, answers 200 on the tritonserver of the image's
    release serving a repository; so does the path Prometheus is told to scrape."""
    pod = triton()["spec"]["template"]
    container = the_container(pod)
    checked = []
    for kind, probe in probes(container).items():
        port = container_port(container, probe["httpGet"]["port"])
        local = triton_server.ports[port["name"]]  # http, grpc, metrics: the same names
        status, _ = http_get(f"http://{triton_server.host}:{local}{probe['httpGet']['path']}")
        assert status == 200, (kind, probe)
        checked.append(kind)
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(checked)
    ready = container["readinessProbe"]["httpGet"]["path"]
    assert ready == "/v2/health/ready"  # not merely alive: every model loaded (strict readiness)
    annotations = pod["metadata"]["annotations"]
    port = container_port(container, int(annotations["prometheus.io/port"]))
    local = triton_server.ports[port["name"]]
    status, body = http_get(
        f"http://{triton_server.host}:{local}{annotations['prometheus.io/path']}"
    )
    assert status == 200 and "nv_inference_request_success" in body


# --- the front end ---------------------------------------------------------------------------


def frontend_settings() -> Settings:
    """The front end's container arguments, parsed by ``python -m server``'s own parser."""
    args = the_container(frontend()["spec"]["template"])["args"]
    try:
        return parse_settings(args)
    except SystemExit:
        pytest.fail(f"python -m server refuses the front end's args {args} (its error above)")


def test_frontend_runs_python_m_server_with_flags_it_accepts():
    container = the_container(frontend()["spec"]["template"])
    assert "command" not in container  # the image's ENTRYPOINT runs
    assert dockerfile.exec_form("frontend", "ENTRYPOINT") == ["python", "-m", "server"]
    settings = frontend_settings()
    assert settings.backend == "triton"
    assert settings.host == "0.0.0.0"  # reachable from outside the pod
    assert container_port(container, "http")["containerPort"] == settings.port


def test_frontend_reaches_triton_through_its_service_on_grpc():
    host, _, port = frontend_settings().triton_url.rpartition(":")
    service = resource("Service", host)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert selects({"matchLabels": service["spec"]["selector"]}, triton_pod_labels())
    target = container_port(the_container(triton()["spec"]["template"]), service_port["targetPort"])
    assert target["name"] == "grpc"


def test_frontend_probes_are_routes_of_the_app_on_its_port():
    settings = frontend_settings()
    # The app's GET routes, as its OpenAPI description lists them (routers included).
    paths = create_app(Settings(backend="triton")).openapi()["paths"]
    routes = {path for path, operations in paths.items() if "get" in operations}
    container = the_container(frontend()["spec"]["template"])
    for kind, probe in probes(container).items():
        assert probe["httpGet"]["path"] in routes, (kind, probe)
        port = container_port(container, probe["httpGet"]["port"])["containerPort"]
        assert port == settings.port, (kind, probe)
    annotations = frontend()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == settings.port


def test_frontend_probes_answer_as_kubernetes_needs(triton_server):
    """Readiness follows Triton (the pod leaves the Service while Triton is away); liveness does
    not (a Triton outage must not restart every front end)."""
    container = the_container(frontend()["spec"]["template"])
    ready = container["readinessProbe"]["httpGet"]["path"]
    alive = container["livenessProbe"]["httpGet"]["path"]
    unreachable = f"127.0.0.1:{free_port()}"
    for url, ready_status in ((triton_server.grpc_url, 200), (unreachable, 503)):
        with TestClient(create_app(Settings(backend="triton", triton_url=url))) as client:
            assert client.get(ready).status_code == ready_status, url
            assert client.get(alive).status_code == 200, url


def test_termination_grace_covers_prestop_and_the_servers_grace_period():
    """The kubelet sends SIGKILL terminationGracePeriodSeconds after the pod starts stopping:
    preStop runs first, then the server gives requests in flight --grace-period seconds, then
    it still has to exit."""
    pod = frontend()["spec"]["template"]["spec"]
    needed = prestop_seconds(the_container(frontend()["spec"]["template"]))
    needed += frontend_settings().grace_period
    assert pod["terminationGracePeriodSeconds"] > needed


def test_frontend_runs_unprivileged_on_a_read_only_root_with_a_writable_tmp():
    """The Dockerfile's user; uploads over 1 MB spool to /tmp, the only writable path."""
    (user,) = [i.split()[1] for i in dockerfile.stages()["frontend"] if i.startswith("USER ")]
    template = frontend()["spec"]["template"]
    container = the_container(template)
    assert template["spec"]["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_triton_has_shared_memory_for_its_python_stubs():
    template = triton()["spec"]["template"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in the_container(template)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod this repository ships."""
    specs = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind("Deployment")]
    specs += [(doc["metadata"]["name"], doc["spec"]) for doc in documents(MODEL_LOADER)]
    specs += [(name, template["spec"]) for name, template in ray_pods(rayjob())]
    return specs


@pytest.mark.parametrize("name, spec", pod_specs(), ids=[name for name, _ in pod_specs()])
def test_pods_run_as_a_non_root_user_without_privileges(name, spec):
    """What the Pod Security "restricted" profile asks of every container."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]


def test_every_vggserve_metric_named_in_the_manifests_and_docs_exists():
    registry = Metrics().registry
    exported = {sample.name for family in registry.collect() for sample in family.samples}
    exported |= {family.name for family in registry.collect()}
    texts = [path.read_text() for path in manifest_files()] + [DEPLOY_DOC.read_text()]
    named_metrics = {m for text in texts for m in re.findall(r"\bvggserve_[a-z_]+\b", text)}
    assert "vggserve_in_flight_requests" in named_metrics  # the autoscaler's next step
    assert named_metrics <= exported, sorted(named_metrics - exported)


# --- Services, autoscaler, disruption budget -------------------------------------------------


def triton_pod_labels() -> dict[str, str]:
    """The labels of Triton's pods."""
    return triton()["spec"]["template"]["metadata"]["labels"]


def frontend_pod_labels() -> dict[str, str]:
    """The labels of the front end's pods."""
    return frontend()["spec"]["template"]["metadata"]["labels"]


def deployment_selecting(selector: dict[str, Any]) -> dict[str, Any]:
    """The one Deployment whose pods ``selector`` selects."""
    (found,) = [
        d
        for d in of_kind("Deployment")
        if selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]
    return found


def test_each_deployment_selects_its_own_pods_and_only_those():
    for deployment in of_kind("Deployment"):
        selected = deployment_selecting(deployment["spec"]["selector"])
        assert selected["metadata"]["name"] == deployment["metadata"]["name"]


@pytest.mark.parametrize("name", ["triton", "frontend"])
def test_each_service_sends_to_its_deployments_ports(name):
    service = resource("Service", name)
    deployment = deployment_selecting({"matchLabels": service["spec"]["selector"]})
    assert deployment["metadata"]["name"] == name
    container = the_container(deployment["spec"]["template"])
    for port in service["spec"]["ports"]:
        target = container_port(container, port["targetPort"])
        assert target.get("name") == port["name"], port


def test_the_autoscaler_scales_the_frontend_on_cpu():
    (autoscaler,) = of_kind("HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    deployment = resource("Deployment", target["name"])
    assert deployment["spec"]["template"]["metadata"]["labels"] == frontend_pod_labels()
    # The autoscaler owns the count: a replicas field would reset it at every apply.
    assert "replicas" not in deployment["spec"]
    (metric,) = [m for m in autoscaler["spec"]["metrics"] if m["type"] == "Resource"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # Utilisation is a share of the CPU request, which must therefore exist.
    assert the_container(deployment["spec"]["template"])["resources"]["requests"]["cpu"]
    assert autoscaler["spec"]["minReplicas"] >= 2  # one can be evicted while another serves


def fewest_replicas(deployment: dict[str, Any]) -> int:
    """The Deployment's replicas, or its autoscaler's minimum."""
    for autoscaler in of_kind("HorizontalPodAutoscaler"):
        if autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]:
            return autoscaler["spec"]["minReplicas"]
    return deployment["spec"].get("replicas", 1)


def test_disruption_budgets_cover_the_frontend_and_let_drains_proceed():
    budgets = of_kind("PodDisruptionBudget")
    covered = [deployment_selecting(b["spec"]["selector"]) for b in budgets]
    assert frontend() in covered
    for budget, deployment in zip(budgets, covered, strict=True):
        spec = budget["spec"]
        # A budget that allows no eviction at the fewest replicas blocks every node drain.
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] >= 1, budget["metadata"]["name"]
        else:
            assert spec["minAvailable"] < fewest_replicas(deployment), budget["metadata"]["name"]


# --- network policies ------------------------------------------------------------------------


def test_only_the_frontend_and_batch_jobs_reach_triton():
    policy = policy_for(triton_pod_labels())
    assert "Ingress" in policy["spec"]["policyTypes"]
    target = the_container(triton()["spec"]["template"])
    grpc = container_port(target, "grpc")["containerPort"]
    metrics = container_port(target, "metrics")["containerPort"]
    assert admits(policy, frontend_pod_labels(), grpc, target)
    for template in ray_pod_templates(rayjob()):
        assert admits(policy, template["metadata"]["labels"], grpc, target)
    strangers = [
        {},
        documents(MODEL_LOADER)[0]["metadata"]["labels"],
        {**frontend_pod_labels(), "app.kubernetes.io/component": "other"},
        {"app.kubernetes.io/component": "frontend"},  # not part of vggserve
    ]
    for labels in strangers:
        for port in (p["containerPort"] for p in target["ports"]):
            assert not admits(policy, labels, port, target), (labels, port)
    # Metrics: not from the front end or batch jobs, only from the monitoring namespace.
    assert not admits(policy, frontend_pod_labels(), metrics, target)
    rule_ports = [
        (peer, port["port"])
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        for port in rule["ports"]
    ]
    assert [peer for peer, port in rule_ports if port in (metrics, "metrics")] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_the_frontend_is_reachable_from_the_cluster_on_its_port_only():
    policy = policy_for(frontend_pod_labels())
    container = the_container(frontend()["spec"]["template"])
    port = frontend_settings().port
    assert admits(policy, {}, port, container)
    assert not admits(policy, {}, port + 1, container)
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {}}]  # every namespace


# --- the KubeRay RayJob ----------------------------------------------------------------------


def entrypoint() -> list[str]:
    """The RayJob's entrypoint, split as a shell splits it."""
    return shlex.split(rayjob()["spec"]["entrypoint"])


def entrypoint_options() -> dict[str, str | None]:
    """The entrypoint's ``--flag value`` pairs (None for a switch)."""
    words = entrypoint()
    options: dict[str, str | None] = {}
    for index, word in enumerate(words):
        if word.startswith("--"):
            flag, equals, value = word.partition("=")
            following = words[index + 1] if index + 1 < len(words) else None
            if equals:
                options[flag] = value
            elif following is not None and not following.startswith("--"):
                options[flag] = following
            else:
                options[flag] = None
    return options


def test_the_rayjob_runs_ray_batch_on_the_vggserve_ray_image():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert entrypoint()[:3] == ["python", "-m", "clients.ray_batch"]
    inputs = [w for w in entrypoint()[3:] if not w.startswith("--")][:1]
    assert inputs and inputs[0].startswith("s3://")  # a pyarrow filesystem URI
    for template in ray_pod_templates(job):
        assert named(the_container(template)["image"]) == "vggserve-ray"
    # KubeRay must be told the image's Ray, which pyproject.toml's ray extra bounds.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ray,) = [
        Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["ray"]
        if Requirement(r).name == "ray"
    ]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] in ray.specifier


def test_the_rayjob_writes_to_a_volume_every_ray_pod_mounts():
    """Ray workers write the part files and the driver on the head reads them (--resume): the
    output folder must be the same shared volume on every pod."""
    out = Path(entrypoint_options()["--out"])
    claims = {
        doc["metadata"]["name"]: doc
        for doc in documents(RAYJOB)
        if doc["kind"] == "PersistentVolumeClaim"
    }
    for template in ray_pod_templates(rayjob()):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [
            m for m in the_container(template)["volumeMounts"] if out.is_relative_to(m["mountPath"])
        ]
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_the_rayjob_calls_triton_through_its_service():
    options = entrypoint_options()
    assert options["--engine"] == "triton"
    host, _, port = options["--url"].rpartition(":")
    service = resource("Service", "triton")
    assert host in (
        service["metadata"]["name"],
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc",
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local",
    )
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert service_port["name"] == "grpc"


def ray_batch_flags(source: str) -> set[str]:
    """Every option string of ``add_argument`` calls in ``source`` (``--no-X`` too, for
    BooleanOptionalAction flags)."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        strings = [a.value for a in node.args if isinstance(a, ast.Constant)]
        options = [s for s in strings if isinstance(s, str) and s.startswith("--")]
        flags.update(options)
        if any(ast.unparse(k.value).endswith("BooleanOptionalAction") for k in node.keywords):
            flags.update("--no-" + option[2:] for option in options)
    return flags


def test_the_rayjob_uses_only_flags_of_ray_batch():
    flags = ray_batch_flags(RAY_BATCH.read_text())
    used = set(entrypoint_options())
    assert used <= flags, f"not flags of python -m clients.ray_batch: {sorted(used - flags)}"


def test_the_flag_reader_finds_add_argument_options():
    source = """
parser.add_argument("inputs", nargs="*")
parser.add_argument("--out", required=True)
parser.add_argument(
    "--flip", action=argparse.BooleanOptionalAction, default=True
)
parser.add_argument("-k", "--top-k", type=int)
print("--not-a-flag")
"""
    assert ray_batch_flags(source) == {"--out", "--flip", "--no-flip", "--top-k"}
