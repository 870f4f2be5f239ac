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
reassembled as a ``ToolCall``.

The modules: ``policy`` (the policy, its check and decisions), ``call`` (``ToolCall``),
``names`` (tool names normalised before they are compared), ``hold`` (holding a
streamed call until it is complete: shared by every dialect), and per dialect where its
calls sit: ``chat_messages`` and ``chat_stream`` (chat completions), ``responses_items``
and ``responses_stream`` (the Responses API).
"""

from luthien_control.policies.tools.call import ToolCall
from luthien_control.policies.tools.policy import ToolCallPolicy

__all__ = ["ToolCall", "ToolCallPolicy"]
