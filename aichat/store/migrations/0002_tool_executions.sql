-- Tool calls run server-side for requests that keep no session (POST /v1/chat/completions): one row per
-- execution, by the user it ran for and the completion id the client was answered with. Turns in a
-- session keep theirs on their tool messages (chat_messages.tool_executions), as the reference does.
CREATE TABLE tool_executions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    tool_call_id  TEXT NOT NULL,
    tool_name     TEXT NOT NULL,
    arguments     TEXT NOT NULL,
    result        TEXT NOT NULL,
    error         TEXT,
    start_time    TEXT NOT NULL,
    end_time      TEXT NOT NULL,
    duration_ms   INTEGER NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE INDEX tool_executions_user_created ON tool_executions (user_id, created_at DESC);
CREATE INDEX tool_executions_request ON tool_executions (request_id);
