"""Unit tests for nat.manifests: Service/EndpointSlice parsing, validation, derived slices.

Every rejected input must raise ManifestError whose message names the object
(``Service default/web``) and the field path (``spec.ports[0].port``).
"""

from __future__ import annotations

import copy

import pytest

from nat.manifests import (Endpoint, EndpointSlice, ManifestError, Manifests, Service, ServicePort,
                           derive_slices, load_file, load_text, parse_documents)

REALISTIC = """\
# Pasted from kubectl, with the usual noise fields left in.
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations: {note: "unknown fields are ignored"}
  uid: 1c9e6b52-0000-0000-0000-000000000000
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  selector:
    app: web
    tier: frontend
  ports:
    - name: http
      port: 80
      targetPort: http-alt
    - name: dns
      protocol: UDP
      port: 53
      targetPort: 5353
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
  internalTrafficPolicy: Local
status:
  loadBalancer: {}
---
apiVersion: v1
kind: Service
metadata:
  name: api
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  selector: {app: api}
  ports:
    - port: 8080
      nodePort: 30080
  externalTrafficPolicy: Local
---
apiVersion: v1
kind: Service
metadata:
  name: front
  namespace: shop
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [192.0.2.7]
  selector: {app: web}
  ports:
    - name: https
      port: 443
      targetPort: 8443
      nodePort: 30443
status:
  loadBalancer:
    ingress:
      - ip: 203.0.113.5
        ipMode: VIP
      - hostname: lb.example.com
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
spec:
  clusterIP: None
  selector: {app: db}
  publishNotReadyAddresses: true
---
apiVersion: v1
kind: Service
metadata:
  name: upstream
spec:
  type: ExternalName
  externalName: api.example.com.
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: upstream-abc12
  labels:
    kubernetes.io/service-name: upstream
    endpointslice.kubernetes.io/managed-by: someone
addressType: IPv4
ports:
  - name: ""
    port: 8080
endpoints:
  - addresses: [10.244.1.5]
    nodeName: node-1
    zone: a
    targetRef: {kind: Pod, name: up-1}
  - addresses: ["10.244.2.6"]
    conditions:
      ready: false
      serving: true
      terminating: true
    nodeName: node-2
  - addresses: ["10.244.2.7"]
    conditions:
      ready: false
"""


def services(m: Manifests) -> dict:
    return {s.key: s for s in m.services}


# --- the realistic file --------------------------------------------------------------


def test_realistic_counts_and_keys():
    m = load_text(REALISTIC)
    assert [s.key for s in m.services] == [("shop", "web"), ("default", "api"), ("shop", "front"),
                                           ("shop", "db"), ("default", "upstream")]
    assert [s.key for s in m.slices] == [("default", "upstream-abc12")]


def test_realistic_clusterip_service():
    web = services(load_text(REALISTIC))[("shop", "web")]
    assert web.type == "ClusterIP"
    assert web.cluster_ips == ("10.96.0.10",) and web.cluster_ip == "10.96.0.10"
    assert not web.headless
    assert web.ports == (ServicePort("http", "TCP", 80, "http-alt", None), ServicePort("dns", "UDP", 53, 5353, None))
    assert web.selector == (("app", "web"), ("tier", "frontend"))
    assert web.selector_dict() == {"app": "web", "tier": "frontend"}
    assert (web.session_affinity, web.affinity_timeout) == ("ClientIP", 600)
    assert web.internal_traffic_policy == "Local" and web.external_traffic_policy == "Cluster"
    assert web.lb_ips == () and web.external_ips == () and web.external_name is None


def test_realistic_nodeport_service_defaults():
    api = services(load_text(REALISTIC))[("default", "api")]
    assert api.type == "NodePort"
    assert api.ports == (ServicePort("", "TCP", 8080, 8080, 30080),)  # protocol and targetPort defaulted
    assert api.external_traffic_policy == "Local"
    assert (api.session_affinity, api.affinity_timeout) == ("None", 10800)


def test_realistic_loadbalancer_takes_ingress_ips_and_skips_hostnames():
    front = services(load_text(REALISTIC))[("shop", "front")]
    assert front.lb_ips == ("203.0.113.5",)
    assert front.external_ips == ("192.0.2.7",)
    assert front.ports[0].node_port == 30443


def test_realistic_headless_and_external_name():
    s = services(load_text(REALISTIC))
    db = s[("shop", "db")]
    assert db.headless and db.cluster_ips == () and db.ports == () and db.publish_not_ready
    up = s[("default", "upstream")]
    assert up.type == "ExternalName" and up.external_name == "api.example.com."
    assert up.cluster_ips == () and not up.headless


