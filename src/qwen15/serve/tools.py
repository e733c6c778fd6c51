"""Tool calls in Qwen2.5's chat format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

from __future__ import annotations

import json
import re
import secrets

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CLOSE) + r"|$)", re.S)


def forced_prefix(tool_choice) -> str:
    """Text the answer is made to start with: a tool call for 'required', that tool's call for a named one."""
    if isinstance(tool_choice, dict):
        return f'{TOOL_OPEN}\n{{"name": {json.dumps(tool_choice["function"]["name"])}, "arguments": {{'
    if tool_choice == "required":  # the name too: a bare `<tool_call>\n` made the 0.5B end the answer at once
        return f'{TOOL_OPEN}\n{{"name": "'
    return ""


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content outside the tool calls or None, OpenAI tool_calls) from a finished answer.

    Small models sometimes answer with the bare call object and no <tool_call> tags: a whole answer that is
    one JSON object naming one of tool_names counts as that call."""
    bodies = _BLOCK.findall(text)
    if not bodies and tool_names and text.strip().startswith("{"):
        try:
            bare = json.loads(text.strip())
        except json.JSONDecodeError:
            bare = None
        if isinstance(bare, dict) and bare.get("name") in tool_names:
            return None, _calls([text.strip()])
    calls = _calls(bodies)
    if not calls:
        return text, []
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


def _calls(bodies: list[str]) -> list[dict]:
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        args = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return calls


def tool_names(tools: list[dict] | None) -> set[str]:
    return {(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)} - {None}


def prepare_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what Qwen's template expects: tool-call arguments as objects, not JSON strings."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = dict(m)
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
            if m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out


def held_back(text: str) -> int:
    """How many trailing characters of streamed text could be the start of a tool call (hold them)."""
    for k in range(min(len(TOOL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_OPEN.startswith(text[-k:]):
            return k
    return 0
