//! Submission and completion queue bookkeeping, without memory or doorbells:
//! tail and head indexes, the phase tag, and the shadow doorbell event-index
//! test. The driver keeps the entries in DMA memory; this decides where.

/// A submission queue's producer side.
#[derive(Clone, Debug)]
pub struct SqState {
    depth: u16,
    tail: u16,
    /// The controller's head as last reported in a completion (SQHD).
    head: u16,
}

impl SqState {
    pub fn new(depth: u16) -> Self {
        assert!(depth >= 2, "NVMe queues hold at least 2 entries");
        Self {
            depth,
            tail: 0,
            head: 0,
        }
    }

    pub fn depth(&self) -> u16 {
        self.depth
    }

    pub fn tail(&self) -> u16 {
        self.tail
    }

    /// One slot always stays empty: tail + 1 == head means full.
    pub fn is_full(&self) -> bool {
        (self.tail + 1) % self.depth == self.head
    }

    /// Entries the controller has not consumed yet.
    pub fn pending(&self) -> u16 {
        (self.tail + self.depth - self.head) % self.depth
    }

    /// Claims the slot at the tail, returning its index, or None when full.
    pub fn push(&mut self) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        let slot = self.tail;
        self.tail = (self.tail + 1) % self.depth;
        Some(slot)
    }

    /// Records SQHD from a completion. A head outside the queue, or one that
    /// claims entries we never submitted, is the controller's fault.
    pub fn update_head(&mut self, head: u16) -> Result<(), u16> {
        if head >= self.depth {
            return Err(head);
        }
        // The new head must lie in [old head, tail] going round the ring.
        let consumed = (head + self.depth - self.head) % self.depth;
        if consumed > self.pending() {
            return Err(head);
        }
        self.head = head;
        Ok(())
    }
}

/// A completion queue's consumer side.
#[derive(Clone, Debug)]
pub struct CqState {
    depth: u16,
    head: u16,
    /// The phase tag a new entry carries; flips each time the head wraps.
    phase: bool,
}

impl CqState {
    pub fn new(depth: u16) -> Self {
        assert!(depth >= 2, "NVMe queues hold at least 2 entries");
        Self {
            depth,
            head: 0,
            // The queue starts zeroed, so the first pass posts phase 1.
            phase: true,
        }
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    pub fn phase(&self) -> bool {
        self.phase
    }

    /// Whether an entry with `phase` at the head is new.
    pub fn is_new(&self, phase: bool) -> bool {
        phase == self.phase
    }

    /// Consumes the entry at the head.
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head == self.depth {
            self.head = 0;
            self.phase = !self.phase;
        }
    }
}

/// Linux's `nvme_dbbuf_need_event`: with shadow doorbells the controller
/// publishes the index it wants to hear about (EventIdx); the host rings
/// the real doorbell only when moving from `old` to `new` crosses it.
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Allocates command identifiers: each names one slot of per-command state.
#[derive(Clone, Debug)]
pub struct CidPool {
    free: Vec<u16>,
    busy: Vec<bool>,
}

impl CidPool {
    pub fn new(count: u16) -> Self {
        Self {
            free: (0..count).rev().collect(),
            busy: vec![false; usize::from(count)],
        }
    }

    pub fn take(&mut self) -> Option<u16> {
        let cid = self.free.pop()?;
        self.busy[usize::from(cid)] = true;
        Some(cid)
    }

    /// Releases `cid`; false if it was not in flight (a bogus completion).
    pub fn release(&mut self, cid: u16) -> bool {
        match self.busy.get_mut(usize::from(cid)) {
            Some(b) if *b => {
                *b = false;
                self.free.push(cid);
                true
            }
            _ => false,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.busy.len() - self.free.len()
    }

    pub fn is_busy(&self, cid: u16) -> bool {
        self.busy.get(usize::from(cid)).copied().unwrap_or(false)
    }

    /// Forgets every command (after a controller reset dropped them).
    pub fn reset(&mut self) {
        *self = Self::new(self.busy.len() as u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sq_fills_leaving_one_slot() {
        let mut sq = SqState::new(4);
        assert_eq!(sq.push(), Some(0));
        assert_eq!(sq.push(), Some(1));
        assert_eq!(sq.push(), Some(2));
        assert_eq!(sq.push(), None, "depth 4 holds 3 commands");
        assert_eq!(sq.pending(), 3);
        sq.update_head(2).unwrap();
        assert_eq!(sq.push(), Some(3));
        assert_eq!(sq.push(), Some(0), "the tail wraps");
        assert_eq!(sq.push(), None);
    }

    #[test]
    fn sq_rejects_impossible_heads() {
        let mut sq = SqState::new(8);
        sq.push();
        sq.push();
        assert_eq!(sq.update_head(8), Err(8), "outside the queue");
        assert_eq!(sq.update_head(5), Err(5), "past the tail");
        sq.update_head(2).unwrap();
        assert_eq!(sq.update_head(1), Err(1), "backwards");
        sq.update_head(2).unwrap();
    }

    #[test]
    fn cq_phase_flips_on_wrap() {
        let mut cq = CqState::new(3);
        assert!(cq.is_new(true) && !cq.is_new(false));
        for _ in 0..3 {
            cq.advance();
        }
        assert_eq!(cq.head(), 0);
        assert!(cq.is_new(false), "second pass posts phase 0");
        for _ in 0..3 {
            cq.advance();
        }
        assert!(cq.phase());
    }

    #[test]
    fn event_index() {
        // Controller asked to hear when the tail passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 2));
        assert!(!need_event(5, 5, 2), "not yet past it");
        assert!(!need_event(5, 9, 7), "already told");
        // Across the u16 wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
    }

    #[test]
    fn cids() {
        let mut p = CidPool::new(2);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_ne!(a, b);
        assert!(p.take().is_none());
        assert!(p.release(a));
        assert!(!p.release(a), "double completion");
        assert!(!p.release(99), "unknown cid");
        assert_eq!(p.in_flight(), 1);
        p.reset();
        assert_eq!(p.in_flight(), 0);
    }
}
