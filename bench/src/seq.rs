//! Loss and duplicate accounting by sequence number: a device numbers its
//! notifications 1, 2, 3, …; the hub's event stream shows which arrived.

use serde::Serialize;

/// The largest sequence number tracked (a bound on memory: one byte per
/// number).
const MAX_TRACKED: u64 = 50_000_000;

/// What one device's stream showed.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// Times each sequence number was seen (index = seq - 1), saturating.
    seen: Vec<u8>,
    received: u64,
    out_of_order: u64,
    highest: u64,
    /// Numbers outside 1..=MAX_TRACKED (0, or absurdly large).
    invalid: u64,
}

/// The verdict against what the device sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqReport {
    /// Notifications the device sent (1..=sent).
    pub sent: u64,
    /// Events seen, duplicates included.
    pub received: u64,
    /// Distinct sequence numbers seen within 1..=sent.
    pub distinct: u64,
    /// Numbers in 1..=sent never seen.
    pub lost: u64,
    /// Extra sightings of a number already seen.
    pub duplicated: u64,
    /// Events whose number was lower than one seen before.
    pub out_of_order: u64,
    /// Numbers above `sent` or outside the tracked range (should be 0).
    pub unexpected: u64,
}

impl SeqReport {
    pub fn add(&mut self, o: &SeqReport) {
        self.sent += o.sent;
        self.received += o.received;
        self.distinct += o.distinct;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.unexpected += o.unexpected;
    }
}

impl SeqTracker {
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if seq == 0 || seq > MAX_TRACKED {
            self.invalid += 1;
            return;
        }
        if seq < self.highest {
            self.out_of_order += 1;
        }
        self.highest = self.highest.max(seq);
        let i = (seq - 1) as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 1, 0);
        }
        self.seen[i] = self.seen[i].saturating_add(1);
    }

    /// Against `sent` notifications numbered 1..=sent.
    pub fn report(&self, sent: u64) -> SeqReport {
        let mut r = SeqReport {
            sent,
            received: self.received,
            out_of_order: self.out_of_order,
            unexpected: self.invalid,
            ..SeqReport::default()
        };
        for (i, &n) in self.seen.iter().enumerate() {
            let seq = i as u64 + 1;
            if n == 0 {
                continue;
            }
            if seq > sent {
                r.unexpected += u64::from(n);
                continue;
            }
            r.distinct += 1;
            r.duplicated += u64::from(n) - 1;
        }
        r.lost = sent.min(MAX_TRACKED) - r.distinct;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_in_order_stream() {
        let mut t = SeqTracker::default();
        for s in 1..=5 {
            t.record(s);
        }
        assert_eq!(
            t.report(5),
            SeqReport {
                sent: 5,
                received: 5,
                distinct: 5,
                ..SeqReport::default()
            }
        );
    }

    #[test]
    fn loss_duplicates_reordering_and_strays() {
        let mut t = SeqTracker::default();
        for s in [1, 3, 3, 2, 6, 0, 9] {
            t.record(s);
        }
        let r = t.report(7);
        assert_eq!(r.received, 7);
        assert_eq!(r.distinct, 4); // 1 2 3 6
        assert_eq!(r.lost, 3); // 4 5 7
        assert_eq!(r.duplicated, 1); // the second 3
        assert_eq!(r.out_of_order, 1); // 2 after 3
        assert_eq!(r.unexpected, 2); // 0, and 9 > 7 sent
        let mut sum = r;
        sum.add(&r);
        assert_eq!((sum.lost, sum.sent), (6, 14));
    }

    #[test]
    fn nothing_seen_is_all_lost() {
        assert_eq!(SeqTracker::default().report(3).lost, 3);
        assert_eq!(SeqTracker::default().report(0), SeqReport::default());
    }
}
