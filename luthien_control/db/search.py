"""Text search in recorded conversations: what the recorder stores to search, and the
condition that finds it.

The searched text of a transaction is its prompt and its answer as they were recorded,
so already redacted: a search never finds a secret, only ``[REDACTED]``. It is written
with the record (``transactions.insert_records``) into ``transaction_texts``, indexed on
SQLite by an FTS5 table with the trigram tokenizer (``transaction_texts_fts``, written
once per batch by ``insert_records``) and on PostgreSQL by a pg_trgm GIN index: a search
is a case-insensitive substring match of at least ``MIN_CHARS`` characters, answered
from the index at any table size (``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import (
    BindParameter,
    Integer,
    Select,
    TableClause,
    bindparam,
    column,
    select,
    table,
    text,
)

from luthien_control.db.models import TransactionTextRow
from luthien_control.exceptions import ClientError

MIN_CHARS = 3  # a trigram index finds nothing shorter
MAX_CHARS = 200
# Agents send their whole conversation again with every request: the text kept of a prompt
# is its start (the instructions, the task) and its end (the newest turns, which earlier
# transactions did not hold); of an answer, its start.
PROMPT_HEAD_CHARS = 2_000
PROMPT_TAIL_CHARS = 14_000
ANSWER_CHARS = 16_000
# A row's search text when its maker has it at hand (``recording.build_record`` reads the
# documents it has just redacted): not a column, written beside the row.
SEARCH_TEXT = "_search_text"
FTS_TABLE = "transaction_texts_fts"  # SQLite only: made by migration 0006, not a model
GIN_INDEX = "ix_transaction_texts_text"  # PostgreSQL only: idem


def is_search_index(name: str | None) -> bool:
    """Whether a table or index is a database's own search index (the FTS5 table and its
    shadow tables, the GIN index): made by migration 0006 in its dialect's SQL, so not in
    the models that are compared with the migrations."""
    return name == GIN_INDEX or (name or "").startswith(FTS_TABLE)


def search_text(endpoint: str, request: Any, response: Any) -> str:
    """The text a search looks in: the prompt (messages, input, instructions, tool calls
    and results) and the answer the client got (the buffered body or the assembled
    stream; with the backend's when a policy changed it), read by the dialect's own
    readers. Parts are separated by a newline, so no match spans two of them."""
    from luthien_control.dialects import dialect_for

    dialect = dialect_for(endpoint)
    request = _document(request)
    response = _document(response)
    sent = _side(request, "sent")
    received = _side(request, "received")
    body = sent.get("body") if sent.get("body") is not None else received.get("body")
    prompt = dialect.request_text(body) if isinstance(body, dict) else ""
    if len(prompt) > PROMPT_HEAD_CHARS + PROMPT_TAIL_CHARS:
        prompt = prompt[:PROMPT_HEAD_CHARS] + "\n" + prompt[-PROMPT_TAIL_CHARS:]
    answers: list[str] = []
    for side in ("sent", "received"):
        answer = _answer(dialect, _side(response, side))
        if answer and answer not in answers:
            answers.append(answer[:ANSWER_CHARS])
    return "\n".join(part for part in (prompt, *answers) if part).replace("\x00", "")


def _document(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(str(value) if type(value) is not str else value)
        except orjson.JSONDecodeError:
            return None
    return value


def _side(document: Any, side: str) -> dict[str, Any]:
    value = document.get(side) if isinstance(document, dict) else None
    return value if isinstance(value, dict) else {}


def _answer(dialect: Any, side: dict[str, Any]) -> str:
    stream = side.get("stream")
    body = stream if isinstance(stream, dict) else side.get("body")
    if not isinstance(body, dict):
        return ""
    if body.get("type") == "message" or isinstance(body.get("message"), dict):
        # An Anthropic message (a stream's assembly holds it under "message").
        body = body.get("message", body)
    text: str = dialect.answer_text(body)
    return text


def checked_query(query: str, param: str = "q") -> str:
    """The search as given, or a ``ClientError`` when it is too short or too long."""
    query = query.strip()
    if len(query) < MIN_CHARS:
        raise ClientError(f"a search needs at least {MIN_CHARS} characters", param=param)
    if len(query) > MAX_CHARS:
        raise ClientError(f"a search has at most {MAX_CHARS} characters", param=param)
    if "\x00" in query:
        raise ClientError("a search cannot hold a NUL character", param=param)
    return query


def fts_match(
    query: str, after_seq: int | None = None, before_seq: int | None = None
) -> tuple[TableClause, list[Any]]:
    """SQLite: the FTS5 table, to join on its ``rowid`` (a record's ``seq``), and the
    conditions that find ``query`` in it within the keyset bounds."""
    index = table(FTS_TABLE, column("rowid", Integer))
    found: list[Any] = [
        text(f"{FTS_TABLE} MATCH :search_phrase").bindparams(search_phrase=_phrase(query))
    ]
    if after_seq is not None:
        found.append(index.c.rowid > after_seq)
    if before_seq is not None:
        found.append(index.c.rowid < before_seq)
    return index, found


def _phrase(query: str) -> str:
    """One FTS5 phrase: the query's trigrams, in order (case-insensitive, as ILIKE)."""
    return '"' + query.replace('"', '""') + '"'


def matching_seqs(
    dialect: str, query: str, *, after_seq: int | None = None, before_seq: int | None = None
) -> Select[Any]:
    """The ``seq`` of the transactions whose text holds ``query``, within the keyset
    bounds given (repeated here: the planners do not carry them into the subquery, and a
    page far down would read every newer text first)."""
    if dialect == "sqlite":
        index, found = fts_match(query, after_seq, before_seq)
        return select(index.c.rowid).where(*found)
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    # Written into the statement, not bound: with a parameter, PostgreSQL's generic plan
    # (from the sixth run of a prepared statement) cannot know whether the pattern is rare
    # (read the index) or common (walk the newest records), and picks one for all.
    pattern: BindParameter[str] = bindparam("search_pattern", f"%{escaped}%", literal_execute=True)
    seq = TransactionTextRow.seq
    holding = select(seq).where(TransactionTextRow.text.ilike(pattern))
    if after_seq is not None:
        holding = holding.where(seq > after_seq)
    if before_seq is not None:
        holding = holding.where(seq < before_seq)
    return holding
