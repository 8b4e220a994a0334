//! The delivery checker of the fleet fault tests: a ledger of what senders
//! sent and had acknowledged and what recipients received, and the verdict
//! computed from it.
//!
//! The unit of account is a *copy*: one payload id addressed to one
//! recipient. A sender gives every attempt a fresh payload id, so each copy
//! has one definite outcome on the sending side (acknowledged as stored, or
//! not), and the checker can tell a lost message from a retried one.

use std::collections::{BTreeSet, HashMap, HashSet};

/// Identifies one attempt: the sender's index and its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PayloadId {
    /// Which sender (an index into the test's senders).
    pub sender: u32,
    /// That sender's attempt counter.
    pub counter: u64,
}

/// One payload id addressed to one recipient (an index into the test's recipients).
pub type CopyId = (PayloadId, usize);

/// Everything the senders and recipients of one test recorded.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: HashSet<CopyId>,
    acked: HashSet<CopyId>,
    delivered: HashMap<CopyId, u32>,
    /// Deliveries whose bytes are not a payload of this run at all.
    undecodable: u64,
}

/// The outcome of one test, as counts; `failures` says whether it passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Copies handed to the broker (every attempt, acknowledged or not).
    pub sent: usize,
    /// Copies the broker acknowledged as stored.
    pub acked: usize,
    /// Deliveries recipients saw, counting repeats.
    pub delivered: u64,
    /// Acknowledged copies never delivered: the broker broke its promise.
    pub lost: usize,
    /// Copies delivered more than once.
    pub duplicated: usize,
    /// Deliveries of copies nobody sent (including undecodable bytes).
    pub unexpected: u64,
    /// Copies delivered although the sender never got an ack for them (a
    /// timed-out or failed send that was stored after all). Allowed: the
    /// sender could not know, and its retry carried a new payload id.
    pub delivered_unacked: usize,
    /// A few lost copies, for the failure message.
    pub lost_examples: Vec<CopyId>,
    /// A few unexpected copies, for the failure message.
    pub unexpected_examples: Vec<CopyId>,
}

/// How many examples a verdict keeps.
const EXAMPLES: usize = 5;

impl Ledger {
    /// A copy is about to be sent; record it before sending, so that a
    /// delivery racing the sender's bookkeeping is never taken as unexpected.
    pub fn sent(&mut self, copy: CopyId) {
        self.sent.insert(copy);
    }

    /// The broker acknowledged `copy` as stored.
    pub fn acked(&mut self, copy: CopyId) {
        self.acked.insert(copy);
    }

    /// A recipient received `copy`.
    pub fn delivered(&mut self, copy: CopyId) {
        *self.delivered.entry(copy).or_default() += 1;
    }

    /// A recipient received bytes that are not a payload of this run.
    pub fn undecodable(&mut self) {
        self.undecodable += 1;
    }

    /// Whether every acknowledged copy has been delivered (drains wait for this).
    pub fn all_acked_delivered(&self) -> bool {
        self.acked
            .iter()
            .all(|copy| self.delivered.contains_key(copy))
    }

    /// Deliveries so far, counting repeats (drains watch it for quiet).
    pub fn delivery_count(&self) -> u64 {
        self.delivered.values().map(|&n| u64::from(n)).sum::<u64>() + self.undecodable
    }

    /// The counts and the copies behind the failures.
    pub fn verdict(&self) -> Verdict {
        // Sorted, so examples are stable from run to run of the same data.
        let lost: BTreeSet<CopyId> = self
            .acked
            .iter()
            .filter(|copy| !self.delivered.contains_key(copy))
            .copied()
            .collect();
        let unexpected: BTreeSet<CopyId> = self
            .delivered
            .keys()
            .filter(|copy| !self.sent.contains(copy))
            .copied()
            .collect();
        let unexpected_deliveries: u64 = unexpected
            .iter()
            .map(|copy| u64::from(self.delivered[copy]))
            .sum();
        Verdict {
            sent: self.sent.len(),
            acked: self.acked.len(),
            delivered: self.delivery_count(),
            lost: lost.len(),
            duplicated: self.delivered.values().filter(|&&n| n > 1).count(),
            unexpected: unexpected_deliveries + self.undecodable,
            delivered_unacked: self
                .delivered
                .keys()
                .filter(|copy| self.sent.contains(copy) && !self.acked.contains(copy))
                .count(),
            lost_examples: lost.into_iter().take(EXAMPLES).collect(),
            unexpected_examples: unexpected.into_iter().take(EXAMPLES).collect(),
        }
    }
}

