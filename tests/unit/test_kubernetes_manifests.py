"""The Kubernetes example (examples/kubernetes/, docs/kubernetes.md) against hotpatch's own code.

Manifests cannot run here (no cluster), so what can drift is checked: every YAML file parses and
has the kind expected; every container command is a real gunicorn command line (parsed by
gunicorn's own parser, with hotpatch's config importable and no ``--preload``) or a real
``hotpatch`` sub-command; every ``HOTPATCH_*`` variable is a setting hotpatch knows, with a value
its own settings code accepts; probes ask the configured health path; the probe and grace-period
arithmetic holds for the settings in the manifest; the PromQL of the AnalysisTemplate uses only
the fixed metric names and labels; the shell script parses and passes only flags ``hotpatch
deploy --help`` lists; the Dockerfile's ``CMD`` is the Deployment's command.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hotpatch.gunicorn._settings import ENV_VARS, load_settings, reset_configuration
from hotpatch.rundir import ENV_RUNTIME_DIR

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "kubernetes"
DOC = ROOT / "docs" / "kubernetes.md"
HOTPATCH_CLI = [sys.executable, "-m", "hotpatch"]

EXPECTED_KINDS = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "rollout.yaml": ("argoproj.io/v1alpha1", "Rollout"),
    "analysis-template.yaml": ("argoproj.io/v1alpha1", "AnalysisTemplate"),
    "podmonitor.yaml": ("monitoring.coreos.com/v1", "PodMonitor"),
}
WORKLOADS = ("deployment.yaml", "rollout.yaml")

# The metric names and labels fixed by issue 11 (hotpatch[prometheus]); an AnalysisTemplate and
# dashboards depend on them, so they are spelled out here rather than read from the code.
FIXED_METRICS: dict[str, frozenset[str]] = {
    "hotpatch_requests_total": frozenset({"release", "worker", "code_class"}),
    "hotpatch_request_exceptions_total": frozenset({"release", "worker"}),
    "hotpatch_request_duration_seconds": frozenset({"release"}),
    "hotpatch_release_info": frozenset({"release"}),
    "hotpatch_patches_total": frozenset({"outcome"}),
    "hotpatch_rollbacks_total": frozenset({"outcome"}),
    "hotpatch_deploys_total": frozenset({"strategy", "outcome"}),
    "hotpatch_deploy_in_progress": frozenset(),
}
HISTOGRAMS = frozenset({"hotpatch_request_duration_seconds"})
CODE_CLASSES = frozenset({"2xx", "3xx", "4xx", "5xx"})
# The one label the scrape adds that the queries use: the pod label Argo Rollouts puts on the
# canary's and the stable ReplicaSet's pods, as Prometheus names it.
POD_HASH_LABEL = "rollouts-pod-template-hash"
SCRAPE_LABELS = frozenset({POD_HASH_LABEL.replace("-", "_")})
# Programs other than gunicorn and hotpatch that the manifests may run (all in the base image).
UTILITIES = frozenset({"cp", "sleep"})
PROMQL_WORDS = frozenset(
    {
        "sum", "rate", "increase", "irate", "histogram_quantile", "clamp_min", "clamp_max",
        "vector", "by", "without", "or", "and", "unless", "on", "ignoring", "max", "min", "avg",
        "count", "abs", "bool", "offset",
    }
)  # fmt: skip


@pytest.fixture(autouse=True)
def _forget_configuration() -> Iterator[None]:
    reset_configuration()
    yield
    reset_configuration()


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLE / name).read_text()) if doc is not None]


def one(name: str) -> dict[str, Any]:
    (doc,) = load(name)
    return doc


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(name)["spec"]["template"]["spec"]
    return spec


def app_container(name: str) -> dict[str, Any]:
    (container,) = pod_spec(name)["containers"]
    return container


def gunicorn_command(name: str) -> list[str]:
    container = app_container(name)
    command: list[str] = [*container.get("command", []), *container.get("args", [])]
    assert command[0] == "gunicorn", f"{name}: the app container does not run gunicorn: {command}"
    return command


class GunicornLine:
    """A gunicorn command line as gunicorn parses and validates it (``--chdir`` aside)."""

    def __init__(self, argv: list[str]) -> None:
        from gunicorn.config import Config

        self.cfg = Config()
        try:
            namespace = self.cfg.parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"gunicorn refuses the command line {shlex.join(argv)}")
        self.chdir: str | None = namespace.chdir  # a path in the pod: gunicorn checks it exists
        for key, value in vars(namespace).items():
            if value is not None and key in self.cfg.settings and key != "chdir":
                self.cfg.set(key.lower(), value)
        self.app_uri: list[str] = namespace.args

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cfg, name)


def parse_gunicorn(argv: list[str]) -> GunicornLine:
    return GunicornLine(argv)


def container_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in app_container(name).get("env", []):
        assert "value" in item, f"{name}: env {item['name']} must have a literal value"
        assert isinstance(item["value"], str), f"{name}: env {item['name']} must be a string"
        env[item["name"]] = item["value"]
    return env


def known_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in ENV_VARS.values()}


def probe(name: str, kind: str) -> dict[str, Any]:
    found: dict[str, Any] | None = app_container(name).get(kind)
    assert found is not None, f"{name}: no {kind}"
    return found


def window_s(p: dict[str, Any]) -> int:
    """How long a probe must keep failing before the kubelet acts (Kubernetes' defaults)."""
    return int(p.get("periodSeconds", 10)) * int(p.get("failureThreshold", 3))


# -- files and kinds ---------------------------------------------------------------------------


def test_every_yaml_file_parses_with_the_expected_kind() -> None:
    names = {p.name for p in EXAMPLE.glob("*.yaml")} | {p.name for p in EXAMPLE.glob("*.yml")}
    assert names == set(EXPECTED_KINDS), "a manifest without an expected kind, or one missing"
    for name, (api_version, kind) in EXPECTED_KINDS.items():
        doc = one(name)
        assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), name
        assert doc["metadata"]["name"] == "hotpatch-example" or kind == "AnalysisTemplate"