def test_realistic_endpoint_slice_conditions():
    (sl,) = load_text(REALISTIC).slices
    assert sl.service == "upstream" and sl.ports == (("", "TCP", 8080),)
    assert sl.endpoints == (
        Endpoint(("10.244.1.5",), ready=True, serving=True, terminating=False, node_name="node-1"),
        Endpoint(("10.244.2.6",), ready=False, serving=True, terminating=True, node_name="node-2"),
        Endpoint(("10.244.2.7",), ready=False, serving=True, terminating=False, node_name=None),
    )


def test_results_are_frozen_and_hashable():
    web = services(load_text(REALISTIC))[("shop", "web")]
    with pytest.raises(AttributeError):
        web.name = "other"
    assert len({web, web}) == 1


# --- loading -----------------------------------------------------------------------------


def test_load_file_reads_and_locates_errors(tmp_path):
    good = tmp_path / "svc.yaml"
    good.write_text(REALISTIC)
    assert len(load_file(str(good)).services) == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(REALISTIC + "---\n" + REALISTIC.split("---\n")[1].replace("30080", "80"))
    with pytest.raises(ManifestError) as e:
        load_file(str(bad))
    assert str(e.value) == (f"{bad}: document 7: Service default/api: spec.ports[0].nodePort: "
                            "must be an integer from 30000 to 32767 (the node port range), got 80")
    assert (e.value.kind, e.value.name, e.value.field) == ("Service", "default/api", "spec.ports[0].nodePort")
    assert e.value.source == str(bad) and e.value.document == 7
    assert e.value.problem.startswith("must be an integer from 30000")


def test_load_file_missing_names_path(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError) as e:
        load_file(path)
    assert path in str(e.value) and "No such file" in str(e.value)
    assert e.value.source == path


def test_yaml_syntax_error_has_line_number():
    text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n   bad: [\n"
    with pytest.raises(ManifestError) as e:
        load_text(text, "x.yaml")
    assert str(e.value).startswith("x.yaml: not valid YAML at line 5")


def test_yaml_error_in_later_document_is_reported():
    text = "apiVersion: v1\nkind: Service\n---\nkey: [unclosed\n"
    with pytest.raises(ManifestError, match=r"not valid YAML at line \d"):
        load_text(text)


def test_without_source_no_location_prefix():
    with pytest.raises(ManifestError) as e:
        parse_documents([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}])
    assert str(e.value) == "Pod default/p: kind: unsupported kind Pod (supported: Service, EndpointSlice)"
    assert e.value.document == 1 and e.value.source == ""


def test_none_documents_are_skipped_but_counted():
    docs = [None, svc_doc(), None, {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"name": "d"}}]
    with pytest.raises(ManifestError) as e:
        parse_documents(docs, "in.yaml")
    assert str(e.value).startswith("in.yaml: document 4: Deployment default/d: kind: unsupported kind Deployment")


def test_empty_input_gives_nothing():
    m = load_text("")
    assert m.services == [] and m.slices == []


def test_kind_list_items_are_parsed():
    doc = {"apiVersion": "v1", "kind": "List", "items": [svc_doc(), slice_doc()]}
    m = parse_documents([doc])
    assert [s.name for s in m.services] == ["web"] and [s.name for s in m.slices] == ["web-1"]


def test_kind_list_error_names_item():
    bad = svc_doc()
    bad["spec"]["ports"][0]["port"] = 0
    doc = {"apiVersion": "v1", "kind": "List", "items": [slice_doc(), bad]}
    with pytest.raises(ManifestError) as e:
        parse_documents([doc], "list.yaml")
    assert str(e.value) == ("list.yaml: document 1 items[1]: Service default/web: spec.ports[0].port: "
                            "must be an integer from 1 to 65535, got 0")


def test_kind_list_items_must_be_a_list():
    with pytest.raises(ManifestError, match=r"List \?: items: must be a list"):
        parse_documents([{"apiVersion": "v1", "kind": "List", "items": {"a": 1}}])


def test_document_must_be_a_mapping():
    with pytest.raises(ManifestError, match=r"^f: document 1: must be a mapping \(a Kubernetes object\), got list"):
        parse_documents([[1, 2]], "f")


def test_parse_documents_refuses_a_single_dict():
    with pytest.raises(TypeError):
        parse_documents(svc_doc())


def test_bad_node_port_range_argument():
    with pytest.raises(ValueError, match="node_port_range"):
        parse_documents([], node_port_range=(40000, 30000))


# --- validation: helpers ------------------------------------------------------------------


def svc_doc(name: str = "web", **spec) -> dict:
    base = {"clusterIP": "10.96.0.10", "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": base}


def slice_doc(name: str = "web-1", **top) -> dict:
    d = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": ["10.244.1.5"]}]}
    d.update(top)
    return d


def error(*docs, **kw) -> str:
    with pytest.raises(ManifestError) as e:
        parse_documents(list(docs), **kw)
    return str(e.value)


def one_service(**spec) -> Service:
    (s,) = parse_documents([svc_doc(**spec)]).services
    return s


