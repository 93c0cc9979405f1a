//! A hashed timing wheel of heartbeat deadlines, one per connection worker.
//!
//! Owns: the slots of executor indices due at each tick. At a million
//! executors a task or a timer per executor would cost more than the
//! heartbeats themselves; the wheel costs one push per schedule and one pass
//! per tick over what is due.
//!
//! Invariant: an item is popped at the first `advance` at or after its due
//! tick; a due time beyond the horizon (`slots × tick`) is pulled in to the
//! horizon (it then fires early, never late).

/// Slots of items keyed by due tick.
#[derive(Debug)]
pub struct Wheel {
    slots: Vec<Vec<u32>>,
    tick_us: u64,
    /// Every tick up to and including this one has been popped.
    done_tick: u64,
    len: usize,
}

impl Wheel {
    /// A wheel of `slots` (rounded up to a power of two) of `tick_us` each,
    /// starting at time `now_us`.
    pub fn new(slots: usize, tick_us: u64, now_us: u64) -> Self {
        let slots = slots.next_power_of_two().max(2);
        Self {
            slots: vec![Vec::new(); slots],
            tick_us: tick_us.max(1),
            done_tick: now_us / tick_us.max(1),
            len: 0,
        }
    }

    /// Items scheduled and not yet popped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `item` at `due_us`.
    pub fn insert(&mut self, due_us: u64, item: u32) {
        let horizon = self.done_tick + self.slots.len() as u64 - 1;
        let tick = (due_us / self.tick_us).clamp(self.done_tick + 1, horizon);
        let mask = self.slots.len() as u64 - 1;
        self.slots[(tick & mask) as usize].push(item);
        self.len += 1;
    }

    /// Pops every item due at or before `now_us` into `out`.
    pub fn advance(&mut self, now_us: u64, out: &mut impl Extend<u32>) {
        let now_tick = now_us / self.tick_us;
        let mask = self.slots.len() as u64 - 1;
        while self.done_tick < now_tick {
            self.done_tick += 1;
            let slot = &mut self.slots[(self.done_tick & mask) as usize];
            self.len -= slot.len();
            out.extend(slot.drain(..));
            if self.len == 0 {
                self.done_tick = now_tick;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_pop_at_their_tick_not_before() {
        let mut wheel = Wheel::new(16, 1_000, 0);
        wheel.insert(5_500, 1);
        wheel.insert(2_000, 2);
        let mut out = Vec::new();
        wheel.advance(1_999, &mut out);
        assert!(out.is_empty());
        wheel.advance(2_000, &mut out);
        assert_eq!(out, vec![2]);
        wheel.advance(5_999, &mut out);
        assert_eq!(out, vec![2, 1]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_due_time_in_the_past_pops_at_the_next_tick() {
        let mut wheel = Wheel::new(16, 1_000, 10_000);
        wheel.insert(3_000, 7);
        let mut out = Vec::new();
        wheel.advance(11_000, &mut out);
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn a_due_time_past_the_horizon_fires_early_not_late() {
        let mut wheel = Wheel::new(8, 1_000, 0);
        wheel.insert(1_000_000, 9);
        let mut out = Vec::new();
        wheel.advance(7_000, &mut out);
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn a_long_idle_gap_skips_empty_ticks() {
        let mut wheel = Wheel::new(8, 1_000, 0);
        let mut out: Vec<u32> = Vec::new();
        wheel.advance(1_000_000_000, &mut out);
        wheel.insert(1_000_002_000, 3);
        wheel.advance(1_000_001_000, &mut out);
        assert!(out.is_empty());
        wheel.advance(1_000_002_000, &mut out);
        assert_eq!(out, vec![3]);
    }
}
