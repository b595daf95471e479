//! Tasks: their statuses, priorities, and the one place client input is checked.
//!
//! Input arrives as a `serde_json::Value` rather than a derived struct so that
//! every rejection can name the exact field (`tasks[17].priority`), which
//! serde's own errors cannot do.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Most tasks a single `POST /batches` may carry.
pub const MAX_BATCH_TASKS: usize = 100_000;
/// Largest `metadata` object, measured as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Largest prompt, or sum of message contents, in bytes (UTF-8).
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// Most messages in one conversation.
pub const MAX_MESSAGES: usize = 1_000;
/// Largest `params` object, measured as compact JSON.
pub const MAX_PARAMS_BYTES: usize = 16 * 1024;
/// Deepest nesting of objects and arrays inside `params` and `metadata`.
pub const MAX_DEPTH: usize = 16;
/// Completion tokens assumed for a task that sets no `max_tokens`, when
/// its tokens are estimated for a tenant's token limit.
pub const ASSUMED_COMPLETION_TOKENS: u64 = 256;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;
pub const MAX_MAX_ATTEMPTS: i32 = 20;
/// Model names become part of Redis keys inside a `{hash tag}`, so braces and
/// whitespace are excluded; the rest covers `org/model`, `llama3:8b`, `gpt-4.1`.
const MAX_MODEL_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting for its run-at time (a retry's backoff).
    Scheduled,
    Queued,
    Running,
    Succeeded,
    /// Attempts used up or a permanent error: the dead-letter state.
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Scheduled,
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Scheduled => "scheduled",
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

impl TaskStatus {
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// The band that orders the ready set: lower runs first. Stored in
    /// PostgreSQL as this number too.
    pub fn band(self) -> i16 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub fn from_band(band: i16) -> Option<Priority> {
        match band {
            0 => Some(Priority::High),
            1 => Some(Priority::Normal),
            2 => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the model is asked: a bare prompt or a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    Prompt(String),
    Messages(Vec<Message>),
}

impl Input {
    /// The conversation as chat messages; a prompt is one user message.
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Input::Prompt(p) => vec![Message {
                role: "user".to_owned(),
                content: p.clone(),
            }],
            Input::Messages(m) => m.clone(),
        }
    }
}

/// A validated submission, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub model: String,
    pub input: Input,
    pub params: Params,
    pub priority: Priority,
    pub max_attempts: i32,
    pub metadata: Option<Value>,
    /// Reuse a stored result for the same model, input and params.
    pub cache: bool,
}

/// A task's `params`, checked, kept as the compact JSON the row stores: a
/// parsed map costs a tree node of about 600 bytes per task, which a
/// 100,000-task batch would hold for every task at once.
#[derive(Debug, Clone)]
pub struct Params {
    raw: Box<serde_json::value::RawValue>,
    max_tokens: Option<u64>,
}

impl Params {
    fn of(map: &Map<String, Value>) -> Params {
        Params::with_text(map, serde_json::to_string(map).expect("a map serializes"))
    }

    /// `map` with its compact JSON `text`, already made.
    fn with_text(map: &Map<String, Value>, text: String) -> Params {
        Params {
            raw: serde_json::value::RawValue::from_string(text).expect("valid JSON"),
            max_tokens: map.get("max_tokens").and_then(Value::as_u64),
        }
    }

    /// The object as JSON text.
    pub fn json(&self) -> &str {
        self.raw.get()
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Params) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl Serialize for Params {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

/// A validated batch submission.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBatch {
    pub tasks: Vec<NewTask>,
    pub metadata: Option<Value>,
}

/// Why a submission was refused; `field` is a path into the request body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

type Result<T, E = ValidationError> = std::result::Result<T, E>;

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    value.as_object().ok_or_else(|| {
        let name = if path.is_empty() { "body" } else { path };
        ValidationError::new(name, "must be a JSON object")
    })
}

