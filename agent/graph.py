"""The LangGraph graph: wiring only (nodes in ``nodes.py`` and ``tool_planner.py``, state in
``state.py``).

resolve → plan ─┬──────────────────┬ tools    ┬ → generate → verify ─┬→ finalize
                └ think ⇄ act ─────┤ evidence │       ▲               │
                  (model calls     ├ images   │       └── retry once ─┘
                   tools; bounded) └ similar  ┘
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from agent import nodes, tool_planner
from agent.state import AskState

GATHER = {
    "tools": nodes.gather_tools,
    "evidence": nodes.gather_evidence,
    "images": nodes.gather_images,
    "similar": nodes.gather_similar,
}
assert tuple(GATHER) == nodes.GATHER_NODES


# The routers as coroutines: LangGraph runs a plain function in a worker thread (a thread hop and
# a GIL hand-over per route, three per question), a coroutine on the event loop. Each returns what
# the function it wraps returns.


async def _after_plan(state: AskState, config: RunnableConfig) -> list[str] | str:
    """``tool_planner.after_plan``: "think" or the gathering steps' names."""
    return tool_planner.after_plan(state, config)


async def _after_think(state: AskState, config: RunnableConfig) -> list[str] | str:
    """``tool_planner.after_think``: "act" or the gathering steps' names."""
    return tool_planner.after_think(state, config)


async def _after_check(state: AskState) -> str:
    """``nodes.after_check``: "generate" (a retry) or "finalize"."""
    return nodes.after_check(state)


def build_graph(checkpointer: Any = None) -> Any:
    """The compiled graph; ``checkpointer`` keeps each thread's state between runs."""
    graph = StateGraph(AskState)
    graph.add_node("resolve", nodes.resolve)
    graph.add_node("plan", nodes.plan)
    graph.add_node("think", tool_planner.think)
    graph.add_node("act", tool_planner.act)
    for name, node in GATHER.items():
        graph.add_node(name, node)
    graph.add_node("generate", nodes.generate)
    graph.add_node("verify", nodes.check)
    graph.add_node("finalize", nodes.finalize)

    graph.add_edge(START, "resolve")
    graph.add_edge("resolve", "plan")
    graph.add_conditional_edges("plan", _after_plan, ["think", *GATHER])
    graph.add_conditional_edges("think", _after_think, ["act", *GATHER])
    graph.add_edge("act", "think")
    graph.add_edge(list(GATHER), "generate")  # generate waits for every gatherer
    graph.add_edge("generate", "verify")
    graph.add_conditional_edges("verify", _after_check, ["generate", "finalize"])
    graph.add_edge("finalize", END)
    return graph.compile(checkpointer=checkpointer)
