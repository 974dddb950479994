"""Unit tests for vswitch.config: schema validation, defaults and loading.

Every rejected config must raise ConfigError whose str starts with the dotted
path of the offending field (module docstring: ``ports[1].mtu: ...``).
"""

from __future__ import annotations

import copy
import os

import pytest

from vswitch.config import DEFAULT_SOCKET, ConfigError, NodeConfig, load, parse

GOOD = {
    "name": "node-1",
    "bridge": {
        "ageing": 120,
        "max_learned": 100,
        "static": [{"mac": "02:00:00:00:00:01", "port": "pod1"}, {"mac": "02-00-00-00-00-02", "port": "mem"}],
    },
    "ports": [
        {"name": "pod1", "type": "tap", "ifname": "vsw-pod1", "netns": "ns1", "netns_ifname": "eth0"},
        {"name": "uplink", "type": "afpacket", "interface": "eth1", "mtu": 9000},
        {"name": "mem", "type": "memory", "hairpin": False},
        {"name": "pod2"},  # type defaults to tap, ifname to the name
    ],
    "control": {"socket": "/tmp/vsw.sock"},
    "log": {"level": "debug"},
}


def good(**changes):
    d = copy.deepcopy(GOOD)
    d.update(changes)
    return d


# --- accepted configs --------------------------------------------------------

def test_good_config_parses_with_values_and_defaults():
    cfg = parse(good())
    assert isinstance(cfg, NodeConfig)
    assert cfg.name == "node-1"
    assert cfg.ageing == 120.0 and isinstance(cfg.ageing, float)
    assert cfg.max_learned == 100
    assert cfg.static == [(bytes.fromhex("020000000001"), "pod1"), (bytes.fromhex("020000000002"), "mem")]
    assert cfg.socket == "/tmp/vsw.sock"
    assert cfg.log_level == "debug"
    by_name = {p["name"]: p for p in cfg.ports}
    assert [p["name"] for p in cfg.ports] == ["pod1", "uplink", "mem", "pod2"]
    pod1 = by_name["pod1"]
    assert pod1["type"] == "tap" and pod1["ifname"] == "vsw-pod1"
    assert pod1["netns"] == "ns1" and pod1["netns_ifname"] == "eth0"
    assert pod1["mtu"] == 1500
    # flannel's CNI config turns hairpin on for pod (TAP) ports (spec 1.5)...
    assert pod1["hairpin"] is True
    assert pod1["offload"] is True
    # ...while an uplink behaves like a plain bridge port.
    assert by_name["uplink"] == {"type": "afpacket", "name": "uplink", "interface": "eth1", "mtu": 9000,
                                 "hairpin": False}
    assert by_name["mem"]["type"] == "memory" and by_name["mem"]["hairpin"] is False
    assert by_name["pod2"]["type"] == "tap" and by_name["pod2"]["ifname"] == "pod2"


def test_cpus_are_kept_in_order_and_default_to_none():
    assert parse({"name": "n", "cpus": [3, 1]}).cpus == [3, 1]
    assert parse({"name": "n"}).cpus == []


def test_pinning_to_a_cpu_this_process_cannot_use_is_refused_by_name():
    from vswitch.daemon import pin_cpus
    before = os.sched_getaffinity(0)
    with pytest.raises(ConfigError) as ei:
        pin_cpus([max(before) + 1, min(before)])
    assert ei.value.path == "cpus" and f"CPU {max(before) + 1} is not available" in str(ei.value)
    assert os.sched_getaffinity(0) == before  # nothing changed


def test_minimal_config_defaults():
    cfg = parse({"name": "n"})
    # BR_DEFAULT_AGEING_TIME is 300 s.
    assert cfg.ageing == 300.0
    assert cfg.max_learned == 8192
    assert cfg.ports == [] and cfg.static == []
    assert cfg.socket == DEFAULT_SOCKET and cfg.socket.startswith("/")
    assert cfg.log_level == "info"


def test_empty_sections_are_allowed():
    cfg = parse({"name": "n", "bridge": None, "ports": None, "control": None, "log": None})
    assert cfg.ports == [] and cfg.ageing == 300.0