def one_slice(**top) -> EndpointSlice:
    (s,) = parse_documents([slice_doc(**top)]).slices
    return s


def test_helpers_build_valid_objects():
    assert one_service().ports == (ServicePort("http", "TCP", 80, 80, None),)
    assert one_slice().endpoints == (Endpoint(("10.244.1.5",)),)


# --- validation: kind, apiVersion, metadata ------------------------------------------------


def test_service_api_version():
    d = svc_doc()
    d["apiVersion"] = "apps/v1"
    assert error(d) == "Service default/web: apiVersion: must be v1, got 'apps/v1'"


def test_slice_api_version():
    d = slice_doc()
    d["apiVersion"] = "discovery.k8s.io/v1beta1"
    assert error(d) == ("EndpointSlice default/web-1: apiVersion: must be discovery.k8s.io/v1, "
                        "got 'discovery.k8s.io/v1beta1'")


def test_kind_required():
    d = svc_doc()
    del d["kind"]
    assert error(d).startswith("? default/web: kind: is required")


def test_unsupported_kind():
    d = svc_doc()
    d["kind"] = "Endpoints"
    assert error(d) == "Endpoints default/web: kind: unsupported kind Endpoints (supported: Service, EndpointSlice)"


def test_name_required():
    d = svc_doc()
    del d["metadata"]["name"]
    assert error(d) == "Service ?: metadata.name: is required"


@pytest.mark.parametrize("name", ["Web", "1web", "web_1", "web-", "a" * 64, "web.shop"])
def test_service_name_must_be_dns1035_label(name):
    d = svc_doc()
    d["metadata"]["name"] = name
    assert error(d).startswith(f"Service default/{name}: metadata.name: must be a valid name")


def test_service_name_63_chars_ok():
    d = svc_doc()
    d["metadata"]["name"] = "a" * 63
    assert parse_documents([d]).services[0].name == "a" * 63


def test_slice_name_is_a_subdomain():
    assert one_slice(metadata={"name": "web.abc-1", "labels": {"kubernetes.io/service-name": "web"}}).name == "web.abc-1"
    for bad in ["Web-1", "a" * 254, "web..1"]:
        d = slice_doc(bad)
        assert f"EndpointSlice default/{bad}: metadata.name: must be a valid name" in error(d)


def test_namespace_default_and_validated():
    assert one_service().namespace == "default"
    d = svc_doc()
    d["metadata"]["namespace"] = "Prod"
    assert error(d).startswith("Service Prod/web: metadata.namespace: must be a valid name")


# --- validation: Service type and cluster IPs ------------------------------------------------


def test_type_default_and_unknown():
    assert one_service().type == "ClusterIP"
    assert error(svc_doc(type="Ingress")) == ("Service default/web: spec.type: must be one of ClusterIP, NodePort, "
                                              "LoadBalancer, ExternalName, got 'Ingress'")


def test_cluster_ip_required():
    d = svc_doc()
    del d["spec"]["clusterIP"]
    assert error(d) == "Service default/web: spec.clusterIP: is required (vswitch does not allocate ClusterIPs)"
    assert "spec.clusterIP: is required" in error(svc_doc(clusterIP=""))


def test_cluster_ip_ipv6_refused():
    assert error(svc_doc(clusterIP="fd00::10")) == "Service default/web: spec.clusterIP: IPv6 is not supported, got fd00::10"


@pytest.mark.parametrize("ip", ["10.96.0.300", "010.96.0.1", "web", 167772161, "0.0.0.0", "127.0.0.1"])
def test_cluster_ip_must_be_usable_ipv4(ip):
    assert error(svc_doc(clusterIP=ip)).startswith("Service default/web: spec.clusterIP: must ")


def test_cluster_ips_alone_is_enough():
    d = svc_doc(clusterIPs=["10.96.0.11"])
    del d["spec"]["clusterIP"]
    assert parse_documents([d]).services[0].cluster_ips == ("10.96.0.11",)


def test_cluster_ips_first_must_match_cluster_ip():
    assert error(svc_doc(clusterIPs=["10.96.0.11"])) == ("Service default/web: spec.clusterIPs[0]: must equal "
                                                        "spec.clusterIP (10.96.0.10), got '10.96.0.11'")


def test_dual_stack_cluster_ips_refused():
    msg = error(svc_doc(clusterIPs=["10.96.0.10", "fd00::10"]))
    assert msg == "Service default/web: spec.clusterIPs[1]: IPv6 is not supported, got fd00::10"
    assert "spec.clusterIPs: must hold one IPv4 address" in error(svc_doc(clusterIPs=["10.96.0.10", "10.96.0.11"]))


