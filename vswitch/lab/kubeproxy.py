"""kube-proxy's iptables mode and flannel's ip-masq, as ``iptables-restore`` input.

Kernel lab nodes load this so they program Services the way a real node does:
they are the reference vswitch's nat/ is checked against. The rules follow
kube-proxy's pkg/proxy/iptables/proxier.go (syncProxyRules,
writeServiceToEndpointRules, iptablesJumpChains, the kubelet's KUBE-FIREWALL)
and flannel's MasqRules (pkg/trafficmngr/iptables): same chains, names,
matches, order and comments, so ``iptables-save`` on a lab node reads like a
cluster's. kube-proxy settings modelled: its defaults (masquerade bit 14,
localhost NodePorts on, every local address answers NodePorts, iptables with
--random-fully, nf_conntrack_tcp_be_liberal off).

Endpoints are those nat/services.py picks (it builds the ServiceTable): the
ready ones, else serving+terminating; traffic policy Local keeps this node's.
Not modelled, as in nat/: topology hints, loadBalancerSourceRanges
(KUBE-FW-*), health check node ports.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from typing import Iterable, List, Optional, Sequence

from nat.services import ServiceTable

# kube-proxy drops per-endpoint comments beyond this many endpoints (largeClusterMode).
LARGE_CLUSTER_ENDPOINTS = 1000
FLANNEL_MARK = "0x4000/0x4000"  # flannel hard-codes kube-proxy's default mark
FLANNEL_COMMENT = "flanneld masq"
MULTICAST = "224.0.0.0/4"

# nat: (chain, hook, match) jumps, as a node ends up with them.
NAT_HOOKS = [
    ("PREROUTING", "KUBE-SERVICES", '-m comment --comment "kubernetes service portals"'),
    ("OUTPUT", "KUBE-SERVICES", '-m comment --comment "kubernetes service portals"'),
    ("POSTROUTING", "KUBE-POSTROUTING", '-m comment --comment "kubernetes postrouting rules"'),
]
# filter: kube-proxy prepends each jump, so a chain holds them in reverse order of its list; the
# kubelet's KUBE-FIREWALL was there first and stays last.
NEW = "-m conntrack --ctstate NEW "
FILTER_HOOKS = [
    ("INPUT", "KUBE-PROXY-FIREWALL", NEW + '-m comment --comment "kubernetes load balancer firewall"'),
    ("INPUT", "KUBE-NODEPORTS", '-m comment --comment "kubernetes health check service ports"'),
    ("INPUT", "KUBE-EXTERNAL-SERVICES", NEW + '-m comment --comment "kubernetes externally-visible service portals"'),
    ("INPUT", "KUBE-FIREWALL", ""),
    ("FORWARD", "KUBE-PROXY-FIREWALL", NEW + '-m comment --comment "kubernetes load balancer firewall"'),
    ("FORWARD", "KUBE-FORWARD", '-m comment --comment "kubernetes forwarding rules"'),
    ("FORWARD", "KUBE-SERVICES", NEW + '-m comment --comment "kubernetes service portals"'),
    ("FORWARD", "KUBE-EXTERNAL-SERVICES", NEW + '-m comment --comment "kubernetes externally-visible service portals"'),
    ("OUTPUT", "KUBE-PROXY-FIREWALL", NEW + '-m comment --comment "kubernetes load balancer firewall"'),
    ("OUTPUT", "KUBE-SERVICES", NEW + '-m comment --comment "kubernetes service portals"'),
    ("OUTPUT", "KUBE-FIREWALL", ""),
]


class Table:
    """One table of iptables-restore input: built-in chains, declared chains, rules, COMMIT."""

    def __init__(self, name: str, builtins: Sequence[str], chains: Sequence[str]) -> None:
        self.name = name
        self.chains = [f":{c} ACCEPT [0:0]" for c in builtins] + [f":{c} - [0:0]" for c in chains]
        self.rules: List[str] = []
        self.add = self.rules.append  # the hot path: one call per rule

    def chain(self, name: str) -> None:
        self.chains.append(f":{name} - [0:0]")

    def text(self) -> str:
        return "\n".join([f"*{self.name}", *self.chains, *self.rules, "COMMIT", ""])


# --- names -----------------------------------------------------------------------------------

def port_proto_hash(port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: base32 of sha256(servicePortName + protocol), 16 characters
    (iptables chain names stop at 28)."""
    return base64.b32encode(hashlib.sha256((port_name + protocol).encode()).digest())[:16].decode()