fn reject_unknown(obj: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<()> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ValidationError::new(
            join(prefix, k),
            format!("unknown field; expected one of: {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn metadata(obj: &Map<String, Value>, prefix: &str) -> Result<Option<Value>> {
    let field = join(prefix, "metadata");
    match obj.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => {
            check_depth(v, &field)?;
            let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_METADATA_BYTES {
                return Err(ValidationError::new(
                    field,
                    format!("is {size} bytes; at most {MAX_METADATA_BYTES} are allowed"),
                ));
            }
            Ok(Some(v.clone()))
        }
        Some(_) => Err(ValidationError::new(field, "must be a JSON object")),
    }
}

/// Refuses a NUL character in any string or key of `value`: PostgreSQL
/// stores none in `text` or `jsonb`, so it would otherwise fail as a 500.
/// The error names the innermost field that holds it.
pub fn check_no_nul(value: &Value, path: &str) -> Result<()> {
    // Paths are built only to name a NUL that is there: a batch body has
    // hundreds of thousands of values, and formatting a path for each was
    // a few percent of the API's CPU per batch.
    if has_nul(value) {
        locate_nul(value, path)
    } else {
        Ok(())
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn locate_nul(value: &Value, path: &str) -> Result<()> {
    let field = |p: &str| {
        if p.is_empty() {
            "body".to_owned()
        } else {
            p.to_owned()
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Err(ValidationError::new(
            field(path),
            "must not contain a NUL character (\\u0000)",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| locate_nul(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let at = join(path, k);
            if k.contains('\0') {
                return Err(ValidationError::new(
                    field(path),
                    "must not contain a NUL character (\\u0000) in a key",
                ));
            }
            locate_nul(v, &at)
        }),
        _ => Ok(()),
    }
}

/// Refuses values nested deeper than [`MAX_DEPTH`] (a deep value costs
/// stack in every parser that reads it back).
fn check_depth(value: &Value, field: &str) -> Result<()> {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(value) > MAX_DEPTH {
        return Err(ValidationError::new(
            field,
            format!("nests objects and arrays more than {MAX_DEPTH} deep"),
        ));
    }
    Ok(())
}

/// Tokens a task may use, estimated before it runs: about four bytes of
/// English per token for the input, plus its `max_tokens` (or
/// [`ASSUMED_COMPLETION_TOKENS`]). The worker corrects the estimate by the
/// usage the backend reports.
pub fn token_estimate(input: &Input, params: &Map<String, Value>) -> u64 {
    estimate(input, params.get("max_tokens").and_then(Value::as_u64))
}

fn estimate(input: &Input, max_tokens: Option<u64>) -> u64 {
    let bytes = match input {
        Input::Prompt(p) => p.len(),
        Input::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
    };
    (bytes as u64).div_ceil(4) + max_tokens.unwrap_or(ASSUMED_COMPLETION_TOKENS)
}

/// Whether `model` can name a queue (see [`MAX_MODEL_LEN`]).
pub fn valid_model(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL_LEN
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
}

impl NewTask {
    /// See [`token_estimate`].
    pub fn token_estimate(&self) -> u64 {
        estimate(&self.input, self.params.max_tokens)
    }

    /// Checks one task object. `prefix` is its path in the body ("" for
    /// `POST /tasks`, `tasks[3]` inside a batch).
    pub fn from_json(value: &Value, prefix: &str) -> Result<NewTask> {
        check_no_nul(value, prefix)?;
        let obj = object(value, prefix)?;
        reject_unknown(
            obj,
            prefix,
            &[
                "model",
                "prompt",
                "messages",
                "params",
                "priority",
                "max_attempts",
                "metadata",
                "cache",
            ],
        )?;

        let model = match obj.get("model") {
            None | Some(Value::Null) => {
                return Err(ValidationError::new(join(prefix, "model"), "is required"));
            }
            Some(Value::String(m)) if valid_model(m) => m.clone(),
            Some(Value::String(_)) => {
                return Err(ValidationError::new(
                    join(prefix, "model"),
                    format!(
                        "must be 1 to {MAX_MODEL_LEN} characters of letters, digits and - _ . : / @"
                    ),
                ));
            }
            Some(_) => {
                return Err(ValidationError::new(
                    join(prefix, "model"),
                    "must be a string",
                ));
            }
        };

        let prompt = obj.get("prompt").filter(|v| !v.is_null());
        let messages = obj.get("messages").filter(|v| !v.is_null());
        let input = match (prompt, messages) {
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    join(prefix, "prompt"),
                    "give exactly one of prompt or messages, not both",
                ));
            }
            (None, None) => {
                return Err(ValidationError::new(
                    join(prefix, "prompt"),
                    "give exactly one of prompt or messages",
                ));
            }
            (Some(Value::String(p)), None) if p.len() > MAX_INPUT_BYTES => {
                return Err(ValidationError::new(
                    join(prefix, "prompt"),
                    format!(
                        "is {} bytes; at most {MAX_INPUT_BYTES} are allowed",
                        p.len()
                    ),
                ));
            }
            (Some(Value::String(p)), None) => Input::Prompt(p.clone()),
            (Some(_), None) => {
                return Err(ValidationError::new(
                    join(prefix, "prompt"),
                    "must be a string",
                ));
            }
            (None, Some(m)) => Input::Messages(parse_messages(m, &join(prefix, "messages"))?),
        };

        let params = match obj.get("params") {
            None | Some(Value::Null) => Params::of(&Map::new()),
            Some(v @ Value::Object(p)) => {
                let field = join(prefix, "params");
                check_depth(v, &field)?;
                let text = serde_json::to_string(v).expect("a value serializes");
                let size = text.len();
                if size > MAX_PARAMS_BYTES {
                    return Err(ValidationError::new(
                        field,
                        format!("is {size} bytes; at most {MAX_PARAMS_BYTES} are allowed"),
                    ));
                }
                check_params(p, &field)?;
                Params::with_text(p, text)
            }
            Some(_) => {
                return Err(ValidationError::new(
                    join(prefix, "params"),
                    "must be a JSON object",
                ));
            }
        };

        let priority = match obj.get("priority") {
            None | Some(Value::Null) => Priority::Normal,
            Some(Value::String(s)) => Priority::parse(s).ok_or_else(|| {
                ValidationError::new(
                    join(prefix, "priority"),
                    "must be one of: high, normal, low",
                )
            })?,
            Some(_) => {
                return Err(ValidationError::new(
                    join(prefix, "priority"),
                    "must be one of: high, normal, low",
                ));
            }
        };

        let max_attempts = match obj.get("max_attempts") {
            None | Some(Value::Null) => DEFAULT_MAX_ATTEMPTS,
            Some(v) => match v.as_i64() {
                Some(n) if (1..=i64::from(MAX_MAX_ATTEMPTS)).contains(&n) => n as i32,
                _ => {
                    return Err(ValidationError::new(
                        join(prefix, "max_attempts"),
                        format!("must be an integer from 1 to {MAX_MAX_ATTEMPTS}"),
                    ));
                }
            },
        };

        let cache = match obj.get("cache") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ValidationError::new(
                    join(prefix, "cache"),
                    "must be a boolean",
                ));
            }
        };

        Ok(NewTask {
            model,
            input,
            params,
            priority,
            max_attempts,
            metadata: metadata(obj, prefix)?,
            cache,
        })
    }
}