def test_ip_families():
    assert error(svc_doc(ipFamilies=["IPv4", "IPv6"])) == "Service default/web: spec.ipFamilies[1]: IPv6 is not supported"
    assert "spec.ipFamilies[0]: must be one of IPv4, IPv6" in error(svc_doc(ipFamilies=["ipv4"]))
    assert "spec.ipFamilyPolicy: IPv6 is not supported" in error(svc_doc(ipFamilyPolicy="RequireDualStack"))
    assert "spec.ipFamilyPolicy: must be one of" in error(svc_doc(ipFamilyPolicy="Dual"))
    assert one_service(ipFamilyPolicy="PreferDualStack").cluster_ips == ("10.96.0.10",)


def test_headless_from_cluster_ips_none():
    d = svc_doc(clusterIPs=["None"], ports=[])
    del d["spec"]["clusterIP"]
    s = parse_documents([d]).services[0]
    assert s.headless and s.cluster_ips == ()


@pytest.mark.parametrize("stype", ["NodePort", "LoadBalancer"])
def test_headless_not_allowed_with_node_ports(stype):
    msg = error(svc_doc(type=stype, clusterIP="None", ports=[{"port": 80, "nodePort": 30080}]))
    assert msg == f"Service default/web: spec.clusterIP: may not be None (headless) for type {stype}"


# --- validation: ports ----------------------------------------------------------------------


def test_ports_required_unless_headless_or_external_name():
    assert error(svc_doc(ports=[])).startswith("Service default/web: spec.ports: is required")
    assert "spec.ports: is required" in error(svc_doc(ports=None))
    assert one_service(clusterIP="None", ports=[]).headless
    assert one_service(type="ExternalName", clusterIP=None, externalName="x.example.com", ports=[]).ports == ()


@pytest.mark.parametrize("port", [0, 65536, -1, "80", True, 80.0, None])
def test_port_range(port):
    msg = error(svc_doc(ports=[{"port": port}]))
    assert msg == f"Service default/web: spec.ports[0].port: must be an integer from 1 to 65535, got {port!r}"


def test_protocols():
    assert one_service(ports=[{"port": 53, "protocol": "UDP"}]).ports[0].protocol == "UDP"
    assert error(svc_doc(ports=[{"port": 80, "protocol": "SCTP"}])) == \
        "Service default/web: spec.ports[0].protocol: SCTP is not supported"
    assert error(svc_doc(ports=[{"port": 80, "protocol": "tcp"}])) == \
        "Service default/web: spec.ports[0].protocol: must be one of TCP, UDP, got 'tcp'"


def test_port_names_required_when_several():
    msg = error(svc_doc(ports=[{"name": "http", "port": 80}, {"port": 443}]))
    assert msg == "Service default/web: spec.ports[1].name: is required when the Service has more than one port"


def test_port_names_unique():
    msg = error(svc_doc(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]))
    assert msg == "Service default/web: spec.ports[1].name: duplicate port name 'http' (also spec.ports[0])"


def test_port_name_format():
    assert "spec.ports[0].name: must be a valid name" in error(svc_doc(ports=[{"name": "HTTP", "port": 80}]))


def test_duplicate_port_and_protocol():
    ports = [{"name": "a", "port": 53}, {"name": "b", "port": 53}]
    assert error(svc_doc(ports=ports)) == "Service default/web: spec.ports[1]: duplicate port 53/TCP (also spec.ports[0])"
    ports[1]["protocol"] = "UDP"  # DNS: the same number on both protocols is fine
    assert [p.protocol for p in one_service(ports=ports).ports] == ["TCP", "UDP"]


def test_target_port_default_number_and_name():
    s = one_service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "targetPort": 8081},
                           {"name": "c", "port": 82, "targetPort": "metrics-2"}])
    assert [p.target_port for p in s.ports] == [80, 8081, "metrics-2"]


@pytest.mark.parametrize("target", ["8080", "http_x", "a" * 16, "-http", "http-", "a--b", "HTTP", ""])
def test_target_port_bad_names(target):
    msg = error(svc_doc(ports=[{"port": 80, "targetPort": target}]))
    assert msg.startswith("Service default/web: spec.ports[0].targetPort: must be a port number from 1 to 65535 "
                          "or a container port name")


@pytest.mark.parametrize("target", [0, 65536, True])
def test_target_port_bad_numbers(target):
    msg = error(svc_doc(ports=[{"port": 80, "targetPort": target}]))
    assert msg == f"Service default/web: spec.ports[0].targetPort: must be an integer from 1 to 65535, got {target!r}"


def test_target_port_name_15_chars_ok():
    assert one_service(ports=[{"port": 80, "targetPort": "a" * 15}]).ports[0].target_port == "a" * 15


# --- validation: node ports -------------------------------------------------------------------


def test_node_port_only_for_node_port_types():
    msg = error(svc_doc(ports=[{"port": 80, "nodePort": 30080}]))
    assert msg == ("Service default/web: spec.ports[0].nodePort: may only be set for type NodePort or "
                   "LoadBalancer, not ClusterIP")


