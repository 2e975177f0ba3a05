"""A tool-using LLM drives lwm: `langchain.agents.create_agent` with the local model and the
`lwm_follow_instruction` tool.

    python eval/tool_agent.py --json runs/tool_agent.json
    python eval/tool_agent.py --request "Please have the robot pick up the green key" \
        --llm openai:gpt-4o-mini

The chat model (default: the embedded local Qwen2.5-Coder-1.5B, whose tool calls are constrained
to the tool's argument schema) reads the user's request, calls the tool, which runs one episode
of the lwm agent (world model + planner, with the same chat model parsing and critiquing), and
answers from the tool's summary. Prints the conversation; the JSON holds every message, the
tool's artifact (the episode: success, steps, subgoals, events) and wall times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from lwm.report import machine_info, write_json  # noqa: E402

DEFAULT_REQUEST = ("In the babyai-goto task with seed 3, please have the robot walk over to the "
                   "red key.")
SYSTEM = ("You control a robot in a grid world through the lwm_follow_instruction tool. Call it "
          "once with the user's instruction, task and seed, then tell the user in one sentence "
          "whether the robot succeeded.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--request", default=DEFAULT_REQUEST, help="what the user asks the LLM")
    ap.add_argument("--llm", default="local", help="get_chat_model spec (default: local)")
    ap.add_argument("--checkpoint", default=None,
                    help="world model for the tool (default: the shipped babyai-goto one)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    ap.add_argument("--max-turns", type=int, default=6, help="agent graph steps (recursion limit)")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)

    import torch
    from langchain.agents import create_agent

    from lwm.language import get_chat_model
    from lwm.resources import checkpoint as shipped_checkpoint
    from lwm.tools import FollowInstructionTool

    torch.set_num_threads(args.threads)
    llm = get_chat_model(args.llm, **({"n_threads": args.threads} if args.llm == "local" else {}))
    checkpoint = args.checkpoint or str(shipped_checkpoint("babyai-goto"))
    tool = FollowInstructionTool(checkpoint=checkpoint, llm=llm)
    agent = create_agent(llm, tools=[tool], system_prompt=SYSTEM)
    start = time.perf_counter()
    out = agent.invoke({"messages": [("user", args.request)]},
                       {"recursion_limit": 2 * args.max_turns + 1})
    wall = time.perf_counter() - start
    messages = []
    for m in out["messages"]:
        row = {"type": m.type, "content": m.text}
        if getattr(m, "tool_calls", None):
            row["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in m.tool_calls]
        if m.type == "tool":
            row["artifact"] = m.artifact
        messages.append(row)
        shown = row.get("tool_calls") or row["content"]
        print(f"[{m.type}] {shown}")
    artifact = next((m["artifact"] for m in messages if m["type"] == "tool"), None)
    result = {"machine": machine_info(), "seed": None, "request": args.request, "llm": args.llm,
              "checkpoint": checkpoint, "wall_s": wall, "messages": messages,
              "tool_called": artifact is not None,
              "episode_success": (artifact or {}).get("success")}
    print(f"wall {wall:.1f}s; tool called: {result['tool_called']}; "
          f"episode success: {result['episode_success']}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
