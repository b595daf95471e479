//! Query strings of the listing routes (`/tasks`, `/dlq`, `/batches`):
//! every parameter checked, each error naming the parameter.

use chrono::{DateTime, Utc};
use queue_core::store::{DeadFilter, TaskFilter};
use queue_core::task::{Priority, TaskStatus};
use uuid::Uuid;

use crate::error::{ApiError, Result};

/// Most rows one page lists.
pub const MAX_PAGE: i64 = 1000;
const DEFAULT_PAGE: i64 = 50;

/// A listing request: which rows, and which page.
#[derive(Debug, Default)]
pub struct Listing {
    pub filter: TaskFilter,
    /// The last id of the previous page (`next_cursor`).
    pub cursor: Option<Uuid>,
    pub limit: i64,
}

impl Listing {
    /// The dead-letter filter of the same parameters.
    pub fn dead_filter(&self) -> DeadFilter {
        DeadFilter {
            task_id: None,
            batch_id: self.filter.batch_id,
            model: self.filter.model.clone(),
            error_contains: self.filter.error_contains.clone(),
            finished_after: self.filter.finished_after,
            finished_before: self.filter.finished_before,
        }
    }
}

/// Parses `query`, accepting only the parameters in `allowed`.
pub fn listing(query: Option<&str>, allowed: &[&str]) -> Result<Listing> {
    let mut out = Listing {
        limit: DEFAULT_PAGE,
        ..Listing::default()
    };
    for (k, v) in pairs(query)? {
        if !allowed.contains(&k) {
            return Err(ApiError::bad_query(
                k,
                format!("unknown query parameter; expected {}", allowed.join(", ")),
            ));
        }
        let f = &mut out.filter;
        match k {
            "status" => {
                f.status = Some(TaskStatus::parse(&v).ok_or_else(|| {
                    ApiError::bad_query(
                        k,
                        "status must be scheduled, queued, running, succeeded, failed or cancelled",
                    )
                })?);
            }
            "model" => f.model = Some(v),
            "batch_id" => f.batch_id = Some(id(k, &v, "batch_id must be an id")?),
            "priority" => {
                f.priority = Some(Priority::parse(&v).ok_or_else(|| {
                    ApiError::bad_query(k, "priority must be high, normal or low")
                })?);
            }
            "error_contains" => f.error_contains = Some(v),
            "finished_after" => f.finished_after = Some(time(k, &v)?),
            "finished_before" => f.finished_before = Some(time(k, &v)?),
            "limit" => out.limit = limit(&v)?,
            "cursor" => out.cursor = Some(id(k, &v, "cursor must be a next_cursor value")?),
            // Handled by the route (long-poll).
            "wait" => {}
            _ => unreachable!("every allowed parameter is handled"),
        }
    }
    Ok(out)
}

/// A page's `limit=`: 1 to [`MAX_PAGE`].
pub fn limit(v: &str) -> Result<i64> {
    v.parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::bad_query("limit", "limit must be an integer from 1 to 1000"))
}

/// The `next_cursor` of a page: its last id when the page is full.
pub fn next_cursor(len: usize, last: Option<Uuid>, limit: i64) -> Option<Uuid> {
    (len as i64 == limit).then_some(last).flatten()
}

fn id(field: &str, v: &str, message: &str) -> Result<Uuid> {
    Uuid::parse_str(v).map_err(|_| ApiError::bad_query(field, message))
}

fn time(field: &str, v: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::bad_query(
                field,
                format!("{field} must be an RFC 3339 time, e.g. 2026-12-01T12:00:00Z"),
            )
        })
}

/// `key=value` pairs, values percent-decoded. A NUL character (`%00`) is
/// refused: no stored text can hold one.
pub fn pairs(query: Option<&str>) -> Result<Vec<(&str, String)>> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| {
            let v = percent_decode(v);
            if v.contains('\0') {
                return Err(ApiError::bad_query(k, "must not contain a NUL character"));
            }
            Ok((k, v))
        })
        .collect()
}

/// `%XX` and `+` in a query value (model names may hold `/` or `:`; times
/// hold `+`, which a client must send as `%2B`).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_and_named() {
        let all = ["status", "model", "finished_after", "limit"];
        let l = listing(
            Some("status=failed&model=a%2Fb&finished_after=2026-12-01T10:00:00Z&limit=7"),
            &all,
        )
        .unwrap();
        assert_eq!(l.filter.status, Some(TaskStatus::Failed));
        assert_eq!(l.filter.model.as_deref(), Some("a/b"));
        assert_eq!(l.limit, 7);
        assert!(l.filter.finished_after.is_some());
        for (q, field) in [
            ("status=done", "status"),
            ("limit=0", "limit"),
            ("finished_after=yesterday", "finished_after"),
            ("priority=high", "priority"),
        ] {
            match listing(Some(q), &all) {
                Err(ApiError::BadQuery { field: f, .. }) => assert_eq!(f, field, "{q}"),
                other => panic!("{q}: {other:?}"),
            }
        }
    }
}
