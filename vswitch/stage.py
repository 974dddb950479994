"""The stage graph: small named units, explicit next stages, enumerated drops.

Modelled on Click elements and VPP graph nodes. A stage has one job. Its
``process(pkt)`` returns the next stage object (or ``None`` once the packet
has been consumed) and records its decision on the packet in one attribute
store (``pkt.note``); ``trace_record`` turns that note into data only when a
packet is traced, so tracing costs nothing when it is off.

Drops are declared per stage as ``(reason, human text)`` pairs and counted
per reason; an undeclared reason is a programming error (KeyError).

A stage may also say how to replay its decision without deciding again
(``flow_step``), which is what the flow cache (flowcache.py) builds on.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional


class Stage:
    """Base class. Subclasses set ``name``, ``next_names`` and ``drops``."""

    name: str = "stage"
    next_names: tuple = ()
    drops: Dict[str, str] = {}
    flow_boundary = False  # see Graph.run_recorded

    def __init__(self) -> None:
        self.packets = 0
        self.drop_counts = dict.fromkeys(self.drops, 0)
        self._drop: Optional[Stage] = None
        self.graph: Optional[Graph] = None

    def bind(self, graph: "Graph") -> None:
        """Resolve named next stages into objects (called once by Graph.build)."""
        self.graph = graph
        self._drop = graph.stages["drop"]
        for nxt in self.next_names:
            if nxt not in graph.stages:
                raise ValueError(f"stage {self.name!r}: next stage {nxt!r} is not in the graph")
        self.on_bind(graph)

    def on_bind(self, graph: "Graph") -> None:
        """Subclasses fetch their next stages here: ``self.fwd = graph.stages['x']``."""

    def process(self, pkt):  # pragma: no cover - abstract
        raise NotImplementedError

    def drop(self, pkt, reason: str):
        self.drop_counts[reason] += 1
        pkt.drop_stage = self.name
        pkt.drop_reason = reason
        return self._drop

    # --- tracing (only ever called for traced packets) -------------------
    def trace_record(self, pkt) -> dict:
        """Structured decision of this stage for ``pkt`` (override per stage)."""
        return {} if pkt.note is None else {"note": pkt.note}

    def format_trace(self, rec: dict) -> str:
        """One human line for a trace record, VPP ``format_trace`` style."""
        return " ".join(f"{k}={v}" for k, v in rec.items())

    def stats(self) -> dict:
        return {"packets": self.packets, "drops": {k: v for k, v in self.drop_counts.items()}}

    # --- flow cache ---------------------------------------------------------
    def flow_step(self, pkt):
        """How to replay the decision just taken for ``pkt``, called right after ``process``.

        Returns ``(guard, action)`` (either may be None; see FLOW_NOOP): on a
        cache hit every guard of the flow runs first, as ``guard(buf, ts)``
        on the frame as received, and any False sends the frame down the slow
        path; then every action ``action(buf, ts)`` runs in stage order.
        Returns None when the decision cannot be replayed (drops, ICMP,
        floods, anything stateful per packet): the default, so a stage is
        only ever cached when it says how.
        """
        return None


FLOW_NOOP = (None, None)  # flow_step for a decision fully fixed by the flow key


class Drop(Stage):
    """Terminal stage: the packet dies here; the deciding stage already counted why."""

    name = "drop"

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list = []  # e.g. capture taps that want to see drops

    def process(self, pkt):
        for hook in self.hooks:
            hook(pkt)
        return None

    def trace_record(self, pkt) -> dict:
        return {"stage": pkt.drop_stage, "reason": pkt.drop_reason,
                "why": self.graph.drop_text(pkt.drop_stage, pkt.drop_reason)}

    def format_trace(self, rec: dict) -> str:
        return f"dropped by {rec['stage']}: {rec['reason']} ({rec['why']})"


class TraceStep(dict):
    """One line of a packet's walk: stage name, structured record, next stage."""


class Graph:
    """Holds the stages of one node and runs packets through them."""

    def __init__(self) -> None:
        self.stages: Dict[str, Stage] = {}
        self.add(Drop())
        self.entry: Optional[Stage] = None
        self.observers: list[Callable] = []  # called (stage, pkt) per step when a packet is traced

    def add(self, stage: Stage) -> Stage:
        if stage.name in self.stages:
            raise ValueError(f"duplicate stage name {stage.name!r}")
        self.stages[stage.name] = stage
        return stage

    def build(self, entry: str) -> "Graph":
        for stage in self.stages.values():
            stage.bind(self)
        self.entry = self.stages[entry]
        return self

    def run(self, pkt, stage: Optional[Stage] = None) -> None:
        stage = stage or self.entry
        if pkt.trace is None:
            while stage is not None:
                stage.packets += 1
                stage = stage.process(pkt)
        else:
            self._run_traced(pkt, stage)

    def run_recorded(self, pkt, stage: Stage):
        """Run untraced and collect each stage's flow_step: a list of (stage, guard, action),
        or None as soon as one stage's decision cannot be replayed. A ``flow_boundary`` stage
        ends the flow: what it hands on is another packet (an encapsulation's outer frame),
        which its action sends through the graph itself."""
        steps: Optional[list] = []
        recording = True
        while stage is not None:
            stage.packets += 1
            nxt = stage.process(pkt)
            if recording:
                step = stage.flow_step(pkt)
                if step is None:
                    steps, recording = None, False
                else:
                    steps.append((stage, step[0], step[1]))
                    recording = not stage.flow_boundary
            stage = nxt
        return steps

    def _run_traced(self, pkt, stage: Stage) -> None:
        while stage is not None:
            pkt.note = None
            stage.packets += 1
            nxt = stage.process(pkt)
            rec = stage.trace_record(pkt)
            step = TraceStep(stage=stage.name, next=nxt.name if nxt is not None else None,
                             record=rec, text=stage.format_trace(rec))
            pkt.trace.append(step)
            for obs in self.observers:
                obs(stage, pkt)
            stage = nxt

    # --- introspection ----------------------------------------------------
    def drop_text(self, stage: Optional[str], reason: Optional[str]) -> str:
        st = self.stages.get(stage or "")
        return st.drops.get(reason, "") if st else ""

    def drop_table(self) -> list:
        rows = []
        for st in self.stages.values():
            for reason, n in st.drop_counts.items():
                rows.append({"stage": st.name, "reason": reason, "count": n, "text": st.drops[reason]})
        return rows

    def stats(self) -> list:
        return [{"stage": s.name, "packets": s.packets,
                 "drops": sum(s.drop_counts.values())} for s in self.stages.values()]

    def edges(self) -> Iterable[tuple]:
        for s in self.stages.values():
            for n in s.next_names:
                yield s.name, n