impl Verdict {
    /// What is wrong; empty when the run kept every promise. Lost and
    /// unexpected copies break the broker's contract outright. Duplicates
    /// fail too: every attempt has its own payload id and the client drops
    /// redeliveries of sequence numbers it already handed out, so a payload
    /// seen twice means the broker stored it twice.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.lost > 0 {
            failures.push(format!(
                "{} acknowledged copies were never delivered, for example {:?}",
                self.lost, self.lost_examples
            ));
        }
        if self.unexpected > 0 {
            failures.push(format!(
                "{} deliveries were never sent, for example {:?}",
                self.unexpected, self.unexpected_examples
            ));
        }
        if self.duplicated > 0 {
            failures.push(format!(
                "{} copies were delivered more than once",
                self.duplicated
            ));
        }
        failures
    }

    /// One line of counts for the test's report.
    pub fn summary(&self) -> String {
        format!(
            "sent={} acked={} delivered={} lost={} duplicated={} unexpected={} delivered_unacked={}",
            self.sent,
            self.acked,
            self.delivered,
            self.lost,
            self.duplicated,
            self.unexpected,
            self.delivered_unacked
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(counter: u64, recipient: usize) -> CopyId {
        (PayloadId { sender: 0, counter }, recipient)
    }

    /// Two copies sent, acked and delivered once each.
    fn clean_ledger() -> Ledger {
        let mut ledger = Ledger::default();
        for c in [copy(1, 0), copy(1, 1)] {
            ledger.sent(c);
            ledger.acked(c);
            ledger.delivered(c);
        }
        ledger
    }

    #[test]
    fn a_clean_run_passes() {
        let ledger = clean_ledger();
        assert!(ledger.all_acked_delivered());
        let verdict = ledger.verdict();
        assert_eq!(
            verdict.summary(),
            "sent=2 acked=2 delivered=2 lost=0 duplicated=0 unexpected=0 delivered_unacked=0"
        );
        assert_eq!(verdict.failures(), Vec::<String>::new());
    }

    #[test]
    fn a_lost_acked_copy_fails() {
        let mut ledger = clean_ledger();
        ledger.sent(copy(2, 0));
        ledger.acked(copy(2, 0));
        assert!(!ledger.all_acked_delivered());
        let verdict = ledger.verdict();
        assert_eq!(verdict.lost, 1);
        assert_eq!(verdict.lost_examples, vec![copy(2, 0)]);
        let failures = verdict.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("never delivered"), "{failures:?}");
    }

    #[test]
    fn an_unacked_copy_may_be_delivered_or_not() {
        let mut ledger = clean_ledger();
        // Failed or timed out at the sender: no promise either way.
        ledger.sent(copy(2, 0));
        ledger.sent(copy(3, 0));
        ledger.delivered(copy(3, 0));
        let verdict = ledger.verdict();
        assert_eq!((verdict.lost, verdict.delivered_unacked), (0, 1));
        assert_eq!(verdict.failures(), Vec::<String>::new());
    }

    #[test]
    fn a_copy_nobody_sent_fails() {
        let mut ledger = clean_ledger();
        // Sent to recipient 0 but delivered to recipient 2: the wrong mailbox.
        ledger.delivered(copy(1, 2));
        let verdict = ledger.verdict();
        assert_eq!(verdict.unexpected, 1);
        assert_eq!(verdict.unexpected_examples, vec![copy(1, 2)]);
        let failures = verdict.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("never sent"), "{failures:?}");
    }

    #[test]
    fn undecodable_bytes_are_unexpected() {
        let mut ledger = clean_ledger();
        ledger.undecodable();
        let verdict = ledger.verdict();
        assert_eq!(verdict.unexpected, 1);
        assert_eq!(verdict.failures().len(), 1);
    }

    #[test]
    fn a_copy_delivered_twice_fails() {
        let mut ledger = clean_ledger();
        ledger.delivered(copy(1, 1));
        let verdict = ledger.verdict();
        assert_eq!((verdict.duplicated, verdict.delivered), (1, 3));
        let failures = verdict.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("more than once"), "{failures:?}");
    }
}
