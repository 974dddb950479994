"""Shared test plumbing: the ``lab`` marker and a lab fixture factory.

Tests marked ``@pytest.mark.lab`` build network namespaces, TAPs and send
packets, so they only run inside a throw-away sandbox:

    vswitch sandbox -- python -m pytest

Outside one they are skipped, except under CI (``CI=true``), where a skipped
lab test would hide a broken dataplane: there they fail instead.
"""

from __future__ import annotations

import os
import subprocess
from typing import Callable, Iterator

import pytest
import yaml

from vswitch import lab as vlab
from vswitch.sandbox import in_sandbox

LAB_SKIP_REASON = "needs `vswitch sandbox -- python -m pytest`"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # tryfirst: decide before any fixture (which might touch the network) is set up.
    if item.get_closest_marker("lab") is None or in_sandbox():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"lab test outside a sandbox under CI=true (CI must not skip it): {LAB_SKIP_REASON}",
                    pytrace=False)
    pytest.skip(LAB_SKIP_REASON)


def pexec(name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``cmd`` in lab member ``name`` (node, pod, external); output captured as text."""
    return vlab.exec_in(name, list(cmd), timeout=timeout)


def _down_if_up() -> None:
    try:
        vlab.down()
    except vlab.LabError:  # nothing up: lab.up already tore down a half-built lab
        pass


@pytest.fixture
def make_lab(tmp_path) -> Iterator[Callable[[dict], dict]]:
    """Factory: ``st = make_lab(topology_dict)`` brings a lab up; it is torn down after the test.

    Only one lab can be up at a time (its state lives in /run/vswitch/lab).
    """
    if not in_sandbox():  # the marker hook should have stopped us already; never touch the host
        pytest.fail("make_lab used outside a vswitch sandbox (mark the test @pytest.mark.lab)", pytrace=False)
    if vlab.state() is not None:  # a previous test leaked its lab: do not build on top of it
        _down_if_up()
    count = 0

    def up(topology: dict) -> dict:
        nonlocal count
        count += 1
        path = tmp_path / f"topology-{count}.yaml"
        path.write_text(yaml.safe_dump(topology, sort_keys=False))
        return vlab.up(str(path), log=lambda *a: None)

    try:
        yield up
    finally:
        _down_if_up()


def service_manifest(name: str, vip: str, port: int, target: int, proto: str, endpoint: str,
                     node: str = "n1") -> str:
    """YAML of a one-port ClusterIP Service and its EndpointSlice with one ready endpoint."""
    return yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": vip, "ports": [{"port": port, "targetPort": target, "protocol": proto}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"port": target, "protocol": proto}],
         "endpoints": [{"addresses": [endpoint], "nodeName": node}]}])