@pytest.mark.parametrize("stype", ["NodePort", "LoadBalancer"])
def test_node_port_required(stype):
    msg = error(svc_doc(type=stype))
    assert msg == "Service default/web: spec.ports[0].nodePort: is required (vswitch does not allocate node ports)"


def test_load_balancer_may_skip_node_ports():
    s = one_service(type="LoadBalancer", allocateLoadBalancerNodePorts=False)
    assert s.ports[0].node_port is None
    assert "spec.allocateLoadBalancerNodePorts: must be true or false" in \
        error(svc_doc(type="LoadBalancer", allocateLoadBalancerNodePorts="no"))


@pytest.mark.parametrize("np", [29999, 32768, 80, "30080"])
def test_node_port_default_range(np):
    msg = error(svc_doc(type="NodePort", ports=[{"port": 80, "nodePort": np}]))
    assert msg == ("Service default/web: spec.ports[0].nodePort: must be an integer from 30000 to 32767 "
                   f"(the node port range), got {np!r}")


def test_node_port_custom_range():
    d = svc_doc(type="NodePort", ports=[{"port": 80, "nodePort": 8080}])
    assert parse_documents([d], node_port_range=(8000, 9000)).services[0].ports[0].node_port == 8080
    assert "got 30080" in error(svc_doc(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
                                node_port_range=(8000, 9000))
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec: {type: NodePort, clusterIP: 10.96.0.1,\n" \
           "  ports: [{port: 80, nodePort: 8080}]}\n"
    assert load_text(text, node_port_range=(8000, 9000)).services[0].ports[0].node_port == 8080


def test_duplicate_node_port_names_both_services():
    a = svc_doc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    b = svc_doc("b", type="LoadBalancer", clusterIP="10.96.0.11",
                ports=[{"name": "x", "port": 81, "nodePort": 30081}, {"name": "y", "port": 82, "nodePort": 30080}])
    msg = error(a, b)
    assert msg == ("Service default/b: spec.ports[1].nodePort: 30080/TCP is already used by "
                   "Service default/a spec.ports[0]")


def test_same_node_port_other_protocol_ok():
    a = svc_doc("a", type="NodePort", ports=[{"port": 53, "nodePort": 30053}])
    b = svc_doc("b", type="NodePort", ports=[{"port": 53, "protocol": "UDP", "nodePort": 30053}])
    assert len(parse_documents([a, b]).services) == 2


def test_duplicate_node_port_within_one_service():
    d = svc_doc(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 30080},
                                        {"name": "b", "port": 81, "nodePort": 30080}])
    assert error(d) == ("Service default/web: spec.ports[1].nodePort: 30080/TCP is already used by "
                        "Service default/web spec.ports[0]")


# --- validation: affinity, traffic policies, external names and IPs ----------------------------


def test_session_affinity_values():
    assert one_service(sessionAffinity="ClientIP").affinity_timeout == 10800
    assert error(svc_doc(sessionAffinity="Cookie")) == \
        "Service default/web: spec.sessionAffinity: must be one of None, ClientIP, got 'Cookie'"


@pytest.mark.parametrize("timeout", [0, 86401, "60", True])
def test_affinity_timeout_range(timeout):
    d = svc_doc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}})
    assert error(d) == ("Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be an "
                        f"integer from 1 to 86400, got {timeout!r}")


def test_affinity_timeout_bounds_ok():
    for t in (1, 86400):
        cfg = {"clientIP": {"timeoutSeconds": t}}
        assert one_service(sessionAffinity="ClientIP", sessionAffinityConfig=cfg).affinity_timeout == t


