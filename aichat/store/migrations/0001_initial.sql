-- Sessions, their messages (with tool calls, tool results by call id and timings), attachments and
-- tool approvals. Timestamps are fixed-width RFC 3339 UTC strings, so text order is time order.
CREATE TABLE chat_sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    title       TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX chat_sessions_user_updated ON chat_sessions (user_id, updated_at DESC);

CREATE TABLE chat_messages (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    session_id       TEXT NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool', 'tool_approval')),
    content          TEXT NOT NULL DEFAULT '',
    tool_calls       TEXT,
    tool_call_id     TEXT,
    tool_executions  TEXT,
    approval_request TEXT,
    created_at       TEXT NOT NULL
);
CREATE INDEX chat_messages_session ON chat_messages (session_id, seq);

CREATE TABLE chat_attachments (
    id          TEXT PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES chat_messages (id) ON DELETE CASCADE,
    filename    TEXT NOT NULL,
    mime_type   TEXT NOT NULL DEFAULT '',
    size        INTEGER NOT NULL,
    content     TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX chat_attachments_message ON chat_attachments (message_id);

CREATE TABLE tool_approvals (
    id           TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    user_id      TEXT NOT NULL,
    tool_calls   TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    resolved_at  TEXT
);
CREATE INDEX tool_approvals_session ON tool_approvals (session_id, status);