@pytest.mark.parametrize("mtu", [68, 1500, 65535])
def test_mtu_bounds_accepted(mtu):
    assert parse({"name": "n", "ports": [{"name": "m", "type": "memory", "mtu": mtu}]}).ports[0]["mtu"] == mtu


def test_ifname_of_exactly_15_chars_is_accepted():
    cfg = parse({"name": "n", "ports": [{"name": "p", "ifname": "a" * 15}]})
    assert cfg.ports[0]["ifname"] == "a" * 15


def test_long_port_name_with_explicit_ifname_is_accepted():
    cfg = parse({"name": "n", "ports": [{"name": "a-rather-long-port-name", "ifname": "short0"}]})
    assert cfg.ports[0]["ifname"] == "short0"


def test_memory_ports_have_no_interface_so_never_collide():
    cfg = parse({"name": "n", "ports": [{"name": "a", "type": "memory"}, {"name": "b", "type": "memory"}]})
    assert len(cfg.ports) == 2


# --- rejected configs --------------------------------------------------------

def mem(name="m", **kw):
    return {"name": name, "type": "memory", **kw}


BAD = [
    # (id, doc, path, words expected in the message)
    ("missing-name", {"ports": []}, "name", "required"),
    ("bad-name", {"name": "bad name"}, "name", ""),
    ("name-not-string", {"name": 42}, "name", ""),
    ("unknown-top-level", {"name": "n", "bogus": 1}, "bogus", "unknown key"),
    ("router-needs-interfaces", {"name": "n", "router": {}}, "router.interfaces", "is required"),
    ("services-later", {"name": "n", "services": []}, "services", "not supported yet"),
    ("vxlan-later", {"name": "n", "vxlan": {"vni": 1}}, "vxlan", "overlay:"),
    ("unknown-bridge-key", {"name": "n", "bridge": {"stp": True}}, "bridge.stp", "unknown key"),
    ("ageing-zero", {"name": "n", "bridge": {"ageing": 0}}, "bridge.ageing", ""),
    ("ageing-string", {"name": "n", "bridge": {"ageing": "5m"}}, "bridge.ageing", ""),
    ("ageing-bool", {"name": "n", "bridge": {"ageing": True}}, "bridge.ageing", ""),
    ("max-learned-zero", {"name": "n", "bridge": {"max_learned": 0}}, "bridge.max_learned", ""),
    ("max-learned-float", {"name": "n", "bridge": {"max_learned": 10.5}}, "bridge.max_learned", ""),
    ("ports-not-list", {"name": "n", "ports": {"a": 1}}, "ports", "list"),
    ("port-not-mapping", {"name": "n", "ports": ["eth0"]}, "ports[0]", "mapping"),
    ("port-missing-name", {"name": "n", "ports": [{"type": "memory"}]}, "ports[0].name", "required"),
    ("port-bad-name", {"name": "n", "ports": [mem("-x")]}, "ports[0].name", ""),
    ("unknown-port-type", {"name": "n", "ports": [{"name": "p", "type": "veth"}]}, "ports[0].type", "veth"),
    ("unknown-port-key", {"name": "n", "ports": [mem(vlan=5)]}, "ports[0].vlan", "unknown key"),
    ("key-of-other-type", {"name": "n", "ports": [mem(ifname="x")]}, "ports[0].ifname", "unknown key"),
    ("mtu-string", {"name": "n", "ports": [mem(mtu="big")]}, "ports[0].mtu", "'big'"),
    ("mtu-zero", {"name": "n", "ports": [mem(mtu=0)]}, "ports[0].mtu", ""),
    ("mtu-67", {"name": "n", "ports": [mem(mtu=67)]}, "ports[0].mtu", ""),
    ("mtu-70000", {"name": "n", "ports": [mem(mtu=70000)]}, "ports[0].mtu", "70000"),
    ("mtu-bool", {"name": "n", "ports": [mem(mtu=True)]}, "ports[0].mtu", ""),
    ("mtu-second-port", {"name": "n", "ports": [mem("a"), mem("b", mtu=1e3)]}, "ports[1].mtu", ""),
    ("hairpin-not-bool", {"name": "n", "ports": [mem(hairpin="yes")]}, "ports[0].hairpin", ""),
    ("offload-not-bool", {"name": "n", "ports": [{"name": "p", "offload": 1}]}, "ports[0].offload", ""),
    ("duplicate-port-name", {"name": "n", "ports": [mem("a"), mem("b"), mem("a")]}, "ports[2].name",
     "duplicate"),
    ("duplicate-ifname", {"name": "n", "ports": [{"name": "a", "ifname": "tap0"}, {"name": "b", "ifname": "tap0"}]},
     "ports[1]", "tap0"),
    ("duplicate-ifname-default",
     {"name": "n", "ports": [{"name": "eth1"}, {"name": "up", "type": "afpacket", "interface": "eth1"}]},
     "ports[1]", "eth1"),
    ("ifname-too-long", {"name": "n", "ports": [{"name": "p", "ifname": "a" * 16}]}, "ports[0].ifname", ""),
    ("ifname-slash", {"name": "n", "ports": [{"name": "p", "ifname": "a/b"}]}, "ports[0].ifname", ""),
    ("tap-name-too-long-no-ifname", {"name": "n", "ports": [{"name": "p" * 16}]}, "ports[0].ifname", "required"),
    ("afpacket-interface-too-long",
     {"name": "n", "ports": [{"name": "up", "type": "afpacket", "interface": "e" * 16}]}, "ports[0].interface", ""),
    ("afpacket-name-too-long",
     {"name": "n", "ports": [{"name": "u" * 16, "type": "afpacket"}]}, "ports[0].interface", ""),
    ("netns-ifname-without-netns", {"name": "n", "ports": [{"name": "p", "netns_ifname": "eth0"}]},
     "ports[0].netns_ifname", "netns"),
    ("netns-ifname-too-long",
     {"name": "n", "ports": [{"name": "p", "netns": "ns", "netns_ifname": "x" * 16}]}, "ports[0].netns_ifname", ""),
    ("static-not-list", {"name": "n", "ports": [mem()], "bridge": {"static": {"mac": "02:00:00:00:00:01"}}},
     "bridge.static", "list"),
    ("static-unknown-port",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "02:00:00:00:00:01", "port": "nope"}]}},
     "bridge.static[0].port", "nope"),
    ("static-multicast-mac",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "01:00:5e:00:00:01", "port": "m"}]}},
     "bridge.static[0].mac", "unicast"),
    ("static-broadcast-mac",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "ff:ff:ff:ff:ff:ff", "port": "m"}]}},
     "bridge.static[0].mac", "unicast"),
    ("static-bad-mac",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "02:00:00:00:01", "port": "m"}]}},
     "bridge.static[0].mac", "MAC"),
    ("static-second-missing-port",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "02:00:00:00:00:01", "port": "m"},
                                                           {"mac": "02:00:00:00:00:02"}]}},
     "bridge.static[1].port", "required"),
    ("static-extra-key",
     {"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "02:00:00:00:00:01", "port": "m", "vlan": 1}]}},
     "bridge.static[0].vlan", "unknown key"),
    ("socket-relative", {"name": "n", "control": {"socket": "run/vswitch.sock"}}, "control.socket", "absolute"),
    ("socket-too-long", {"name": "n", "control": {"socket": "/" + "s" * 107}}, "control.socket", ""),
    ("socket-not-string", {"name": "n", "control": {"socket": 5}}, "control.socket", ""),
    ("unknown-control-key", {"name": "n", "control": {"port": 1}}, "control.port", "unknown key"),
    ("bad-log-level", {"name": "n", "log": {"level": "trace"}}, "log.level", "trace"),
    ("bad-log-format", {"name": "n", "log": {"format": "xml"}}, "log.format", "xml"),
    ("metrics-not-loopback", {"name": "n", "metrics": {"listen": "0.0.0.0:9469"}}, "metrics.listen", "loopback"),
    ("metrics-relative-unix", {"name": "n", "metrics": {"listen": "unix:n.sock"}}, "metrics.listen", "absolute"),
    ("metrics-needs-listen", {"name": "n", "metrics": {}}, "metrics.listen", "is required"),
    ("unknown-metrics-key", {"name": "n", "metrics": {"listen": "127.0.0.1:1", "port": 1}}, "metrics.port",
     "unknown key"),
    ("bridge-not-mapping", {"name": "n", "bridge": [1]}, "bridge", "mapping"),
    ("cpus-empty", {"name": "n", "cpus": []}, "cpus", "non-empty list"),
    ("cpus-not-list", {"name": "n", "cpus": 1}, "cpus", "e.g. [1]"),
    ("cpus-negative", {"name": "n", "cpus": [-1]}, "cpus[0]", "from 0 to"),
    ("cpus-bool", {"name": "n", "cpus": [0, True]}, "cpus[1]", "integer"),
    ("cpus-twice", {"name": "n", "cpus": [1, 1]}, "cpus", "twice"),
]