def endpoint_chain(port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-...: the same hash over servicePortName + protocol + "ip:port"."""
    return "KUBE-SEP-" + port_proto_hash(port_name, protocol + endpoint)


@lru_cache(maxsize=None)
def probability(n: int) -> str:
    """1/n as kube-proxy prints it (%0.10f)."""
    return f"{1.0 / n:0.10f}"


def comment(text: str) -> str:
    # iptables-restore splits arguments on spaces unless quoted; kube-proxy quotes the same way.
    return f'-m comment --comment "{text}"' if " " in text else f"-m comment --comment {text}"


# --- the whole ruleset -----------------------------------------------------------------------

def render(services: Iterable, slices: Iterable, *, node_name: str, node_ips: Optional[Sequence[str]] = None,
           cluster_cidr: str, masquerade_bit: int = 0x4000, pod_cidr: Optional[str] = None) -> str:
    """iptables-restore input (``*filter`` and ``*nat``) for one node.

    services, slices: nat.manifests Service and EndpointSlice objects. node_name picks the
    node's own endpoints (traffic policy Local). node_ips: the addresses NodePorts answer on,
    as ``--nodeport-addresses``; None (kube-proxy's default) means every local address.
    cluster_cidr: the pod network, kube-proxy's ``--cluster-cidr`` (off-cluster sources are
    masqueraded). masquerade_bit: the mark value itself (kube-proxy's
    1 << --iptables-masquerade-bit; 0x4000 for the default bit 14). pod_cidr: this node's pod
    CIDR; when given, flannel's ``--ip-masq`` rules are added.

    Tables are complete (built-in chains included): ``iptables-restore`` replaces them whole.
    """
    table = ServiceTable(node=node_name)
    table.apply(list(services), list(slices))
    mark = f"{masquerade_bit:#x}"
    nat = Table("nat", ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
                ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"))
    filt = Table("filter", ("INPUT", "FORWARD", "OUTPUT"),
                 ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                  "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"))
    _hooks(nat, filt)
    _masquerade(nat, mark)
    # route_localnet=1 (localhost NodePorts) would let outsiders reach 127/8: the kubelet's guard.
    filt.add('-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
             "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
    comments = sum(len(p.backends) for p in table.ports) <= LARGE_CLUSTER_ENDPOINTS
    for port in table.ports:
        ServicePortRules(port, cluster_cidr, comments).write(nat, filt)
    _nodeports_jump(nat, node_ips)
    _forward(filt, mark)
    if pod_cidr is not None:
        _flannel_masq(nat, cluster_cidr, pod_cidr)
    return filt.text() + nat.text()


def _hooks(nat: Table, filt: Table) -> None:
    for t, hooks in ((nat, NAT_HOOKS), (filt, FILTER_HOOKS)):
        for chain, target, match in hooks:
            t.add(f"-A {chain} {match} -j {target}" if match else f"-A {chain} -j {target}")


def _masquerade(nat: Table, mark: str) -> None:
    # The mark is cleared before MASQUERADE so a packet that loops through the stack again
    # (e.g. into a tunnel) is not masqueraded twice.
    nat.add(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
    nat.add(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
    nat.add('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully")
    nat.add(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")


def _nodeports_jump(nat: Table, node_ips: Optional[Sequence[str]]) -> None:
    # Last in KUBE-SERVICES: a ClusterIP or external IP rule must win over a node port.
    note = comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    if not node_ips:  # localhost NodePorts are on (route_localnet=1), so 127/8 is not excluded
        nat.add(f"-A KUBE-SERVICES {note} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
        return
    for ip in node_ips:
        nat.add(f"-A KUBE-SERVICES {note} -d {ip} -j KUBE-NODEPORTS")


def _forward(filt: Table, mark: str) -> None:
    # INVALID packets would otherwise reach a pod un-DNATed and reset the connection
    # (kubernetes#74839); kube-proxy skips this rule only when nf_conntrack_tcp_be_liberal is set.
    filt.add("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
    filt.add(f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
             "-j ACCEPT")
    filt.add('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
             "--ctstate RELATED,ESTABLISHED -j ACCEPT")


def _flannel_masq(nat: Table, cluster: str, pod_cidr: str) -> None:
    """flannel --ip-masq: pods going outside the cluster network are masqueraded to the node."""
    nat.chain("FLANNEL-POSTRTG")
    c = comment(FLANNEL_COMMENT)
    nat.add(f"-A POSTROUTING {c} -j FLANNEL-POSTRTG")
    nat.add(f"-A FLANNEL-POSTRTG -m mark --mark {FLANNEL_MARK} {c} -j RETURN")  # kube-proxy's, not twice
    nat.add(f"-A FLANNEL-POSTRTG -s {pod_cidr} -d {cluster} {c} -j RETURN")  # pod <-> pod stays as is
    nat.add(f"-A FLANNEL-POSTRTG -s {cluster} -d {pod_cidr} {c} -j RETURN")
    nat.add(f"-A FLANNEL-POSTRTG ! -s {cluster} -d {pod_cidr} {c} -j RETURN")  # outside -> local pods
    nat.add(f"-A FLANNEL-POSTRTG -s {cluster} ! -d {MULTICAST} {c} -j MASQUERADE --random-fully")
    nat.add(f"-A FLANNEL-POSTRTG ! -s {cluster} -d {cluster} {c} -j MASQUERADE --random-fully")  # host -> pods


# --- one Service port ---------------------------------------------------------------------------

class ServicePortRules:
    """The rules of one nat.services.ServicePort, in the order syncProxyRules writes them."""

    def __init__(self, port, cluster_cidr: str, comments: bool) -> None:
        svc, sp = port.svc, port.sp
        self.svc, self.sp, self.cluster, self.comments = svc, sp, cluster_cidr, comments
        self.name = port.key  # "ns/name:port", or "ns/name" for an unnamed port: ServicePortName.String()
        self.proto = sp.protocol.lower()
        h = port_proto_hash(self.name, self.proto)
        self.svc_chain, self.svl_chain, self.ext_chain = f"KUBE-SVC-{h}", f"KUBE-SVL-{h}", f"KUBE-EXT-{h}"
        self.external = bool(sp.node_port or svc.external_ips or svc.lb_ips)
        internal_local = svc.internal_traffic_policy == "Local"
        self.external_local = svc.external_traffic_policy == "Local"
        # Cluster endpoints also serve Local external policy: pods and the node itself short-circuit.
        uses_cluster = not internal_local or self.external
        uses_local = internal_local or (self.external_local and self.external)
        usable, local = _by_address(port.usable), _by_address(port.local)
        self.cluster_eps = usable if uses_cluster else []
        self.local_eps = local if uses_local else []
        self.reachable = self.cluster_eps if uses_cluster else self.local_eps  # local ones are usable too
        self.has_eps = bool(usable)
        self.has_internal = self.has_eps and (not internal_local or bool(local))
        self.has_external = self.has_eps and (not self.external_local or bool(local))
        self.internal_chain = self.svl_chain if internal_local else self.svc_chain
        self.external_policy_chain = self.svl_chain if self.external_local else self.svc_chain
        self.match = f"-m {self.proto} -p {self.proto}"
        self.sep = {ep: endpoint_chain(self.name, self.proto, ep) for ep in self.reachable}

    def write(self, nat: Table, filt: Table) -> None:
        self._entry_points(nat, filt)
        if self.has_internal:
            self._masquerade_off_cluster(nat)
        if self.has_eps and self.external:
            self._external_chain(nat)
        if self.cluster_eps:
            self._dispatch(nat, self.svc_chain, self.cluster_eps)
        if self.local_eps:
            self._dispatch(nat, self.svl_chain, self.local_eps)
        for ep in self.reachable:
            self._endpoint(nat, ep)

    # Where packets come in: KUBE-SERVICES (ClusterIP, external and LB IPs), KUBE-NODEPORTS;
    # what has no usable endpoint is refused in the filter table.
    def _entry_points(self, nat: Table, filt: Table) -> None:
        name, m, port = self.name, self.match, self.sp.port
        if self.has_eps:
            reason, target = f"{name} has no local endpoints", "DROP"  # only used for Local policies
        else:
            reason, target = f"{name} has no endpoints", "REJECT --reject-with icmp-port-unreachable"
        vip = self.svc.cluster_ips[0]
        if self.has_internal:
            nat.add(f"-A KUBE-SERVICES {comment(name + ' cluster IP')} {m} -d {vip} --dport {port} "
                    f"-j {self.internal_chain}")
        else:
            filt.add(f"-A KUBE-SERVICES {comment(reason)} {m} -d {vip} --dport {port} -j {target}")
        for kind, ips in (("external IP", self.svc.external_ips), ("loadbalancer IP", self.svc.lb_ips)):
            for ip in ips:
                if self.has_eps:
                    nat.add(f"-A KUBE-SERVICES {comment(f'{name} {kind}')} {m} -d {ip} --dport {port} "
                            f"-j {self.ext_chain}")
                if not self.has_external:
                    filt.add(f"-A KUBE-EXTERNAL-SERVICES {comment(reason)} {m} -d {ip} --dport {port} -j {target}")
        if self.sp.node_port:
            if self.has_eps:
                nat.add(f"-A KUBE-NODEPORTS {comment(name)} {m} --dport {self.sp.node_port} -j {self.ext_chain}")
            if not self.has_external:
                filt.add(f"-A KUBE-EXTERNAL-SERVICES {comment(reason)} -m addrtype --dst-type LOCAL {m} "
                         f"--dport {self.sp.node_port} -j {target}")

    def _masquerade_off_cluster(self, nat: Table) -> None:
        # A client outside the pod network (the node, or a host routing the Service CIDR to it) may
        # reach an endpoint on another node, whose reply must come back through this one.
        nat.add(f"-A {self.internal_chain} {comment(self.name + ' cluster IP')} {self.match} "
                f"-d {self.svc.cluster_ips[0]} --dport {self.sp.port} ! -s {self.cluster} -j KUBE-MARK-MASQ")

    def _external_chain(self, nat: Table) -> None:
        ext, name = self.ext_chain, self.name
        nat.chain(ext)
        if not self.external_local:  # the endpoint may be on another node: its reply must come back here
            nat.add(f"-A {ext} {comment(f'masquerade traffic for {name} external destinations')} -j KUBE-MARK-MASQ")
        else:
            # Pods and the node itself are not subject to the policy (as if the LB sent them back in);
            # the node's own source address is a local one, hence the masquerade.
            nat.add(f"-A {ext} {comment(f'pod traffic for {name} external destinations')} -s {self.cluster} "
                    f"-j {self.svc_chain}")
            nat.add(f"-A {ext} {comment(f'masquerade LOCAL traffic for {name} external destinations')} "
                    "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
            nat.add(f"-A {ext} {comment(f'route LOCAL traffic for {name} external destinations')} "
                    f"-m addrtype --src-type LOCAL -j {self.svc_chain}")
        if self.has_external:
            nat.add(f"-A {ext} -j {self.external_policy_chain}")

    def _dispatch(self, nat: Table, chain: str, endpoints: List[str]) -> None:
        """Affinity first (a known client goes back to its endpoint), then endpoint i of n with
        probability 1/(n-i): each of the n gets 1/n overall."""
        nat.chain(chain)
        name, n = self.name, len(endpoints)
        if self.svc.session_affinity == "ClientIP":
            for ep in endpoints:
                note = f"{comment(f'{name} -> {ep}')} " if self.comments else ""
                nat.add(f"-A {chain} {note}-m recent --name {self.sep[ep]} --rcheck "
                        f"--seconds {self.svc.affinity_timeout} --reap -j {self.sep[ep]}")
        for i, ep in enumerate(endpoints):
            note = f"{comment(f'{name} -> {ep}')} " if self.comments else ""
            chance = f"-m statistic --mode random --probability {probability(n - i)} " if i < n - 1 else ""
            nat.add(f"-A {chain} {note}{chance}-j {self.sep[ep]}")

    def _endpoint(self, nat: Table, ep: str) -> None:
        chain = self.sep[ep]
        nat.chain(chain)
        head = f"-A {chain} {comment(self.name)}" if self.comments else f"-A {chain}"
        # Hairpin: a pod reaching itself through the Service must see a source other than its own.
        nat.add(f"{head} -s {ep.rpartition(':')[0]} -j KUBE-MARK-MASQ")
        remember = f" -m recent --name {chain} --set" if self.svc.session_affinity == "ClientIP" else ""
        nat.add(f"{head}{remember} {self.match} -j DNAT --to-destination {ep}")


def _by_address(backends) -> List[str]:
    """Each backend as "ip:port", sorted as strings, as kube-proxy's EndpointsMap is."""
    return sorted(repr(b) for b in backends)
