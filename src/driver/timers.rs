//! A timer queue on the monotonic clock: O(log n) insert and expiry, O(1) when nothing is due.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// Timers keyed by a never-reused id. Cancelling is O(1); the heap entry is skipped lazily.
pub struct TimerQueue<T> {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    live: HashMap<u64, (Instant, T)>,
    next_id: u64,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue { heap: BinaryHeap::new(), live: HashMap::new(), next_id: 1 }
    }
}

impl<T> TimerQueue<T> {
    /// Schedules `value` at `deadline` and returns its id.
    pub fn insert(&mut self, deadline: Instant, value: T) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.insert_with_id(id, deadline, value);
        id
    }

    /// Re-arms a timer under an id [`TimerQueue::pop_due`] returned (intervals keep their id).
    pub fn insert_with_id(&mut self, id: u64, deadline: Instant, value: T) {
        self.live.insert(id, (deadline, value));
        self.heap.push(Reverse((deadline, id)));
        // Cancelled timers leave heap entries behind; rebuild before they dominate.
        if self.heap.len() > 64 + 2 * self.live.len() {
            self.heap = self.live.iter().map(|(&id, &(at, _))| Reverse((at, id))).collect();
        }
    }

    pub fn cancel(&mut self, id: u64) -> Option<T> {
        self.live.remove(&id).map(|(_, value)| value)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.live.contains_key(&id)
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if self.live.get(&id).is_some_and(|(live_at, _)| *live_at == at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Removes and returns one timer whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u64, Instant, T)> {
        let at = self.next_deadline()?;
        if at > now {
            return None;
        }
        let Reverse((_, id)) = self.heap.pop()?;
        let (at, value) = self.live.remove(&id)?;
        Some((id, at, value))
    }

    /// How many timers are due at `now` (O(n): for reports, not for the hot path).
    pub fn due(&self, now: Instant) -> usize {
        self.live.values().filter(|(at, _)| *at <= now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_deadline_order_and_skips_cancelled() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = TimerQueue::default();
        let late = q.insert(t0 + ms(30), "late");
        let gone = q.insert(t0 + ms(10), "cancelled");
        q.insert(t0 + ms(20), "early");
        assert_eq!(q.cancel(gone), Some("cancelled"));
        assert_eq!(q.next_deadline(), Some(t0 + ms(20)));
        assert!(q.pop_due(t0 + ms(19)).is_none());
        assert_eq!(q.pop_due(t0 + ms(40)).map(|t| t.2), Some("early"));
        assert_eq!(q.pop_due(t0 + ms(40)).map(|t| t.0), Some(late));
        assert!(q.pop_due(t0 + ms(40)).is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn rearming_with_same_id_ignores_the_old_heap_entry() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        let id = q.insert(t0, 1);
        let (id2, _, v) = q.pop_due(t0).unwrap();
        assert_eq!((id2, v), (id, 1));
        q.insert_with_id(id, t0 + Duration::from_secs(1), 1);
        assert!(q.pop_due(t0).is_none());
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn cancelled_entries_do_not_accumulate() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        for i in 0..10_000u64 {
            let id = q.insert(t0 + Duration::from_secs(i), i);
            q.cancel(id);
        }
        assert!(q.heap.len() <= 64 + 2, "heap kept {} stale entries", q.heap.len());
    }
}
