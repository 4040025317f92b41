"""deploy/ cannot rot: every ``outrider`` command in the Dockerfile and the Kubernetes manifests is
parsed by the CLI's own parser, with the environment the manifest gives it; every ``OUTRIDER_…``
variable they set is one a flag of that command reads; probes and Prometheus annotations point at
the ports the command really listens on.

No Docker or cluster here: this checks what the files say against what the CLI accepts, which is
what breaks when a flag is renamed. (The image's build steps are those of ``pip install .``, which
.ci/run performs on every run.)
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from agent.cli import build_parser
from agent.cli_reference import commands

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
ENV_IN_HELP = re.compile(r"\[env (OUTRIDER_\w+)\]")


@dataclass
class Invocation:
    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    container: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    siblings: dict[int, str] = field(default_factory=dict)  # port -> the other container of the pod that has it


def parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` as ``outrider`` would parse it with ``env`` set (flags read their variables when the
    parser is built). A usage error fails the test with argparse's own line."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            return build_parser().parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"outrider {shlex.join(argv)} is refused by the CLI (exit {stop.code})")


def command_parser(argv: list[str]) -> tuple[str, argparse.ArgumentParser]:
    """The (sub)command ``argv`` runs, and its parser: the longest command name its words spell."""
    found = dict(commands(build_parser()))
    words = ["outrider"] + [a for a in argv if not a.startswith("-")]
    for n in range(len(words), 0, -1):
        name = " ".join(words[:n])
        if name in found:
            return name, found[name]
    raise AssertionError(f"no outrider command in {argv}")


def env_names(parser: argparse.ArgumentParser) -> set[str]:
    return {m for a in parser._actions for m in ENV_IN_HELP.findall(a.help or "")}


def dockerfile_invocations() -> list[Invocation]:
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", final, re.M))
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M)[1])
    check = json.loads(re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", final, re.M)[1])
    assert entry == ["outrider"] and check[0] == "outrider"
    return [Invocation("Dockerfile CMD", cmd, env), Invocation("Dockerfile HEALTHCHECK", check[1:], env)]


def manifest_invocations() -> list[Invocation]:
    found = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            template = (doc or {}).get("spec", {}).get("template", {})
            containers = template.get("spec", {}).get("containers", [])
            for container in containers:
                if not container.get("image", "").startswith("outrider:"):
                    continue
                siblings = {port["containerPort"]: other["name"] for other in containers if other is not container
                            for port in other.get("ports", [])}
                argv = container.get("command", [])[1:] + container.get("args", [])
                # valueFrom (a Secret, the pod's name) is known only in the cluster: any printable value
                env = {e["name"]: e.get("value", "from-the-cluster") for e in container.get("env", [])}
                found.append(Invocation(f"{path.name}: {container['name']}", argv, env, container,
                                        template.get("metadata", {}).get("annotations", {}), siblings))
    return found


INVOCATIONS = dockerfile_invocations() + manifest_invocations()


def test_there_is_something_to_check():
    assert MANIFESTS and len(INVOCATIONS) >= 4
    assert {command_parser(i.argv)[0] for i in INVOCATIONS} >= {"outrider agent serve", "outrider agent proxy",
                                                                 "outrider collector serve", "outrider health"}


@pytest.mark.parametrize("inv", INVOCATIONS, ids=lambda i: i.where)
def test_every_command_is_accepted_by_the_cli(inv: Invocation, monkeypatch):
    args = parse(inv.argv, inv.env, monkeypatch)
    assert callable(args.func)


@pytest.mark.parametrize("inv", INVOCATIONS, ids=lambda i: i.where)
def test_every_outrider_variable_is_read_by_a_flag(inv: Invocation):
    """A misspelt or renamed variable would be ignored in silence: the server would run on a default."""
    name, parser = command_parser(inv.argv)
    known = env_names(parser)
    known |= env_names(command_parser(["health"])[1])  # the image's HEALTHCHECK runs in every container
    unknown = {n for n in inv.env if n.startswith("OUTRIDER_")} - known
    assert not unknown, f"{inv.where}: {name} reads no {sorted(unknown)}"


def port_of(address: str | None) -> int | None:
    return None if address is None else int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("inv", [i for i in INVOCATIONS if i.container], ids=lambda i: i.where)
def test_probes_and_scrapes_point_at_the_ports_served(inv: Invocation, monkeypatch):
    args = parse(inv.argv, inv.env, monkeypatch)
    listen, metrics = port_of(args.listen), port_of(getattr(args, "metrics", None))
    declared = {p["containerPort"] for p in inv.container.get("ports", [])}
    assert listen in declared, f"{inv.where}: --listen's port {listen} is not among the container's ports"
    http = port_of(getattr(args, "http_listen", None))
    assert http is None or http in declared, f"{inv.where}: --http-listen's port {http} is not declared"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = inv.container.get(kind)
        if probe is None:
            continue
        port = next(iter(v["port"] for k, v in probe.items() if k in ("grpc", "tcpSocket", "httpGet")))
        if "grpc" in probe or "tcpSocket" in probe:
            assert port == listen, f"{inv.where}: {kind} asks port {port}, the server listens on {listen}"
        else:
            assert port in declared
    if inv.annotations.get("prometheus.io/scrape") == "true":
        assert metrics is not None, f"{inv.where}: scraped, but serves no --metrics"
        assert int(inv.annotations["prometheus.io/port"]) == metrics
        assert metrics in declared
    health = inv.env.get("OUTRIDER_HEALTH_ADDRESS")
    if health is not None:  # the image's HEALTHCHECK must ask this container's server
        assert port_of(health) == listen, f"{inv.where}: OUTRIDER_HEALTH_ADDRESS is not --listen's port"


def test_the_image_healthcheck_asks_the_default_command_s_server(monkeypatch):
    cmd, check = dockerfile_invocations()
    served = parse(cmd.argv, cmd.env, monkeypatch)
    asked = parse(check.argv, check.env, monkeypatch)
    assert port_of(asked.address) == port_of(served.listen)


@pytest.mark.parametrize("inv", [i for i in INVOCATIONS if command_parser(i.argv)[0] == "outrider agent proxy"],
                         ids=lambda i: i.where)
def test_a_sidecar_proxy_points_at_its_pod_s_server(inv: Invocation, monkeypatch):
    """The proxy's --upstream is a port another container of the same pod serves, on loopback."""
    args = parse(inv.argv, inv.env, monkeypatch)
    for upstream in (args.upstream, args.upstream_http):
        if upstream is None:
            continue
        host, port = upstream.rsplit(":", 1)
        assert host in ("127.0.0.1", "localhost"), f"{inv.where}: a sidecar reaches its server on loopback"
        assert int(port) in inv.siblings, f"{inv.where}: no other container of the pod serves port {port}"
