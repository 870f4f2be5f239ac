"""Tool-call control: every tool call is checked, whole, before any of it reaches the other side.

``ToolCallPolicy`` checks each call's name against allowed and denied lists and its
complete arguments against regular expressions, and blocks the transaction or drops the
call. After ``SendBackendRequest`` it checks the answer's calls; a streamed call is held
back only until it is complete (the next call of its choice begins, the choice finishes,
or the stream ends), while text keeps flowing, and is then released unchanged or never
sent at all. Before the backend it checks the calls in the request's history.

The Responses API (``/responses``) is covered the same way: its ``function_call`` and
``custom_tool_call`` output items and the built-in tools' call items (``local_shell_call``,
``mcp_call``, ...: named by their type), buffered or streamed (every event of such an
item is held from its ``response.output_item.added`` to its
``response.output_item.done``), and the same items in a request's ``input``.

Subclass it and override ``check`` for a check of your own: it receives each call
reassembled as a ``ToolCall``. A policy of another kind can use the same neutral view
directly: ``tx.dialect.request_tool_calls`` / ``answer_tool_calls`` (each call found, to
``drop()``) and ``hold_tool_calls(tx, decide)`` for a stream.

The modules hold concepts only: ``policy`` (the policy, its check and decisions),
``call`` (``ToolCall``, the argument texts a pattern is searched in), ``names`` (tool
names normalised before they are compared) and ``hold`` (holding a streamed call until
it is complete, and the judge that settles it). Where each dialect keeps its calls (in
a request, a buffered answer, a stream event) is the dialect's business:
``luthien_control/dialects/*_tools.py``, ``chat_tool_stream.py`` and
``responses_tool_stream.py``.
"""

from luthien_control.policies.tools.call import ToolCall, argument_texts
from luthien_control.policies.tools.hold import hold_tool_calls
from luthien_control.policies.tools.policy import ToolCallPolicy

__all__ = ["ToolCall", "ToolCallPolicy", "argument_texts", "hold_tool_calls"]