def test_affinity_config_without_affinity_refused():
    d = svc_doc(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert error(d) == ("Service default/web: spec.sessionAffinityConfig: must not be set when "
                        "spec.sessionAffinity is None")


@pytest.mark.parametrize("value", ["OnlyLocal", "Global", "local"])
def test_external_traffic_policy_values(value):
    d = svc_doc(type="NodePort", ports=[{"port": 80, "nodePort": 30080}], externalTrafficPolicy=value)
    assert error(d) == f"Service default/web: spec.externalTrafficPolicy: must be one of Cluster, Local, got {value!r}"


def test_external_traffic_policy_local_needs_external_access():
    assert error(svc_doc(externalTrafficPolicy="Local")).startswith(
        "Service default/web: spec.externalTrafficPolicy: Local is only allowed for externally-accessible Services")
    assert one_service(externalTrafficPolicy="Local", externalIPs=["192.0.2.1"]).external_traffic_policy == "Local"
    assert one_service(externalTrafficPolicy="Cluster").external_traffic_policy == "Cluster"
    lb = one_service(type="LoadBalancer", externalTrafficPolicy="Local", ports=[{"port": 80, "nodePort": 30080}])
    assert lb.external_traffic_policy == "Local"


def test_internal_traffic_policy_values():
    assert one_service().internal_traffic_policy == "Cluster"
    assert "spec.internalTrafficPolicy: must be one of Cluster, Local, got 'Node'" in \
        error(svc_doc(internalTrafficPolicy="Node"))


def test_external_name_rules():
    base = {"type": "ExternalName", "clusterIP": None}
    assert error(svc_doc(**base)) == "Service default/web: spec.externalName: is required for type ExternalName"
    assert "spec.externalName: must be a DNS name" in error(svc_doc(externalName="Bad_Name", **base))
    assert one_service(externalName="db.example.com", **base).external_name == "db.example.com"
    msg = error(svc_doc(type="ExternalName", externalName="db.example.com"))  # keeps clusterIP 10.96.0.10
    assert msg == "Service default/web: spec.clusterIP: must not be set for type ExternalName"


def test_external_name_ignored_for_other_types():
    assert one_service(externalName="db.example.com").external_name is None


def test_external_ips():
    assert one_service(externalIPs=["192.0.2.1", "192.0.2.2"]).external_ips == ("192.0.2.1", "192.0.2.2")
    assert error(svc_doc(externalIPs=["192.0.2.1", "2001:db8::1"])) == \
        "Service default/web: spec.externalIPs[1]: IPv6 is not supported, got 2001:db8::1"
    assert "spec.externalIPs[0]: must be an IPv4 address, got 'host'" in error(svc_doc(externalIPs=["host"]))
    assert "spec.externalIPs: must be a list" in error(svc_doc(externalIPs="192.0.2.1"))


def test_load_balancer_ingress_ips():
    d = svc_doc(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30080}])
    d["status"] = {"loadBalancer": {"ingress": [{"hostname": "x.elb"}, {"ip": "2001:db8::5"}]}}
    assert error(d) == "Service default/web: status.loadBalancer.ingress[1].ip: IPv6 is not supported, got 2001:db8::5"
    d["status"]["loadBalancer"]["ingress"][1]["ip"] = "203.0.113.9"
    assert parse_documents([d]).services[0].lb_ips == ("203.0.113.9",)


def test_unknown_spec_fields_ignored():
    s = one_service(healthCheckNodePort=31000, loadBalancerSourceRanges=["0.0.0.0/0"], fancy={"x": 1})
    assert s.cluster_ips == ("10.96.0.10",)


def test_selector_values_must_be_strings():
    assert error(svc_doc(selector={"enabled": True})) == \
        "Service default/web: spec.selector[enabled]: must be a string (quote it in YAML), got True"
    assert "spec.selector[bad key!]: must be a label key" in error(svc_doc(selector={"bad key!": "x"}))
    assert one_service(selector={"app.kubernetes.io/name": "web"}).selector_dict() == {"app.kubernetes.io/name": "web"}


def test_publish_not_ready_must_be_bool():
    assert "spec.publishNotReadyAddresses: must be true or false" in error(svc_doc(publishNotReadyAddresses="yes"))


# --- validation: duplicates -------------------------------------------------------------------


def test_duplicate_service():
    msg = error(svc_doc(), svc_doc(), source="s.yaml")
    assert msg == ("s.yaml: document 2: Service default/web: metadata.name: duplicate Service default/web "
                   "(first in document 1)")


def test_same_name_other_namespace_or_kind_ok():
    other = svc_doc()
    other["metadata"]["namespace"] = "prod"
    named_like_service = slice_doc("web")
    m = parse_documents([svc_doc(), other, named_like_service])
    assert len(m.services) == 2 and len(m.slices) == 1


def test_duplicate_slice():
    assert "EndpointSlice default/web-1: metadata.name: duplicate EndpointSlice default/web-1" in \
        error(slice_doc(), slice_doc())


# --- validation: EndpointSlice ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["IPv6", "FQDN", "ipv4"])
def test_address_type_not_supported(kind):
    assert error(slice_doc(addressType=kind)) == \
        f"EndpointSlice default/web-1: addressType: addressType {kind} is not supported (only IPv4)"


def test_address_type_required():
    d = slice_doc()
    del d["addressType"]
    assert error(d) == "EndpointSlice default/web-1: addressType: is required (IPv4)"


def test_service_name_label_required():
    d = slice_doc()
    d["metadata"]["labels"] = {"app": "web"}
    assert error(d) == ("EndpointSlice default/web-1: metadata.labels[kubernetes.io/service-name]: is required "
                        "(the name of the Service this slice belongs to)")
    d["metadata"]["labels"] = {"kubernetes.io/service-name": "Web"}
    assert "metadata.labels[kubernetes.io/service-name]: must be a valid name" in error(d)


@pytest.mark.parametrize("addrs", [[], None, "10.0.0.1", ["10.0.0.1"] * 101])
def test_endpoint_addresses_non_empty_list(addrs):
    msg = error(slice_doc(endpoints=[{"addresses": addrs}]))
    assert msg.startswith("EndpointSlice default/web-1: endpoints[0].addresses: must be a list of 1 to 100 IPv4")


