//! Rate limits shared by every API replica: one atomic script per check.
//!
//! GCRA (the generic cell rate algorithm): each limit keeps one number, the
//! theoretical arrival time (TAT) of the next unit at the allowed rate. A
//! request of `cost` units is allowed when `max(TAT, now) + cost × interval`
//! lies no further ahead of now than the burst tolerance; it then becomes
//! the new TAT. Time is Redis's own clock (`TIME`), so the API hosts'
//! clocks do not matter. The key expires when it would hold nothing.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::Queue;
use crate::error::Result;

/// Checks and takes `cost` units. ARGV: interval µs per unit, tolerance µs,
/// cost. Returns 0 when allowed, else µs until it would be.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval
local wait = new_tat - tolerance - now
if wait > 0 then return wait end
redis.call('HSET', KEYS[1], 'tat', new_tat, 'interval', interval)
redis.call('PEXPIRE', KEYS[1], math.ceil((new_tat - now) / 1000) + 1000)
return 0
",
    )
});

/// Gives back (negative) or charges (positive) units after the fact, if the
/// limit is kept at all. ARGV: units.
static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local tat = redis.call('HGET', KEYS[1], 'tat')
if not tat then return 0 end
local interval = tonumber(redis.call('HGET', KEYS[1], 'interval'))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new_tat = tonumber(tat) + tonumber(ARGV[1]) * interval
if new_tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], 'tat', new_tat)
redis.call('PEXPIRE', KEYS[1], math.ceil((new_tat - now) / 1000) + 1000)
return 0
",
    )
});

/// A rate: `per_period` units each `period`, of which `burst` may come at
/// once.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_period: u64,
    pub period: Duration,
    pub burst: u64,
}

impl Rate {
    /// Requests per second, with a tenth of a second's worth at once: a
    /// client holding to the limit is never refused, and one sending as
    /// fast as it can gets the limit, not the limit plus a large burst.
    pub fn per_second(n: u32) -> Rate {
        Rate {
            per_period: u64::from(n),
            period: Duration::from_secs(1),
            burst: u64::from(n).div_ceil(10).max(1),
        }
    }

    /// Tokens per minute, all of a minute's worth usable at once.
    pub fn per_minute(n: u64) -> Rate {
        Rate {
            per_period: n,
            period: Duration::from_secs(60),
            burst: n,
        }
    }

    fn interval_us(&self) -> f64 {
        self.period.as_micros() as f64 / self.per_period.max(1) as f64
    }
}

impl Queue {
    fn limit_key(&self, kind: &str, name: &str) -> String {
        format!("{}:limit:{kind}:{name}", self.prefix)
    }

    /// Takes `cost` units of `rate` from the limit `kind`/`name`. `None`
    /// when allowed; otherwise how long until the same request would be.
    pub async fn take(
        &self,
        kind: &str,
        name: &str,
        rate: Rate,
        cost: u64,
    ) -> Result<Option<Duration>> {
        let interval = rate.interval_us();
        let tolerance = interval * rate.burst as f64;
        let mut conn = self.conn().await?;
        let wait_us: i64 = TAKE
            .key(self.limit_key(kind, name))
            .arg(interval)
            .arg(tolerance)
            .arg(cost)
            .invoke_async(&mut conn)
            .await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us as u64)))
    }

    /// Charges (positive) or gives back (negative) units of the limits
    /// `kind`/`name` that exist: a worker corrects its tenants' token
    /// estimates by what the backends reported, once per tenant per batch
    /// of completions.
    pub async fn adjust(&self, kind: &str, deltas: &[(&str, i64)]) -> Result<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for (name, delta) in deltas {
            let () = ADJUST
                .key(self.limit_key(kind, name))
                .arg(*delta)
                .invoke_async(&mut conn)
                .await?;
        }
        Ok(())
    }
}