@pytest.mark.parametrize("doc, path, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(doc, path, words):
    with pytest.raises(ConfigError) as ei:
        parse(doc)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert words in str(err)


@pytest.mark.parametrize("doc", [None, [], "name: n", 3])
def test_document_must_be_a_mapping(doc):
    with pytest.raises(ConfigError, match="mapping"):
        parse(doc)


def test_socket_of_107_bytes_is_accepted():
    sock = "/" + "s" * 106
    assert parse({"name": "n", "control": {"socket": sock}}).socket == sock


@pytest.mark.parametrize("doc, path", [
    ({"name": "n", "ports": [{"name": "p", "type": ["tap"]}]}, "ports[0].type"),
    ({"name": "n", "ports": [mem()], "bridge": {"static": [{"mac": "02:00:00:00:00:01", "port": ["m"]}]}},
     "bridge.static[0].port"),
])
def test_unhashable_values_are_config_errors(doc, path):
    with pytest.raises(ConfigError) as ei:
        parse(doc)
    assert ei.value.path == path


# --- load ------------------------------------------------------------------

def test_load_good_file(tmp_path):
    p = tmp_path / "node.yaml"
    p.write_text(
        "name: n1\n"
        "bridge:\n  ageing: 60\n  static:\n    - {mac: '02:00:00:00:00:09', port: m1}\n"
        "ports:\n  - {name: m1, type: memory}\n  - {name: m2, type: memory, hairpin: false}\n"
    )
    cfg = load(str(p))
    assert cfg.name == "n1" and cfg.ageing == 60.0
    assert [(q["name"], q["hairpin"]) for q in cfg.ports] == [("m1", True), ("m2", False)]
    assert cfg.static == [(bytes.fromhex("020000000009"), "m1")]


def test_load_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert "cannot read" in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_load_empty_file(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert "empty" in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("text", ["name: [unclosed\n", "name: n\n  ports: x\n: :\n", "a: b\n\tc: d\n"])
def test_load_invalid_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert "not valid YAML" in str(ei.value) and str(p) in str(ei.value)


def test_load_validates_content(tmp_path):
    p = tmp_path / "n.yaml"
    p.write_text("name: n\nports:\n  - name: m\n    type: memory\n    mtu: 0\n")
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert ei.value.path == "ports[0].mtu"


def test_load_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path))


def test_unquoted_yaml_mac_error_names_the_field(tmp_path):
    # YAML 1.1 reads 52:54:00:12:34:56 as a base-60 integer; at least the error
    # must point at the field (quoting the MAC fixes it).
    p = tmp_path / "n.yaml"
    p.write_text("name: n\nports: [{name: m, type: memory}]\nbridge:\n  static: [{mac: 52:54:00:12:34:56, port: m}]\n")
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert ei.value.path == "bridge.static[0].mac"
    p.write_text("name: n\nports: [{name: m, type: memory}]\nbridge:\n  static: [{mac: '52:54:00:12:34:56', port: m}]\n")
    assert load(str(p)).static == [(bytes.fromhex("525400123456"), "m")]