def test_endpoint_addresses_ipv4():
    msg = error(slice_doc(endpoints=[{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.1.6", "fd00::6"]}]))
    assert msg == "EndpointSlice default/web-1: endpoints[1].addresses[1]: IPv6 is not supported, got fd00::6"
    assert "endpoints[0].addresses[0]: must be an IPv4 address" in error(slice_doc(endpoints=[{"addresses": ["pod"]}]))


def test_endpoint_condition_defaults():
    eps = one_slice(endpoints=[
        {"addresses": ["10.244.1.1"]},
        {"addresses": ["10.244.1.2"], "conditions": {"ready": None}},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": False}},
        {"addresses": ["10.244.1.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.244.1.5"], "conditions": {"terminating": True}},
    ]).endpoints
    assert [(e.ready, e.serving, e.terminating) for e in eps] == [
        (True, True, False), (True, True, False), (False, True, False), (False, True, True), (True, True, True)]


def test_endpoint_conditions_must_be_bools():
    msg = error(slice_doc(endpoints=[{"addresses": ["10.244.1.1"], "conditions": {"ready": "yes"}}]))
    assert msg == "EndpointSlice default/web-1: endpoints[0].conditions.ready: must be true or false, got 'yes'"
    assert "endpoints[0].conditions.terminating: must be true or false" in \
        error(slice_doc(endpoints=[{"addresses": ["10.244.1.1"], "conditions": {"terminating": 1}}]))


def test_endpoint_node_name_optional_and_checked():
    eps = one_slice(endpoints=[{"addresses": ["10.244.1.1"], "nodeName": "node-1"},
                               {"addresses": ["10.244.1.2"]}]).endpoints
    assert [e.node_name for e in eps] == ["node-1", None]
    assert "endpoints[0].nodeName: must be a valid name" in \
        error(slice_doc(endpoints=[{"addresses": ["10.244.1.1"], "nodeName": "Node 1"}]))


def test_slice_ports():
    s = one_slice(ports=[{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "http", "port": 80}])
    assert s.ports == (("dns", "UDP", 53), ("http", "TCP", 80))
    assert one_slice(ports=None).ports == () and one_slice(endpoints=None).endpoints == ()


@pytest.mark.parametrize("port", [0, 65536, "80"])
def test_slice_port_range(port):
    assert error(slice_doc(ports=[{"port": port}])) == \
        f"EndpointSlice default/web-1: ports[0].port: must be an integer from 1 to 65535, got {port!r}"


def test_slice_port_null_refused():
    assert error(slice_doc(ports=[{"name": "http", "port": None}])).startswith(
        "EndpointSlice default/web-1: ports[0].port: is required")


def test_slice_port_protocol_and_names():
    assert error(slice_doc(ports=[{"port": 80, "protocol": "SCTP"}])) == \
        "EndpointSlice default/web-1: ports[0].protocol: SCTP is not supported"
    assert "ports[1].name: duplicate port name 'http'" in \
        error(slice_doc(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]))


def test_slice_metadata_labels_must_be_mapping():
    d = slice_doc()
    d["metadata"]["labels"] = ["kubernetes.io/service-name=web"]
    assert error(d) == "EndpointSlice default/web-1: metadata.labels: must be a mapping, got list"


# --- derive_slices ------------------------------------------------------------------------------


def svc(name="web", namespace="default", selector=None, ports=None, **kw) -> Service:
    sel = tuple(sorted((selector if selector is not None else {"app": name}).items()))
    return Service(namespace, name, cluster_ips=("10.96.0.10",), selector=sel,
                   ports=ports if ports is not None else (ServicePort("http", "TCP", 80, 8080),), **kw)


def pod(name, ip, labels=None, **kw) -> dict:
    return {"name": name, "ip": ip, "labels": labels if labels is not None else {"app": "web"}, "node": "node-1", **kw}


def test_derive_label_matching():
    pods = [pod("a", "10.244.1.1", {"app": "web", "tier": "fe", "extra": "x"}),
            pod("b", "10.244.1.2", {"app": "web", "tier": "be"}),
            pod("c", "10.244.1.3", {"tier": "fe"})]
    (sl,) = derive_slices([svc(selector={"app": "web", "tier": "fe"})], pods)
    assert sl == EndpointSlice("default", "web-derived", "web", (("http", "TCP", 8080),),
                               (Endpoint(("10.244.1.1",), True, True, False, "node-1"),))


def test_derive_respects_namespaces():
    pods = [pod("a", "10.244.1.1"), pod("b", "10.244.1.2", namespace="prod"), pod("c", "10.244.1.3", namespace="default")]
    slices = derive_slices([svc(), svc(namespace="prod")], pods)
    assert [(s.namespace, s.name, s.service) for s in slices] == [("default", "web-derived", "web"),
                                                                   ("prod", "web-derived", "web")]
    assert [e.addresses for e in slices[0].endpoints] == [("10.244.1.1",), ("10.244.1.3",)]
    assert [e.addresses for e in slices[1].endpoints] == [("10.244.1.2",)]


def test_derive_orders_by_pod_name():
    pods = [pod("web-c", "10.244.1.3"), pod("web-a", "10.244.1.9"), pod("web-b", "10.244.1.1")]
    (sl,) = derive_slices([svc()], pods)
    assert [e.addresses[0] for e in sl.endpoints] == ["10.244.1.9", "10.244.1.1", "10.244.1.3"]


def test_derive_named_target_ports():
    ports = (ServicePort("http", "TCP", 80, "web-http"), ServicePort("dns", "UDP", 53, 5353))
    pods = [pod("a", "10.244.1.1", ports={"web-http": 8080}), pod("b", "10.244.1.2"),  # b lacks web-http
            pod("c", "10.244.1.3", ports={"web-http": 8080, "other": 1})]
    (sl,) = derive_slices([svc(ports=ports)], pods)
    assert sl.ports == (("http", "TCP", 8080), ("dns", "UDP", 5353))
    assert [e.addresses[0] for e in sl.endpoints] == ["10.244.1.1", "10.244.1.3"]


def test_derive_named_port_resolving_differently_splits_slices():
    ports = (ServicePort("http", "TCP", 80, "web-http"),)
    pods = [pod("a", "10.244.1.1", ports={"web-http": 8080}), pod("b", "10.244.1.2", ports={"web-http": 9090}),
            pod("c", "10.244.1.3", ports={"web-http": 8080})]
    slices = derive_slices([svc(ports=ports)], pods)
    assert [(s.name, s.ports, len(s.endpoints)) for s in slices] == [
        ("web-derived", (("http", "TCP", 8080),), 2), ("web-derived-2", (("http", "TCP", 9090),), 1)]


def test_derive_not_ready_pods():
    pods = [pod("a", "10.244.1.1", ready=False), pod("b", "10.244.1.2", ready=True), pod("c", "10.244.1.3")]
    (sl,) = derive_slices([svc()], pods)
    assert [(e.ready, e.serving, e.terminating) for e in sl.endpoints] == [
        (False, False, False), (True, True, False), (True, True, False)]


def test_derive_publish_not_ready_addresses():
    (sl,) = derive_slices([svc(publish_not_ready=True)], [pod("a", "10.244.1.1", ready=False)])
    assert (sl.endpoints[0].ready, sl.endpoints[0].serving) == (True, False)


def test_derive_skips_pods_without_ip():
    (sl,) = derive_slices([svc()], [pod("a", None), pod("b", ""), pod("c", "10.244.1.3")])
    assert [e.addresses for e in sl.endpoints] == [("10.244.1.3",)]


def test_derive_no_selector_or_external_name_gives_no_slice():
    ext = Service("default", "ext", type="ExternalName", external_name="x.example.com", selector=(("app", "web"),))
    assert derive_slices([svc(selector={}), ext], [pod("a", "10.244.1.1")]) == []


def test_derive_no_matching_pods_gives_empty_slice():
    assert derive_slices([svc()], [pod("a", "10.244.1.1", {"app": "db"})]) == [
        EndpointSlice("default", "web-derived", "web", (), ())]


def test_derive_headless_service_gets_slice():
    headless = Service("default", "db", headless=True, selector=(("app", "db"),))
    (sl,) = derive_slices([headless], [pod("db-0", "10.244.1.7", {"app": "db"}, node="node-2")])
    assert sl.ports == () and sl.endpoints == (Endpoint(("10.244.1.7",), node_name="node-2"),)


def test_derive_from_parsed_manifests():
    m = load_text(REALISTIC)
    pods = [pod("w1", "10.244.1.1", {"app": "web", "tier": "frontend"}, namespace="shop", ports={"http-alt": 8081}),
            pod("w2", "10.244.2.1", {"app": "web"}, namespace="shop", node="node-2")]
    slices = {s.service: s for s in derive_slices(m.services, pods)}
    assert set(slices) == {"web", "api", "front", "db"}  # not the ExternalName upstream
    assert slices["web"].ports == (("http", "TCP", 8081), ("dns", "UDP", 5353))
    assert [e.addresses for e in slices["web"].endpoints] == [("10.244.1.1",)]
    assert [e.node_name for e in slices["front"].endpoints] == ["node-1", "node-2"]
    assert slices["api"].endpoints == ()


def test_derive_rejects_bad_pod_ip():
    with pytest.raises(ManifestError) as e:
        derive_slices([svc()], [pod("a", "10.244.1")])
    assert str(e.value) == "Pod default/a: ip: must be an IPv4 address, got '10.244.1'"


def test_derive_inputs_not_modified():
    pods = [pod("a", "10.244.1.1")]
    before = copy.deepcopy(pods)
    derive_slices([svc()], pods)
    assert pods == before
