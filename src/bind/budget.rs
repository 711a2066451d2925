//! A frame budget: `update(dt, {budget = seconds, max_events = n})` stops dispatching once the
//! time or the count is spent and leaves the rest queued, oldest first, for the next update.
//! A unit of work is one driver event, one socket serviced, one RPC message, one timer or one
//! coroutine resumed; the check comes before each, so an update overruns its budget by at most
//! the one unit that was running.

use std::time::{Duration, Instant};

use mlua::{Table, Value};

use super::error::{bad_arg, misuse};

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Budget {
    until: Option<Instant>,
    max_events: Option<u64>,
    /// Units run so far in this update.
    pub handled: u64,
    /// The budget stopped this update with work left.
    pub cut: bool,
    /// Then: the work items left for the next update.
    pub deferred: u64,
}

impl Budget {
    /// No limit (plain `update(dt)`, and every nested tick).
    pub fn unlimited() -> Budget {
        Budget::default()
    }

    /// The limits of `update(dt, opts)`, counted from `start`.
    pub fn from_options(call: &str, opts: &Table, start: Instant) -> mlua::Result<Budget> {
        let mut budget = Budget::unlimited();
        let seconds = match opts.get::<Value>("budget")? {
            Value::Nil => None,
            Value::Integer(n) if n > 0 => Some(n as f64),
            Value::Number(s) if s > 0.0 => Some(s),
            other => return Err(bad_arg(call, "budget", "a number of seconds > 0", &other)),
        };
        // A budget too large to add to the clock (or infinite) is no time limit.
        budget.until =
            seconds.and_then(|s| Duration::try_from_secs_f64(s).ok()).and_then(|d| start.checked_add(d));
        match opts.get::<Value>("max_events")? {
            Value::Nil => {}
            Value::Integer(n) if n > 0 => budget.max_events = Some(n as u64),
            Value::Number(n) if n.fract() == 0.0 && n >= 1.0 => budget.max_events = Some(n as u64),
            other => return Err(bad_arg(call, "max_events", "an integer >= 1", &other)),
        }
        for pair in opts.pairs::<Value, Value>() {
            let (key, _) = pair?;
            let known = matches!(&key, Value::String(s) if matches!(s.as_bytes().as_ref(), b"budget" | b"max_events"));
            if !known {
                let key = key.to_string().unwrap_or_else(|_| "?".into());
                return Err(misuse(call, format!("unknown option '{key}' (use budget, max_events)")));
            }
        }
        Ok(budget)
    }

    /// Whether this tick has limits at all.
    pub fn limited(&self) -> bool {
        self.until.is_some() || self.max_events.is_some()
    }

    /// Counts one more unit of work if the budget allows it; false (and `cut`) when it is spent.
    /// The first unit always runs, so an update makes progress however small its budget (or
    /// however long its fixed part, the poll and the queued sends, took).
    pub fn take(&mut self) -> bool {
        let spent = self.handled > 0
            && (self.max_events.is_some_and(|max| self.handled >= max)
                || self.until.is_some_and(|until| Instant::now() >= until));
        if spent {
            self.cut = true;
            return false;
        }
        self.handled += 1;
        true
    }
}