def test_yaml_blocks_in_the_docs_parse() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks, "docs/kubernetes.md shows no manifest"
    for block in blocks:
        assert list(yaml.safe_load_all(block)), block


def test_rollout_runs_the_same_pods_as_the_deployment() -> None:
    assert one("rollout.yaml")["spec"]["template"] == one("deployment.yaml")["spec"]["template"]
    assert one("rollout.yaml")["spec"]["selector"] == one("deployment.yaml")["spec"]["selector"]


def test_service_and_monitor_select_the_pods() -> None:
    labels = one("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    selector = one("service.yaml")["spec"]["selector"]
    assert selector.items() <= labels.items()
    monitor = one("podmonitor.yaml")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in app_container("deployment.yaml")["ports"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in ports
    for port in one("service.yaml")["spec"]["ports"]:
        assert port["targetPort"] in ports


# -- commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_gunicorn_command_is_real_and_loads_hotpatchs_hooks(name: str) -> None:
    cfg = parse_gunicorn(gunicorn_command(name)[1:])
    assert cfg.config.startswith("python:"), "hotpatch's hooks come from -c python:..."
    module = importlib.import_module(cfg.config.removeprefix("python:"))
    for hook in ("nworkers_changed", "when_ready", "post_fork", "post_worker_init", "child_exit"):
        assert callable(getattr(module, hook)), f"{cfg.config} has no {hook} hook"
    assert not cfg.preload_app, "--preload: workers would inherit the master's app, nothing reloads"
    assert cfg.pidfile, "deploy-all-pods.sh finds the master by gunicorn's pidfile"
    assert cfg.chdir in mount_paths(name, "app"), "the app directory must be the writable volume"


@pytest.mark.parametrize("name", WORKLOADS)
def test_gunicorn_app_is_the_examples_wsgi_app(name: str) -> None:
    (uri,) = parse_gunicorn(gunicorn_command(name)[1:]).app_uri
    module_name, _, attribute = uri.partition(":")
    path = EXAMPLE / "app" / f"{module_name.replace('.', '/')}.py"
    assert path.is_file(), f"{uri}: no {path.relative_to(ROOT)}"
    spec = importlib.util.spec_from_file_location(f"_k8s_example_{module_name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = getattr(module, attribute or "application")
    answers: list[str] = []
    body = b"".join(app({"PATH_INFO": health_path(name)}, lambda s, h: answers.append(s)))
    assert answers == ["200 OK"] and body


def commands_in(name: str) -> Iterator[tuple[str, list[str]]]:
    spec = pod_spec(name)
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        where = f"{name}: container {container['name']}"
        yield where, [*container.get("command", []), *container.get("args", [])]
        for hook, handler in container.get("lifecycle", {}).items():
            if "exec" in handler:
                yield f"{where} {hook}", handler["exec"]["command"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in container.get(kind, {}):
                yield f"{where} {kind}", container[kind]["exec"]["command"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_command_is_gunicorn_a_hotpatch_sub_command_or_a_known_utility(name: str) -> None:
    for where, argv in commands_in(name):
        assert argv, f"{where}: no command (the image's CMD would run unchecked)"
        if argv[0] == "gunicorn":
            parse_gunicorn(argv[1:])
        elif argv[0] == "hotpatch":
            run = subprocess.run(
                [*HOTPATCH_CLI, argv[1], "--help"],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, f"{where}: `hotpatch {argv[1]}` is no sub-command"
        else:
            assert argv[0] in UTILITIES, f"{where}: unexpected program {argv[0]!r}"


def test_dockerfile_cmd_is_the_deployments_command() -> None:
    dockerfile = (EXAMPLE / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    (cmd,) = [line for line in instructions if line.startswith("CMD ")]
    assert not [line for line in instructions if line.startswith("ENTRYPOINT")]
    assert json.loads(cmd.removeprefix("CMD ")) == gunicorn_command("deployment.yaml")
    (user,) = [line for line in instructions if line.startswith("USER ")]
    assert int(user.split()[1]) == pod_spec("deployment.yaml")["securityContext"]["runAsUser"]
    copy = next(line for line in instructions if line.startswith("COPY app/"))
    (init,) = pod_spec("deployment.yaml")["initContainers"]
    assert copy.split()[2].rstrip("/") == init["command"][2].removesuffix("/.")


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_hotpatch_variable_is_a_setting_with_a_valid_value(name: str) -> None:
    env = container_env(name)
    names = {k for k in env if k.startswith("HOTPATCH_")}
    known = {*ENV_VARS.values(), ENV_RUNTIME_DIR}
    assert names - known == set(), f"{name}: not hotpatch settings: {names - known}"
    load_settings(known_settings(env))  # raises ConfigError on a value hotpatch refuses


def health_path(name: str) -> str:
    settings = load_settings(known_settings(container_env(name)))
    assert settings.health_path is not None, f"{name}: set HOTPATCH_HEALTH_PATH"
    return settings.health_path


@pytest.mark.parametrize("name", WORKLOADS)
def test_probes_ask_the_health_path_on_the_served_port(name: str) -> None:
    cfg = parse_gunicorn(gunicorn_command(name)[1:])
    (bind,) = cfg.bind
    ports = {p["name"]: p["containerPort"] for p in app_container(name)["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = probe(name, kind)["httpGet"]
        assert get["path"] == health_path(name), f"{name}: {kind} path"
        assert ports.get(get["port"], get["port"]) == int(bind.rsplit(":", 1)[1]), f"{kind} port"


@pytest.mark.parametrize("name", WORKLOADS)
def test_liveness_outlasts_hotpatchs_longest_rollback(name: str) -> None:
    cfg = parse_gunicorn(gunicorn_command(name)[1:])
    s = load_settings(known_settings(container_env(name)))
    retire_s = s.retire_timeout_s if s.retire_timeout_s is not None else cfg.graceful_timeout + 5
    rollback_s = cfg.workers * (s.boot_timeout_s + s.health_timeout_s) + s.settle_s + retire_s
    liveness = window_s(probe(name, "livenessProbe"))
    readiness = window_s(probe(name, "readinessProbe"))
    assert liveness > rollback_s, f"{name}: liveness kills after {liveness} s < {rollback_s} s"
    assert readiness < liveness, "readiness must take the pod out long before liveness acts"
    assert window_s(probe(name, "startupProbe")) >= s.boot_timeout_s + s.health_timeout_s


@pytest.mark.parametrize("name", WORKLOADS)
def test_grace_period_covers_prestop_and_gunicorns_graceful_timeout(name: str) -> None:
    cfg = parse_gunicorn(gunicorn_command(name)[1:])
    pre_stop = app_container(name)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_spec(name)["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + cfg.graceful_timeout


def mount_paths(name: str, volume: str | None = None) -> set[str]:
    return {
        m["mountPath"]
        for m in app_container(name)["volumeMounts"]
        if volume is None or m["name"] == volume
    }


@pytest.mark.parametrize("name", WORKLOADS)
def test_runs_as_non_root_with_a_read_only_root_and_private_state_on_volumes(name: str) -> None:
    spec = pod_spec(name)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for container in [*spec["initContainers"], *spec["containers"]]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in app_container(name)["volumeMounts"]}
    # hotpatch's runtime directory defaults to /tmp/hotpatch-<uid>, made 0700 by the master.
    assert "emptyDir" in mounts["/tmp"]
    env = container_env(name)
    for var in (ENV_RUNTIME_DIR, "HOTPATCH_RELEASES_DIR", "HOTPATCH_STATE_DIR"):
        # An emptyDir is mode 0777: hotpatch refuses it (and any directory below it for
        # releases); only the default (a directory hotpatch creates in it) passes its check.
        assert var not in env, f"{name}: {var} on an emptyDir would be refused"
    (init,) = spec["initContainers"]
    assert init["command"][3].rstrip("/") == parse_gunicorn(gunicorn_command(name)[1:]).chdir


# -- the analysis ------------------------------------------------------------------------------


def analysis_metrics() -> list[dict[str, Any]]:
    metrics: list[dict[str, Any]] = one("analysis-template.yaml")["spec"]["metrics"]
    return metrics


def strip_strings(query: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)


def check_promql(query: str) -> None:
    """Only the fixed metric names, their labels and the scrape's pod-hash label; code classes."""
    query = re.sub(r"\{\{\s*args\.[\w-]+\s*\}\}", "ARG", query)
    query = re.sub(r"\[[^\]]*\]", "", query)  # range selectors
    selectors = re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", query)
    assert selectors, f"no selector in {query}"
    for metric, matchers in selectors:
        base = metric
        if metric.endswith(("_bucket", "_sum", "_count")):
            base = metric.rsplit("_", 1)[0]
            assert base in HISTOGRAMS, f"{metric}: not a histogram series"
        assert base in FIXED_METRICS, f"{metric}: not one of hotpatch's metric names"
        allowed = FIXED_METRICS[base] | SCRAPE_LABELS | ({"le"} if metric != base else set())
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in allowed, f"{metric}: no label {label!r}"
            if label == "code_class" and op == "=":
                assert value in CODE_CLASSES, f"code_class {value!r}"
    bare = strip_strings(query)
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", bare):
        for label in re.findall(r"\w+", labels):
            assert label in {"le", *SCRAPE_LABELS, *set().union(*FIXED_METRICS.values())}, label
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", bare)
    for word in re.findall(r"[A-Za-z_][\w:]*", bare):
        if word in PROMQL_WORDS:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", word)
        assert base in FIXED_METRICS, f"{word!r}: neither a PromQL word nor a hotpatch metric"


def test_analysis_queries_use_only_hotpatchs_metric_names_and_labels() -> None:
    for metric in analysis_metrics():
        check_promql(metric["provider"]["prometheus"]["query"])


def test_analysis_judges_canary_against_stable_on_errors_and_latency() -> None:
    queries = {m["name"]: m["provider"]["prometheus"]["query"] for m in analysis_metrics()}
    hashes = {"{{args.canary-hash}}", "{{args.stable-hash}}"}
    uses = {name: {h for h in hashes if h in q} for name, q in queries.items()}
    assert any('code_class="5xx"' in q and uses[n] == hashes for n, q in queries.items())
    assert any("histogram_quantile(0.99" in q and uses[n] == hashes for n, q in queries.items())
    for metric in analysis_metrics():
        assert "successCondition" in metric, metric["name"]


def test_analysis_arguments_are_declared_and_given_by_the_rollout() -> None:
    template = one("analysis-template.yaml")
    declared = {a["name"]: a for a in template["spec"]["args"]}
    used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", yaml.safe_dump(template["spec"])))
    assert used <= set(declared), f"undeclared args: {used - set(declared)}"
    required = {n for n, a in declared.items() if "value" not in a and "valueFrom" not in a}
    steps = one("rollout.yaml")["spec"]["strategy"]["canary"]["steps"]
    analyses = [s["analysis"] for s in steps if "analysis" in s]
    assert analyses, "the Rollout's canary steps never run the analysis"
    for analysis in analyses:
        assert [t["templateName"] for t in analysis["templates"]] == [template["metadata"]["name"]]
        given = {a["name"]: a for a in analysis["args"]}
        assert required <= set(given), f"missing args: {required - set(given)}"
        assert given["canary-hash"]["valueFrom"]["podTemplateHashValue"] == "Latest"
        assert given["stable-hash"]["valueFrom"]["podTemplateHashValue"] == "Stable"


def test_the_pod_hash_label_reaches_the_series() -> None:
    monitor = one("podmonitor.yaml")["spec"]
    assert POD_HASH_LABEL in monitor["podTargetLabels"]
    annotations = one("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in app_container("deployment.yaml")["ports"]}
    assert (
        int(annotations["prometheus.io/port"]) == ports[monitor["podMetricsEndpoints"][0]["port"]]
    )
    env = container_env("deployment.yaml")
    assert int(env["HOTPATCH_METRICS_PORT"]) == int(annotations["prometheus.io/port"])
    assert env.get("HOTPATCH_METRICS_ADDR") == "0.0.0.0", "the kubelet's pod IP must reach it"


def test_fixed_metric_names_match_the_prometheus_export() -> None:
    spec = importlib.util.find_spec("hotpatch.gunicorn._prometheus")
    assert spec is not None and spec.origin is not None
    defined: dict[str, frozenset[str]] = {}
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"Counter", "Gauge", "Histogram"}
        ):
            name = node.args[0]
            assert isinstance(name, ast.Constant)
            labels = node.args[2] if len(node.args) > 2 else ast.List(elts=[])
            assert isinstance(labels, ast.List)
            metric = str(name.value)
            if node.func.id == "Counter" and not metric.endswith("_total"):
                metric += "_total"
            defined[metric] = frozenset(
                str(e.value) for e in labels.elts if isinstance(e, ast.Constant)
            )
    assert defined == FIXED_METRICS


# -- the shell script --------------------------------------------------------------------------

SCRIPT = EXAMPLE / "deploy-all-pods.sh"


def test_script_parses() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    run = subprocess.run(
        [bash, "-n", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr


def deploy_help() -> str:
    run = subprocess.run(
        [*HOTPATCH_CLI, "deploy", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_script_passes_only_real_flags_of_hotpatch_deploy() -> None:
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r"hotpatch deploy ([^)\n]*)", text)
    calls = [c for c in calls if "--" in c]
    assert calls, "the script never runs `hotpatch deploy`"
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", deploy_help()))
    for call in calls:
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", call):
            assert flag in flags, f"`hotpatch deploy {flag}` does not exist"
    choices = re.search(r"--strategy \{([^}]*)\}", deploy_help())
    assert choices is not None
    (case,) = re.findall(r'case "\$strategy" in ([^)]*)\)', text)
    assert set(case.split("|")) <= set(choices.group(1).split(","))


def test_script_defaults_match_the_deployment() -> None:
    text = SCRIPT.read_text()

    def default(variable: str) -> str:
        found = re.search(rf'^{variable}="([^"]*)"$', text, flags=re.MULTILINE)
        assert found is not None, variable
        return found.group(1)

    cfg = parse_gunicorn(gunicorn_command("deployment.yaml")[1:])
    assert default("pidfile") == cfg.pidfile
    assert default("app_dir") == cfg.chdir
    assert default("container") == app_container("deployment.yaml")["name"]


def code_in_markdown(path: Path) -> list[str]:
    text = path.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.DOTALL)
    return [*blocks, *re.findall(r"`([^`\n]+)`", prose)]


def sub_command_help(sub: str, cache: dict[str, str | None]) -> str | None:
    if sub not in cache:
        run = subprocess.run(
            [*HOTPATCH_CLI, sub, "--help"], check=False, capture_output=True, text=True, timeout=60
        )
        cache[sub] = run.stdout if run.returncode == 0 else None
    return cache[sub]


def test_hotpatch_commands_shown_in_the_docs_exist_with_their_flags() -> None:
    command = re.compile(r"(?:^|\$ |-- |&& |\|\| )hotpatch ([a-z][a-z-]*)([^\n`;|&)]*)", re.M)
    cache: dict[str, str | None] = {}
    seen: set[str] = set()
    for path in (DOC, EXAMPLE / "README.md"):
        for code in code_in_markdown(path):
            for sub, rest in command.findall(code.replace("\\\n", " ")):
                help_text = sub_command_help(sub, cache)
                assert help_text is not None, f"{path.name}: `hotpatch {sub}` is no sub-command"
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
                    assert flag in help_text, f"{path.name}: `hotpatch {sub} {flag}` does not exist"
                seen.add(sub)
    assert {"deploy", "status"} <= seen
