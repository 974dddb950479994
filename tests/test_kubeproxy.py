"""Unit tests for vswitch.lab.kubeproxy: kube-proxy's iptables mode as iptables-restore input.

Expected rules and chain names come from kube-proxy's own test data
(kubernetes pkg/proxy/iptables/proxier_test.go, TestParseIPTablesData and
TestOverallIPTablesRules: Services ns1/svc1 .. ns4/svc4 on 172.30.0.4x,
endpoints 10.180.0.x, cluster CIDR 10.0.0.0/8). The last test loads the
rules with ``iptables-restore --test`` in a throw-away namespace and needs
the sandbox.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from nat.manifests import Endpoint, EndpointSlice, Service, ServicePort, load_text
from vswitch.lab.kubeproxy import endpoint_chain, port_proto_hash, probability, render

CLUSTER = "10.0.0.0/8"
NODE = "host"


def svc(name: str, ip: str, **kw) -> Service:
    port = ServicePort("p80", kw.pop("protocol", "TCP"), 80, 80, kw.pop("node_port", None))
    return Service(f"ns{name[-1]}", name, cluster_ips=(ip,), ports=(port,), **kw)


def eps(name: str, *endpoints: Endpoint, proto: str = "TCP") -> EndpointSlice:
    return EndpointSlice(f"ns{name[-1]}", f"{name}-abc", name, (("p80", proto, 80),), endpoints)


def ep(ip: str, node: str | None = None, **cond) -> Endpoint:
    return Endpoint((ip,), node_name=node, **cond)


def rules(services, slices, **kw) -> list:
    kw.setdefault("cluster_cidr", CLUSTER)
    return render(services, slices, node_name=NODE, **kw).splitlines()


def table(lines: list, name: str) -> list:
    start = lines.index(f"*{name}")
    return lines[start:lines.index("COMMIT", start) + 1]


def chain(lines: list, name: str) -> list:
    return [r for r in lines if r.startswith(f"-A {name} ")]


def target(rule: str) -> str:
    return rule.split(" -j ")[1].split()[0]


# --- names ---------------------------------------------------------------------------------------

def test_chain_names_hash_as_kube_proxy_does():
    # portProtoHash(servicePortName, lowercase protocol): values from proxier_test.go
    assert port_proto_hash("ns1/svc1:p80", "tcp") == "XPGD46QRK7WJZT7O"
    assert port_proto_hash("ns2/svc2:p80", "tcp") == "GNZBNJ2PO5MGZ6GT"
    assert port_proto_hash("ns4/svc4:p80", "tcp") == "4SW47YFZTEDKD3PK"
    # servicePortEndpointChainName: the endpoint "ip:port" is hashed in too
    assert endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.2:80") == "KUBE-SEP-LXVODXWDISEETFEF"
    assert endpoint_chain("ns4/svc4:p80", "tcp", "10.180.0.4:80") == "KUBE-SEP-UKSFD7AGPMPPLUHC"
    # and two every cluster has (kube-dns over UDP, the API server's Service)
    assert port_proto_hash("kube-system/kube-dns:dns", "udp") == "TCOU7JCQXEZGVUNU"
    assert port_proto_hash("default/kubernetes:https", "tcp") == "NPX46M4PTMTKRN6Y"


def test_unnamed_port_hashes_the_service_name_alone():
    s = Service("default", "web", cluster_ips=("10.96.0.10",), ports=(ServicePort("", "TCP", 80, 8080),))
    sl = EndpointSlice("default", "web-1", "web", (("", "TCP", 8080),), (ep("10.244.1.2"),))
    out = rules([s], [sl])
    h = port_proto_hash("default/web", "tcp")
    assert f'-A KUBE-SERVICES -m comment --comment "default/web cluster IP" -m tcp -p tcp -d 10.96.0.10 ' \
           f"--dport 80 -j KUBE-SVC-{h}" in out


# --- ClusterIP ----------------------------------------------------------------------------------

def test_cluster_ip_rules_are_kube_proxys():
    out = rules([svc("svc1", "172.30.0.41")], [eps("svc1", ep("10.180.0.1"))])
    nat = table(out, "nat")
    # the lines of TestOverallIPTablesRules for ns1/svc1 (kube-proxy >= 1.26)
    expected = [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 '
        "-j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        "-j KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT "
        "--to-destination 10.180.0.1:80",
    ]
    assert [r for r in nat if "ns1/svc1" in r] == expected
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in nat and ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]" in nat


def test_three_endpoints_get_one_third_one_half_then_the_rest():
    out = rules([svc("svc1", "172.30.0.41")],
                [eps("svc1", ep("10.180.0.3"), ep("10.180.0.1"), ep("10.180.0.2"))])
    dispatch = [r for r in chain(out, "KUBE-SVC-XPGD46QRK7WJZT7O") if "KUBE-SEP-" in r]
    assert [re.findall(r"--probability (\S+)", r) for r in dispatch] == [["0.3333333333"], ["0.5000000000"], []]
    # endpoints in kube-proxy's order: sorted as "ip:port" strings
    assert [target(r) for r in dispatch] == [endpoint_chain("ns1/svc1:p80", "tcp", f"10.180.0.{i}:80")
                                             for i in (1, 2, 3)]
    assert all("-m statistic --mode random" in r for r in dispatch[:2])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64, 1000])
def test_statistic_chain_gives_every_endpoint_one_nth(n):
    # rule i matches with p_i of what reaches it; what falls through reaches rule i+1
    reach, shares = 1.0, []
    for i in range(n):
        p = float(probability(n - i)) if i < n - 1 else 1.0
        shares.append(reach * p)
        reach *= 1 - p
    assert reach == pytest.approx(0, abs=1e-9)
    # %0.10f rounds each probability (the kernel then keeps 31 bits of it): uniform to 1e-6
    assert shares == pytest.approx([1 / n] * n, rel=1e-6)


def test_rendered_probabilities_multiply_out_to_uniform():
    out = rules([svc("svc1", "172.30.0.41")], [eps("svc1", *(ep(f"10.180.0.{i}") for i in range(1, 8)))])
    dispatch = [r for r in chain(out, "KUBE-SVC-XPGD46QRK7WJZT7O") if "KUBE-SEP-" in r]
    reach, shares = 1.0, []
    for r in dispatch:
        m = re.search(r"--probability (\S+)", r)
        p = float(m.group(1)) if m else 1.0
        shares.append(reach * p)
        reach *= 1 - p
    assert len(shares) == 7 and shares == pytest.approx([1 / 7] * 7, rel=1e-6)


def test_hairpin_masquerades_an_endpoint_reaching_itself_before_dnat():
    out = rules([svc("svc1", "172.30.0.41")], [eps("svc1", ep("10.180.0.1"))])
    sep = chain(out, "KUBE-SEP-SXIVWICOYRO3J4NJ")
    assert [target(r) for r in sep] == ["KUBE-MARK-MASQ", "DNAT"]
    assert "-s 10.180.0.1 " in sep[0]


def test_masquerade_mark_chains():
    out = rules([], [])
    assert chain(out, "KUBE-MARK-MASQ") == ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    assert chain(out, "KUBE-POSTROUTING") == [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully"]
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8000" in rules([], [], masquerade_bit=0x8000)


def test_hooks_and_kube_forward():
    out = rules([], [])
    nat, filt = table(out, "nat"), table(out, "filter")
    for hook in ("PREROUTING", "OUTPUT"):
        assert chain(nat, hook) == [f'-A {hook} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    assert [target(r) for r in chain(nat, "POSTROUTING")] == ["KUBE-POSTROUTING"]
    assert [target(r) for r in chain(filt, "FORWARD")] == ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES",
                                                            "KUBE-EXTERNAL-SERVICES"]
    assert all("--ctstate NEW" in r for r in chain(filt, "FORWARD") if target(r) in ("KUBE-SERVICES",
                                                                                     "KUBE-EXTERNAL-SERVICES"))
    assert [target(r) for r in chain(filt, "INPUT")] == ["KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS",
                                                          "KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL"]
    assert [target(r) for r in chain(filt, "OUTPUT")] == ["KUBE-PROXY-FIREWALL", "KUBE-SERVICES", "KUBE-FIREWALL"]
    fwd = chain(filt, "KUBE-FORWARD")
    assert fwd[0] == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    assert "--mark 0x4000/0x4000 -j ACCEPT" in fwd[1] and "--ctstate RELATED,ESTABLISHED -j ACCEPT" in fwd[2]


# --- NodePort, external IPs, LoadBalancer ---------------------------------------------------------

def test_nodeport_goes_through_the_external_chain_which_masquerades():
    out = rules([svc("svc3", "172.30.0.43", type="NodePort", node_port=30003)], [eps("svc3", ep("10.180.0.3"))])
    h = port_proto_hash("ns3/svc3:p80", "tcp")
    assert chain(out, "KUBE-NODEPORTS") == [
        f"-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 30003 -j KUBE-EXT-{h}"]
    assert chain(out, f"KUBE-EXT-{h}") == [
        f'-A KUBE-EXT-{h} -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" '
        "-j KUBE-MARK-MASQ",
        f"-A KUBE-EXT-{h} -j KUBE-SVC-{h}"]
    services = chain(table(out, "nat"), "KUBE-SERVICES")
    assert services[-1] == ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
                            'the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')


def test_nodeport_addresses_restrict_the_nodeports_jump():
    out = table(rules([], [], node_ips=["192.168.1.11"]), "nat")
    assert chain(out, "KUBE-SERVICES")[-1].endswith(" -d 192.168.1.11 -j KUBE-NODEPORTS")


def test_external_and_load_balancer_ips_jump_to_the_external_chain():
    s = Service("ns5", "svc5", type="LoadBalancer", cluster_ips=("172.30.0.45",),
                ports=(ServicePort("p80", "TCP", 80, 80, 30005),), external_ips=("192.168.99.55",),
                lb_ips=("5.6.7.8",))
    out = rules([s], [eps("svc5", ep("10.180.0.5"))])
    h = port_proto_hash("ns5/svc5:p80", "tcp")
    to_ext = {r.split(" -d ")[1].split()[0]: r for r in chain(out, "KUBE-SERVICES") if f"KUBE-EXT-{h}" in r}
    assert set(to_ext) == {"192.168.99.55", "5.6.7.8"}
    assert '"ns5/svc5:p80 external IP"' in to_ext["192.168.99.55"]
    assert '"ns5/svc5:p80 loadbalancer IP"' in to_ext["5.6.7.8"]


def test_local_policy_keeps_local_endpoints_and_client_address():
    s = svc("svc2", "172.30.0.42", type="NodePort", node_port=30002, external_traffic_policy="Local")
    out = rules([s], [eps("svc2", ep("10.180.0.2", "other"), ep("10.180.0.22", NODE))])
    h = port_proto_hash("ns2/svc2:p80", "tcp")
    ext = chain(out, f"KUBE-EXT-{h}")
    # pods and the node itself short-circuit to all endpoints; the rest only to local ones, unmasqueraded
    assert [target(r) for r in ext] == [f"KUBE-SVC-{h}", "KUBE-MARK-MASQ", f"KUBE-SVC-{h}", f"KUBE-SVL-{h}"]
    assert f"-s {CLUSTER} " in ext[0] and "--src-type LOCAL" in ext[1] and "--src-type LOCAL" in ext[2]
    local = endpoint_chain("ns2/svc2:p80", "tcp", "10.180.0.22:80")
    assert [target(r) for r in chain(out, f"KUBE-SVL-{h}")] == [local]
    assert len([r for r in chain(out, f"KUBE-SVC-{h}") if "KUBE-SEP-" in r]) == 2
    assert not [r for r in table(out, "filter") if "ns2/svc2" in r]


def test_local_policy_without_local_endpoint_drops_external_traffic():
    s = svc("svc2", "172.30.0.42", type="NodePort", node_port=3001, external_traffic_policy="Local",
            external_ips=("192.168.99.22",))
    out = rules([s], [eps("svc2", ep("10.180.0.2", "other"))])
    h = port_proto_hash("ns2/svc2:p80", "tcp")
    # the EXT chain still short-circuits pods and the node, then falls through (no KUBE-SVL)
    assert [target(r) for r in chain(out, f"KUBE-EXT-{h}")] == [f"KUBE-SVC-{h}", "KUBE-MARK-MASQ", f"KUBE-SVC-{h}"]
    assert f":KUBE-SVL-{h} - [0:0]" not in out
    # lines of kube-proxy's TestOverallIPTablesRules for ns2/svc2
    assert chain(out, "KUBE-EXTERNAL-SERVICES") == [
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp '
        "-d 192.168.99.22 --dport 80 -j DROP",
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype '
        "--dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP"]


def test_internal_traffic_policy_local():
    s = svc("svc8", "172.30.0.48", internal_traffic_policy="Local")
    h = port_proto_hash("ns8/svc8:p80", "tcp")
    out = rules([s], [eps("svc8", ep("10.180.0.8", "other"), ep("10.180.0.88", NODE))])
    assert target([r for r in chain(table(out, "nat"), "KUBE-SERVICES") if "172.30.0.48" in r][0]) == \
        f"KUBE-SVL-{h}"
    assert [target(r) for r in chain(out, f"KUBE-SVL-{h}")] == [
        "KUBE-MARK-MASQ", endpoint_chain("ns8/svc8:p80", "tcp", "10.180.0.88:80")]
    assert f":KUBE-SVC-{h} - [0:0]" not in out
    # endpoints elsewhere only: dropped, not rejected (the Service has endpoints)
    out = rules([s], [eps("svc8", ep("10.180.0.8", "other"))])
    assert [target(r) for r in chain(table(out, "nat"), "KUBE-SERVICES")] == ["KUBE-NODEPORTS"]
    assert chain(table(out, "filter"), "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -m comment --comment "ns8/svc8:p80 has no local endpoints" -m tcp -p tcp '
        "-d 172.30.0.48 --dport 80 -j DROP"]


# --- session affinity, endpoints ---------------------------------------------------------------------

def test_client_ip_affinity_checks_recent_lists_first():
    s = svc("svc7", "172.30.0.47", protocol="UDP", session_affinity="ClientIP", affinity_timeout=600)
    out = rules([s], [eps("svc7", ep("10.180.0.7"), ep("10.180.0.8"), proto="UDP")])
    h = port_proto_hash("ns7/svc7:p80", "udp")
    seps = [endpoint_chain("ns7/svc7:p80", "udp", f"10.180.0.{i}:80") for i in (7, 8)]
    dispatch = chain(out, f"KUBE-SVC-{h}")[1:]
    assert [target(r) for r in dispatch] == seps + seps
    for r, sep in zip(dispatch[:2], seps):
        assert f"-m recent --name {sep} --rcheck --seconds 600 --reap -j {sep}" in r
    assert "--probability 0.5000000000" in dispatch[2]
    for sep in seps:
        assert f"-m recent --name {sep} --set -m udp -p udp -j DNAT" in chain(out, sep)[1]


def test_endpoints_are_chosen_as_nat_services_chooses_them():
    s = svc("svc1", "172.30.0.41")
    h = port_proto_hash("ns1/svc1:p80", "tcp")

    def chosen(*endpoints):
        out = rules([s], [eps("svc1", *endpoints)])
        return [r.split("--comment ")[1].split('"')[1].split(" -> ")[1]
                for r in chain(out, f"KUBE-SVC-{h}") if "KUBE-SEP-" in r]

    assert chosen(ep("10.180.0.1"), ep("10.180.0.2", ready=False, serving=False)) == ["10.180.0.1:80"]
    # no ready endpoint: serving and terminating ones take over (KEP-1669)
    assert chosen(ep("10.180.0.1", ready=False, serving=True, terminating=True),
                  ep("10.180.0.2", ready=False, serving=False, terminating=True)) == ["10.180.0.1:80"]


def test_service_without_endpoints_is_rejected_in_the_filter_table():
    s = svc("svc6", "172.30.0.46", type="NodePort", node_port=30006, external_ips=("192.168.99.66",))
    out = rules([s], [eps("svc6")])
    filt = table(out, "filter")
    assert chain(filt, "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 '
        "--dport 80 -j REJECT --reject-with icmp-port-unreachable"]
    ext = chain(filt, "KUBE-EXTERNAL-SERVICES")
    assert len(ext) == 2 and all(r.endswith("-j REJECT --reject-with icmp-port-unreachable") for r in ext)
    assert "-d 192.168.99.66 --dport 80" in ext[0] and "-m addrtype --dst-type LOCAL" in ext[1]
    assert not [r for r in table(out, "nat") if "ns6/svc6" in r]  # no nat chain at all


def test_headless_and_external_name_services_get_nothing():
    docs = """
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"""
    m = load_text(docs)
    assert rules(m.services, m.slices) == rules([], [])


# --- whole ruleset -------------------------------------------------------------------------------

def test_every_jump_has_a_declared_chain_with_rules():
    # kube-proxy's own consistency check (checkIPTablesRuleJumps) over a mixed ruleset
    out = rules(*mixed(), pod_cidr="10.0.1.0/24")
    builtin = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "DNAT", "MASQUERADE"}
    for name in ("nat", "filter"):
        t = table(out, name)
        declared = {line[1:].split()[0] for line in t if line.startswith(":")}
        filled = {r.split()[1] for r in t if r.startswith("-A ")}
        jumped = {target(r) for r in t if " -j " in r} - builtin
        assert jumped <= declared and filled <= declared
        assert jumped - filled <= {"KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"}  # kube-proxy's always-empty ones
        assert t[-1] == "COMMIT"


def test_flannel_ip_masq():
    out = rules([], [], cluster_cidr="10.244.0.0/16", pod_cidr="10.244.1.0/24")
    assert chain(out, "POSTROUTING")[-1] == '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    c = '-m comment --comment "flanneld masq"'
    assert chain(out, "FLANNEL-POSTRTG") == [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully"]
    assert "FLANNEL-POSTRTG" not in "\n".join(rules([], []))


def test_large_clusters_drop_per_endpoint_comments():
    services = [svc(f"s{i}", f"172.30.{i // 250}.{i % 250 + 1}") for i in range(1, 502)]
    slices = [eps(s.name, ep(f"10.180.{i // 250}.{i % 250 + 1}"), ep(f"10.181.{i // 250}.{i % 250 + 1}"))
              for i, s in enumerate(services, 1)]
    out = rules(services, slices)  # 1002 endpoints: over kube-proxy's 1000
    seps = [r for r in out if r.startswith("-A KUBE-SEP-")]
    assert seps and not any("--comment" in r for r in seps)
    assert all("--comment" in r for r in chain(out, "KUBE-SERVICES"))


def mixed():
    services = [
        svc("svc1", "172.30.0.41"),
        svc("svc2", "172.30.0.42", type="NodePort", node_port=30002, external_traffic_policy="Local"),
        svc("svc3", "172.30.0.43", type="NodePort", node_port=30003, session_affinity="ClientIP"),
        svc("svc4", "172.30.0.44", external_ips=("192.168.99.44",)),
        svc("svc6", "172.30.0.46", type="NodePort", node_port=30006),
        svc("svc7", "172.30.0.47", protocol="UDP", internal_traffic_policy="Local"),
    ]
    slices = [eps("svc1", ep("10.180.0.1")), eps("svc2", ep("10.180.0.2", NODE), ep("10.180.0.12", "other")),
              eps("svc3", ep("10.180.0.3"), ep("10.180.0.13"), ep("10.180.0.23")),
              eps("svc4", ep("10.180.0.4")), eps("svc6"), eps("svc7", ep("10.180.0.7", "other"), proto="UDP")]
    return services, slices


@pytest.mark.lab
def test_iptables_restore_accepts_the_rules():
    ns = f"kubeproxy-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        text = render(*mixed(), node_name=NODE, cluster_cidr=CLUSTER, pod_cidr="10.0.1.0/24")
        res = subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "--test"], input=text,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
