"""eth-input: the first stage every bridge-port frame passes."""

from __future__ import annotations

from .packet import ETH_TYPE, ETH_P_8021AD, ETH_P_8021Q, MIN_FRAME, VNET_LEN, mac_str
from .stage import Stage


class EthInput(Stage):
    """Checks the frame is long enough to be Ethernet; notes VLAN tags for traces."""

    name = "eth-input"
    next_names = ("l2-learn",)
    drops = {"runt": "shorter than an Ethernet header (14 bytes)"}

    def on_bind(self, graph) -> None:
        self.learn = graph.stages["l2-learn"]

    def process(self, pkt):
        if len(pkt.buf) < VNET_LEN + MIN_FRAME:
            return self.drop(pkt, "runt")
        return self.learn

    def flow_step(self, pkt):
        if pkt.drop_stage is not None:
            return None
        return (_long_enough, None)

    def trace_record(self, pkt) -> dict:
        buf = pkt.buf
        if len(buf) < VNET_LEN + MIN_FRAME:
            return {"len": len(pkt)}
        rec = {"port": pkt.in_port.name, "len": len(pkt), "src": mac_str(pkt.src), "dst": mac_str(pkt.dst)}
        etype = pkt.ethertype
        if etype in (ETH_P_8021Q, ETH_P_8021AD) and len(buf) >= ETH_TYPE + 6:
            tci = (buf[ETH_TYPE + 2] << 8) | buf[ETH_TYPE + 3]
            rec["vlan"] = tci & 0xFFF
            etype = (buf[ETH_TYPE + 4] << 8) | buf[ETH_TYPE + 5]
        rec["type"] = f"0x{etype:04x}"
        vnet = pkt.vnet.describe()
        if vnet != "plain":
            rec["offload"] = vnet
        return rec

    def format_trace(self, rec: dict) -> str:
        if "port" not in rec:
            return f"runt frame of {rec['len']} bytes"
        line = f"in {rec['port']} len {rec['len']} {rec['src']} > {rec['dst']} type {rec['type']}"
        if "vlan" in rec:
            line += f" vlan {rec['vlan']}"
        if "offload" in rec:
            line += f" [{rec['offload']}]"
        return line


def _long_enough(buf, ts) -> bool:
    return len(buf) >= VNET_LEN + MIN_FRAME
