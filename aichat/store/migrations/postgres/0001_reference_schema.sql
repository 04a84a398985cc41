-- The Go service's schema (its golang-migrate versions 1 and 2), created only where it is missing, so a
-- database the Go service made is kept as it is and a new one looks the same to both.
CREATE TABLE IF NOT EXISTS chat_sessions (
    id          VARCHAR(64) PRIMARY KEY,
    user_id     VARCHAR(255) NOT NULL,
    title       VARCHAR(255) NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_sessions_user_id ON chat_sessions (user_id);
CREATE INDEX IF NOT EXISTS idx_chat_sessions_updated_at ON chat_sessions (updated_at DESC);

CREATE TABLE IF NOT EXISTS chat_messages (
    id               VARCHAR(64) PRIMARY KEY,
    session_id       VARCHAR(64) NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    role             VARCHAR(50) NOT NULL,
    content          TEXT NOT NULL,
    tool_calls       JSONB,
    tool_executions  JSONB,
    approval_request JSONB,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_messages_session_id ON chat_messages (session_id);
CREATE INDEX IF NOT EXISTS idx_chat_messages_created_at ON chat_messages (created_at);

CREATE TABLE IF NOT EXISTS chat_attachments (
    id          VARCHAR(64) PRIMARY KEY,
    message_id  VARCHAR(64) NOT NULL REFERENCES chat_messages (id) ON DELETE CASCADE,
    filename    VARCHAR(255) NOT NULL,
    mime_type   VARCHAR(100) NOT NULL,
    size        BIGINT NOT NULL,
    content     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_chat_attachments_message_id ON chat_attachments (message_id);

-- golang-migrate version 2: ids wide enough for 'assistant_<uuid>' (a no-op where already applied).
ALTER TABLE chat_sessions ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_messages ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_messages ALTER COLUMN session_id TYPE VARCHAR(64);
ALTER TABLE chat_attachments ALTER COLUMN id TYPE VARCHAR(64);
ALTER TABLE chat_attachments ALTER COLUMN message_id TYPE VARCHAR(64);
