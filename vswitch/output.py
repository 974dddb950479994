"""port-tx: the last stage; writes the frame to its egress port(s)."""

from __future__ import annotations

from .stage import Stage


class PortTx(Stage):
    """Sends ``pkt.out_port`` or every port in ``pkt.out_ports`` (a flood)."""

    name = "port-tx"
    drops = {"tx-error": "the egress port refused the frame (queue full or link down)"}

    def process(self, pkt):
        if pkt.dry_run:
            pkt.note = "dry-run"
            return pkt.then
        port = pkt.out_port
        if port is not None:
            if not port.send(pkt.buf):
                return self.drop(pkt, "tx-error")
            return None
        buf = pkt.buf
        for port in pkt.out_ports:
            port.send(buf)  # a failed copy of a flood is counted by the port
        return pkt.then

    def flow_step(self, pkt):
        port = pkt.out_port
        if port is None or pkt.then is not None or pkt.drop_stage is not None:
            return None
        counts = self.drop_counts

        def send(buf, ts):
            if not port.send(buf):
                counts["tx-error"] += 1
        return None, send

    def trace_record(self, pkt) -> dict:
        ports = [pkt.out_port] if pkt.out_port is not None else list(pkt.out_ports or ())
        rec = {"ports": [p.name for p in ports], "len": len(pkt)}
        if pkt.note == "dry-run":
            rec["dry_run"] = True
        for p in ports:
            encap = p.tx_trace(pkt.buf)
            if encap is not None:
                rec.setdefault("encap", {})[p.name] = encap
        if pkt.then is not None:
            rec["then"] = pkt.then.name
        return rec

    def format_trace(self, rec: dict) -> str:
        line = f"out {', '.join(rec['ports'])} len {rec['len']}"
        line += " (dry run: not sent)" if rec.get("dry_run") else ""
        for name, e in rec.get("encap", {}).items():
            line += (f"; {name}: would drop ({e['drop']})" if "drop" in e else
                     f"; {name}: vxlan vni {e['vni']} {e['src']}:{e['sport']} > {e['dst']}:{e['dport']} "
                     f"ttl {e['ttl']} df {int(e['df'])} tos 0x{e['tos']:02x}, {e['segments']} segment(s)")
        return line + (f", then {rec['then']}" if rec.get("then") else "")