fn parse_messages(value: &Value, path: &str) -> Result<Vec<Message>> {
    let items = value
        .as_array()
        .ok_or_else(|| ValidationError::new(path, "must be an array of {role, content}"))?;
    if items.is_empty() {
        return Err(ValidationError::new(path, "must hold at least one message"));
    }
    if items.len() > MAX_MESSAGES {
        return Err(ValidationError::new(
            path,
            format!(
                "holds {} messages; at most {MAX_MESSAGES} are allowed",
                items.len()
            ),
        ));
    }
    let total: usize = items
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(str::len)
        .sum();
    if total > MAX_INPUT_BYTES {
        return Err(ValidationError::new(
            path,
            format!("contents are {total} bytes together; at most {MAX_INPUT_BYTES} are allowed"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{path}[{i}]");
            let obj = object(item, &at)?;
            reject_unknown(obj, &at, &["role", "content"])?;
            let role = match obj.get("role") {
                Some(Value::String(r))
                    if ["system", "user", "assistant", "tool"].contains(&r.as_str()) =>
                {
                    r.clone()
                }
                Some(_) => {
                    return Err(ValidationError::new(
                        format!("{at}.role"),
                        "must be one of: system, user, assistant, tool",
                    ));
                }
                None => return Err(ValidationError::new(format!("{at}.role"), "is required")),
            };
            let content = match obj.get("content") {
                Some(Value::String(c)) => c.clone(),
                Some(_) => {
                    return Err(ValidationError::new(
                        format!("{at}.content"),
                        "must be a string",
                    ));
                }
                None => {
                    return Err(ValidationError::new(format!("{at}.content"), "is required"));
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// `params` pass through to the backend, so only the keys whose meaning we
/// know are checked; `sim` holds the simulated backend's test controls.
fn check_params(params: &Map<String, Value>, path: &str) -> Result<()> {
    if let Some(v) = params.get("max_tokens") {
        match v.as_u64() {
            Some(n) if (1..=1_000_000).contains(&n) => {}
            _ => {
                return Err(ValidationError::new(
                    format!("{path}.max_tokens"),
                    "must be an integer from 1 to 1000000",
                ));
            }
        }
    }
    if let Some(v) = params.get("temperature") {
        match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => {}
            _ => {
                return Err(ValidationError::new(
                    format!("{path}.temperature"),
                    "must be a number from 0 to 2",
                ));
            }
        }
    }
    if let Some(sim) = params.get("sim") {
        let at = format!("{path}.sim");
        let obj = object(sim, &at)?;
        reject_unknown(
            obj,
            &at,
            &["latency_ms", "fail_attempts", "fail_permanent", "fail_runs"],
        )?;
        for key in ["latency_ms", "fail_attempts", "fail_runs"] {
            if let Some(v) = obj.get(key)
                && v.as_u64().is_none_or(|n| n > 3_600_000)
            {
                return Err(ValidationError::new(
                    format!("{at}.{key}"),
                    "must be a non-negative integer",
                ));
            }
        }
        if let Some(v) = obj.get("fail_permanent")
            && !v.is_boolean()
        {
            return Err(ValidationError::new(
                format!("{at}.fail_permanent"),
                "must be a boolean",
            ));
        }
    }
    Ok(())
}

/// Why a batch body was refused.
#[derive(Debug)]
pub enum BatchBodyError {
    /// Not JSON at all.
    Malformed(serde_json::Error),
    /// JSON, but not a valid batch; names the field.
    Invalid(ValidationError),
}

impl From<ValidationError> for BatchBodyError {
    fn from(e: ValidationError) -> BatchBodyError {
        BatchBodyError::Invalid(e)
    }
}

impl NewBatch {
    /// Parses and checks a batch body without building its JSON tree
    /// whole: the tasks are split as raw slices of `body`, and each is
    /// parsed, checked and dropped in turn, so a 100,000-task batch costs
    /// its body and its tasks, not a tree several times the body's size.
    /// Every field error names its path, e.g. `tasks[17].priority`.
    pub fn from_slice(body: &[u8]) -> std::result::Result<NewBatch, BatchBodyError> {
        use serde_json::value::RawValue;
        use std::collections::BTreeMap;
        let malformed_or = |e: serde_json::Error, invalid: ValidationError| {
            if e.is_data() {
                BatchBodyError::Invalid(invalid)
            } else {
                BatchBodyError::Malformed(e)
            }
        };
        let top: BTreeMap<String, &RawValue> = serde_json::from_slice(body)
            .map_err(|e| malformed_or(e, ValidationError::new("body", "must be a JSON object")))?;
        let known = ["tasks", "metadata"];
        if let Some(k) = top.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ValidationError::new(
                k.as_str(),
                format!("unknown field; expected one of: {}", known.join(", ")),
            )
            .into());
        }
        let mut head = Map::new();
        if let Some(m) = top.get("metadata") {
            let v: Value = serde_json::from_str(m.get()).map_err(BatchBodyError::Malformed)?;
            head.insert("metadata".to_owned(), v);
        }
        let metadata = metadata(&head, "")?;
        if let Some(m) = &metadata {
            check_no_nul(m, "metadata")?;
        }
        let items: Vec<&RawValue> = match top.get("tasks") {
            None => return Err(ValidationError::new("tasks", "is required").into()),
            Some(raw) if raw.get() == "null" => {
                return Err(ValidationError::new("tasks", "is required").into());
            }
            Some(raw) => serde_json::from_str(raw.get()).map_err(|e| {
                malformed_or(
                    e,
                    ValidationError::new("tasks", "must be an array of task objects"),
                )
            })?,
        };
        if items.is_empty() || items.len() > MAX_BATCH_TASKS {
            return Err(ValidationError::new(
                "tasks",
                format!(
                    "holds {} tasks; a batch takes 1 to {MAX_BATCH_TASKS}",
                    items.len()
                ),
            )
            .into());
        }
        let tasks = parse_tasks(&items)?;
        Ok(NewBatch { tasks, metadata })
    }
}

/// Batches from this many tasks are parsed on more than one thread.
const PARALLEL_PARSE_FROM: usize = 4_096;

/// Parses and checks the tasks of a batch, in order. A large batch is
/// split among up to 4 threads: its parse is CPU work that otherwise runs
/// while PostgreSQL, which writes the tasks next, waits (with the body's
/// read and checks, 0.25 to 0.27 s of a 50,000-task batch before its COPY
/// began). The error reported is the first task's in order, as when parsed
/// on one thread.
fn parse_tasks(items: &[&serde_json::value::RawValue]) -> Result<Vec<NewTask>, BatchBodyError> {
    if items.len() < PARALLEL_PARSE_FROM {
        return parse_part(0, items);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    parse_tasks_on(items, threads)
}

/// [`parse_tasks`] on `threads` threads, this one among them.
fn parse_tasks_on(
    items: &[&serde_json::value::RawValue],
    threads: usize,
) -> Result<Vec<NewTask>, BatchBodyError> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<NewTask>, BatchBodyError>> = std::thread::scope(|scope| {
        let mut chunks = items.chunks(per).enumerate();
        let (_, first) = chunks.next().unwrap_or((0, &[]));
        // A thread the OS refuses leaves its part to this one.
        let others: Vec<_> = chunks
            .map(|(k, chunk)| {
                let spawned = std::thread::Builder::new()
                    .spawn_scoped(scope, move || parse_part(k * per, chunk))
                    .ok();
                (k, chunk, spawned)
            })
            .collect();
        let mut parts = vec![parse_part(0, first)];
        for (k, chunk, spawned) in others {
            parts.push(match spawned {
                // A panic in a part is the caller's, as if parsed here.
                Some(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                None => parse_part(k * per, chunk),
            });
        }
        parts
    });
    let mut tasks = Vec::with_capacity(items.len());
    for part in parts {
        tasks.extend(part?);
    }
    Ok(tasks)
}

/// Parses and checks `items`, the batch's tasks from index `offset` on.
fn parse_part(
    offset: usize,
    items: &[&serde_json::value::RawValue],
) -> Result<Vec<NewTask>, BatchBodyError> {
    let mut tasks = Vec::with_capacity(items.len());
    for (i, raw) in items.iter().enumerate() {
        let v: Value = serde_json::from_str(raw.get()).map_err(BatchBodyError::Malformed)?;
        tasks.push(NewTask::from_json(&v, &format!("tasks[{}]", offset + i))?);
    }
    Ok(tasks)
}

/// A task as stored, for reading back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRecord {
    pub id: Uuid,
    pub tenant: String,
    pub batch_id: Option<Uuid>,
    pub model: String,
    pub priority: i16,
    pub status: TaskStatus,
    pub input: sqlx::types::Json<Input>,
    pub params: sqlx::types::Json<Map<String, Value>>,
    pub metadata: Option<Value>,
    pub attempts: i32,
    pub max_attempts: i32,
    /// 1, and one more per re-drive from the dead letters.
    pub run: i32,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub cache: bool,
    pub progress: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl TaskRecord {
    pub fn priority(&self) -> Priority {
        Priority::from_band(self.priority).unwrap_or(Priority::Normal)
    }
}

/// One attempt of a task, as `GET /tasks/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct AttemptRecord {
    /// 1, and one more for each re-drive of the task from the dead letters.
    pub run: i32,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `succeeded`, `retry`, `failed`, `cancelled`, `released` (handed back on
    /// shutdown, not charged), or null while it runs.
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// Progress of a batch, counted from its tasks.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub id: Uuid,
    pub tenant: String,
    pub total: i32,
    pub metadata: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub counts: Vec<(TaskStatus, i64)>,
    /// When the first of its tasks started, if one has.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last task finished, if all of them have.
    pub completed_at: Option<DateTime<Utc>>,
}

impl BatchRecord {
    pub fn count(&self, status: TaskStatus) -> i64 {
        self.counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    pub fn is_complete(&self) -> bool {
        let done: i64 = TaskStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| self.count(*s))
            .sum();
        done >= i64::from(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(v: Value) -> String {
        NewTask::from_json(&v, "").unwrap_err().field
    }

    #[test]
    fn defaults_apply() {
        let t = NewTask::from_json(&json!({"model": "sim", "prompt": "hi"}), "").unwrap();
        assert_eq!(t.priority, Priority::Normal);
        assert_eq!(t.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(t.input, Input::Prompt("hi".into()));
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(json!({"prompt": "x"})), "model");
        assert_eq!(field_of(json!({"model": 3, "prompt": "x"})), "model");
        assert_eq!(field_of(json!({"model": "a{b}", "prompt": "x"})), "model");
        assert_eq!(field_of(json!({"model": "m"})), "prompt");
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "messages": []})),
            "prompt"
        );
        assert_eq!(
            field_of(json!({"model": "m", "messages": [{"role": "user"}]})),
            "messages[0].content"
        );
        assert_eq!(
            field_of(json!({"model": "m", "messages": [{"role": "boss", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "priority": "urgent"})),
            "priority"
        );
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "max_attempts": 21})),
            "max_attempts"
        );
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "max_attempts": 1.5})),
            "max_attempts"
        );
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "priorty": "high"})),
            "priorty"
        );
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "params": {"sim": {"latency": 1}}})),
            "params.sim.latency"
        );
    }

    #[test]
    fn batch_paths_point_into_the_array() {
        let field = |body: Value| match NewBatch::from_slice(body.to_string().as_bytes()) {
            Err(BatchBodyError::Invalid(e)) => e.field,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(
            field(json!({"tasks": [
                {"model": "m", "prompt": "ok"},
                {"model": "m", "prompt": "ok", "priority": 1}
            ]})),
            "tasks[1].priority"
        );
        assert_eq!(field(json!({"tasks": []})), "tasks");
        assert_eq!(field(json!({"tasks": null})), "tasks");
        assert_eq!(field(json!({"tasks": {"a": 1}})), "tasks");
        assert_eq!(field(json!({"tasks": [1]})), "tasks[0]");
        assert_eq!(field(json!({"tasks": [], "colour": 1})), "colour");
        assert_eq!(field(json!([1, 2])), "body");
        assert_eq!(
            field(json!({"tasks": [{"model": "m", "prompt": "x"}], "metadata": 3})),
            "metadata"
        );
        assert!(matches!(
            NewBatch::from_slice(b"{\"tasks\": [}"),
            Err(BatchBodyError::Malformed(_))
        ));
        let ok = NewBatch::from_slice(
            br#"{"tasks": [{"model": "m", "prompt": "a"}, {"model": "n", "prompt": "b"}], "metadata": {"k": 1}}"#,
        )
        .unwrap();
        assert_eq!(ok.tasks.len(), 2);
        assert_eq!(ok.tasks[1].model, "n");
        assert_eq!(ok.metadata, Some(json!({"k": 1})));
    }

    #[test]
    fn a_large_batch_keeps_its_order_and_reports_its_first_bad_task() {
        use serde_json::value::RawValue;
        let n = 3 * PARALLEL_PARSE_FROM + 7;
        let raws = |bad: &[usize]| -> Vec<Box<RawValue>> {
            (0..n)
                .map(|i| {
                    let task = if bad.contains(&i) {
                        json!({"model": "m", "prompt": "x", "priority": i})
                    } else {
                        json!({"model": format!("m{i}"), "prompt": "x"})
                    };
                    RawValue::from_string(task.to_string()).unwrap()
                })
                .collect()
        };
        let good = raws(&[]);
        let good: Vec<&RawValue> = good.iter().map(|r| r.as_ref()).collect();
        // Bad tasks in the last part and in an earlier one: the first is
        // named, with its index in the whole batch.
        let bad = raws(&[n - 1, n - 2, PARALLEL_PARSE_FROM + 1]);
        let bad: Vec<&RawValue> = bad.iter().map(|r| r.as_ref()).collect();
        let last = raws(&[n - 1]);
        let last: Vec<&RawValue> = last.iter().map(|r| r.as_ref()).collect();
        for threads in 1..=4 {
            let ok = parse_tasks_on(&good, threads).unwrap();
            assert_eq!(ok.len(), n);
            assert!(
                ok.iter()
                    .enumerate()
                    .all(|(i, t)| t.model == format!("m{i}")),
                "{threads} threads: the tasks come back in the order sent"
            );
            for (items, first) in [(&bad, PARALLEL_PARSE_FROM + 1), (&last, n - 1)] {
                match parse_tasks_on(items, threads) {
                    Err(BatchBodyError::Invalid(e)) => {
                        assert_eq!(
                            e.field,
                            format!("tasks[{first}].priority"),
                            "{threads} threads"
                        )
                    }
                    other => panic!("{threads} threads: {other:?}"),
                }
            }
        }
        // And through the whole body, on this machine's threads.
        let body = json!({"tasks": (0..n).map(|i| json!({"model": format!("m{i}"), "prompt": "x"})).collect::<Vec<_>>()});
        let batch = NewBatch::from_slice(body.to_string().as_bytes()).unwrap();
        assert_eq!(batch.tasks[n - 1].model, format!("m{}", n - 1));
    }

    #[test]
    fn metadata_is_capped() {
        let big = "x".repeat(MAX_METADATA_BYTES);
        assert_eq!(
            field_of(json!({"model": "m", "prompt": "x", "metadata": {"k": big}})),
            "metadata"
        );
        let ok = "x".repeat(MAX_METADATA_BYTES - 100);
        assert!(
            NewTask::from_json(
                &json!({"model": "m", "prompt": "x", "metadata": {"k": ok}}),
                ""
            )
            .is_ok()
        );
    }
}
