"""The LLM planner: when the configured model can call tools, it may call ChartSight's tools in a
bounded ReAct loop (``think`` ⇄ ``act``) after the rule planner has made its plan.

The rule plan always stands; the model's calls add facts to it. Tools run through LangGraph's
``ToolNode`` over the registry's tools bound to this patient's record, so they compute from code
exactly as the rule plan's calls do, and their facts carry evidence ids that the verifier checks
like any other. Bad calls (an unknown tool, arguments that are not JSON or fail the tool's schema, a
tool that raises) become error messages the model sees in its next round, never a failed question.
The transcript is kept in the state in the OpenAI wire format (plain JSON, checkpointable).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from langchain_core.runnables import RunnableConfig

import prompts
from agent.answer import ToolCallMade
from agent.backends import BackendError, tool_calling
from agent.nodes import GATHER_NODES, record_of, timed
from agent.runtime import AgentRuntime, runtime
from agent.state import AskState
from agent.tools import langchain_tools
from common import observe

log = logging.getLogger(__name__)


def after_plan(state: AskState, config: RunnableConfig) -> list[str] | str:
    """To the model's tool loop when the model calls tools; else straight to the gatherers."""
    rt = runtime(config)
    return "think" if tool_calling(rt.backend) is not None else list(GATHER_NODES)


def after_think(state: AskState, config: RunnableConfig) -> list[str] | str:
    """Run the tools the model asked for, unless it asked for none or its rounds are used up."""
    rt = runtime(config)
    backend = tool_calling(rt.backend)
    pending = state.get("pending_calls", [])
    if (
        pending
        and backend is not None
        and state.get("tool_steps", 0) <= backend.settings.max_tool_steps
    ):
        return "act"
    return list(GATHER_NODES)


def _opening(state: AskState, rt: AgentRuntime) -> list[dict[str, Any]]:
    version = prompts.DEFAULT_VERSION
    planned = [f"{c['tool']}({json.dumps(c['args'])})" for c in state.get("plan", [])]
    return [
        {"role": "system", "content": prompts.render("planner", version)},
        {
            "role": "user",
            "content": prompts.render(
                "plan",
                version,
                patient_line=state.get("patient_line", ""),
                question=state["question"],
                planned=planned,
            ),
        },
    ]


@timed("think")
async def think(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """One round of the model choosing tools, within what is left of the question's model time
    (``AgentRuntime.model_time``); a backend failure or the time running out reports
    ``observe.MODEL_ERROR`` and leaves the rule plan standing."""
    backend = tool_calling(rt.backend)
    assert backend is not None  # routed here only then
    transcript = list(state.get("transcript") or _opening(state, rt))
    steps = state.get("tool_steps", 0) + 1
    if steps > backend.settings.max_tool_steps:
        return {"tool_steps": steps, "pending_calls": []}
    schemas = [tool.schema() for tool in rt.tools.tools.values()]
    try:
        async with rt.model_time():
            turn = await backend.call_tools(transcript, schemas)
    except BackendError as exc:
        observe.report(
            observe.MODEL_ERROR, backend=rt.settings.model.name, error=type(exc).__name__
        )
        rt.emit("tool_planner_failed", reason=exc.public)
        log.warning("the model's tool round failed; the rule plan stands: %s", exc)
        return {
            "tool_steps": steps,
            "pending_calls": [],
            "warnings": [
                f"the model could not plan tool calls ({exc.public}); the rule plan is used"
            ],
        }
    transcript.append(
        {
            "role": "assistant",
            # "" rather than null: llama-cpp-python's server refuses a null content (HTTP 500,
            # "validation errors"), and an empty string is valid OpenAI Chat Completions
            "content": turn.text,
            **(
                {
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }
                        for c in turn.calls
                    ]
                }
                if turn.calls
                else {}
            ),
        }
    )
    pending = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls]
    rt.emit("tool_calls", calls=[{"tool": c["name"], "arguments": c["arguments"]} for c in pending])
    return {"transcript": transcript, "tool_steps": steps, "pending_calls": pending}


def _tool_error(exc: Exception) -> str:
    return f"Error: {type(exc).__name__}: {exc}. Fix the arguments or call another tool."


@timed("act")
async def act(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Run the model's tool calls through LangGraph's ToolNode, bound to this patient's record."""
    record = record_of(state, rt)
    if any(c["name"] == "similar_cases" for c in state.get("pending_calls", [])):
        await rt.ensure_images(record, quiet=True)
    from langgraph.prebuilt import ToolNode  # (~0.1 s: imported on the model path only)

    ctx = rt.context(record)
    node = ToolNode(langchain_tools(rt.tools, ctx, artifacts=True), handle_tool_errors=_tool_error)
    transcript = list(state.get("transcript", []))
    facts = list(state.get("model_facts", []))
    runnable, answered, failed = [], {}, set()
    for call in state.get("pending_calls", []):
        try:
            args = json.loads(call["arguments"] or "{}")
            if not isinstance(args, dict):
                raise ValueError("the arguments must be a JSON object")
        except ValueError as exc:
            answered[call["id"]] = f"Error: the arguments are not a JSON object ({exc})."
            failed.add(call["id"])
            continue
        runnable.append({"name": call["name"], "args": args, "id": call["id"], "type": "tool_call"})
    if runnable:
        out = await node.ainvoke({"messages": [_ai_message(runnable)]})
        for message in out["messages"]:
            answered[message.tool_call_id] = str(message.content)
            if getattr(message, "status", "success") == "error":
                failed.add(message.tool_call_id)
            else:
                facts += [f for f in message.artifact or [] if f not in facts]
    parsed = {c["id"]: c["args"] for c in runnable}
    log_entries = []  # added to the state's log by its reducer
    for call in state.get("pending_calls", []):
        transcript.append(
            {"role": "tool", "tool_call_id": call["id"], "content": answered.get(call["id"], "")}
        )
        log_entries.append(
            ToolCallMade(
                tool=call["name"],
                args=parsed.get(call["id"], call["arguments"]),
                by="model",
                error=call["id"] in failed,
            )
        )
    rt.emit("tool_results", count=len(facts))
    return {
        "transcript": transcript,
        "model_facts": facts,
        "tool_log": log_entries,
        "pending_calls": [],
    }


def _ai_message(calls: list[dict[str, Any]]) -> Any:
    from langchain_core.messages import AIMessage

    return AIMessage(content="", tool_calls=calls)
