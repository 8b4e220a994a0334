//! Admission control: which incoming connections the broker accepts, which
//! must first prove their source address with a QUIC Retry, and which it
//! refuses; and the counts behind those decisions, per broker and per
//! source address.
//!
//! A connection holds a [`Ticket`] from the moment it is accepted. The
//! ticket counts it as a connection and as unauthenticated (globally and
//! for its source) until it authenticates, turns anonymous, or ends, so a
//! half-open handshake, a slow client and an anonymous session each hold a
//! bounded kind of place, and dropping the ticket gives every place back.
//!
//! Until a client has answered a Retry, its source address may be forged.
//! So a per-source limit never refuses an unvalidated connection: it asks
//! for a Retry instead, which a forged source cannot answer and which costs
//! the broker one small stateless packet. Only a validated source is
//! refused for its own behaviour, so nobody can get someone else's address
//! refused by spoofing it.
//!
//! The decision itself ([`Admission::decide`]) is a pure function of the
//! counts and the limits, tested without sockets.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::config::Config;

/// Where a connection comes from, as the per-source limits count it: an
/// IPv4 address, or the /64 prefix of an IPv6 address (one host or
/// subscriber usually holds a whole /64). IPv4-mapped IPv6 addresses count
/// as their IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a connection from `remote`.
    pub fn of(remote: SocketAddr) -> Self {
        match remote.ip().to_canonical() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
        }
    }

    /// The address (or prefix) counted.
    pub fn ip(&self) -> IpAddr {
        self.0
    }
}

/// Why a connection was refused; the metric label of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` reached.
    Connections,
    /// `limits.max_unauthenticated` reached.
    Unauthenticated,
    /// The source's `limits.per_source.max_unauthenticated` reached.
    SourceUnauthenticated,
    /// The source is over `limits.per_source.handshake_rate`.
    SourceRate,
}

impl Refusal {
    /// The `reason` label of `backbone_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::SourceUnauthenticated => "source_unauthenticated",
            Refusal::SourceRate => "source_rate",
        }
    }
}

/// Why a Retry was asked for; the metric label of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// New connections arrive faster than `limits.retry_above_rate`.
    Rate,
    /// At least `limits.retry_above_unauthenticated` connections are
    /// unauthenticated: half-open handshakes may be filling the places.
    Unauthenticated,
    /// The source is over one of its per-source limits.
    Source,
}

impl RetryReason {
    /// The `reason` label of `backbone_quic_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::Rate => "rate",
            RetryReason::Unauthenticated => "unauthenticated",
            RetryReason::Source => "source",
        }
    }
}

/// What to do with an incoming connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Accept it.
    Accept,
    /// Ask the client to prove its address first.
    Retry(RetryReason),
    /// Refuse it.
    Refuse(Refusal),
}

/// What [`Admission::decide`] knows about one incoming connection and the
/// broker's state when it arrives.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts {
    /// Connections open now.
    pub connections: usize,
    /// Connections unauthenticated now.
    pub unauthenticated: usize,
    /// Connections of this source unauthenticated now.
    pub source_unauthenticated: usize,
    /// The client answered a Retry (its address is proven).
    pub validated: bool,
    /// A Retry may still be asked for (it has not answered one yet).
    pub may_retry: bool,
    /// The source is on the operator's exempt list.
    pub exempt: bool,
    /// New connections overall arrive faster than `retry_above_rate`.
    pub over_global_rate: bool,
    /// This source's new connections arrive faster than its handshake rate.
    pub over_source_rate: bool,
}

/// The limits [`Admission::decide`] applies, from `[limits]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `limits.max_connections`.
    pub max_connections: usize,
    /// `limits.max_unauthenticated`.
    pub max_unauthenticated: usize,
    /// `limits.retry_above_unauthenticated`.
    pub retry_above_unauthenticated: usize,
    /// `limits.per_source.max_unauthenticated`.
    pub source_max_unauthenticated: usize,
    /// `limits.max_anonymous`.
    pub max_anonymous: usize,
    /// `limits.per_source.max_anonymous`.
    pub source_max_anonymous: usize,
}

/// Places held per source.
#[derive(Debug, Default)]
struct SourceCounts {
    unauthenticated: usize,
    anonymous: usize,
}

/// The broker's admission state: counts, limits and rate limiters.
pub struct Admission {
    limits: Limits,
    exempt: Vec<ipnet::IpNet>,
    connections: AtomicUsize,
    unauthenticated: AtomicUsize,
    anonymous: AtomicUsize,
    retries: AtomicU64,
    sources: DashMap<Source, SourceCounts>,
    /// `limits.retry_above_rate`; `None` when 0 (always retry).
    global_rate: Option<DefaultDirectRateLimiter>,
    /// `limits.per_source.handshake_rate`; `None` when 0 (no limit).
    source_rate: Option<DefaultKeyedRateLimiter<Source>>,
}

impl Admission {
    /// Admission state for `config`.
    pub fn new(config: &Config) -> Arc<Self> {
        let limits = &config.limits;
        let per_source = &limits.per_source;
        let quota = |rate: u32, burst: u32| {
            std::num::NonZeroU32::new(rate).map(|rate| {
                let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
                Quota::per_second(rate).allow_burst(burst)
            })
        };
        Arc::new(Self {
            limits: Limits {
                max_connections: limits.max_connections,
                max_unauthenticated: limits.max_unauthenticated,
                retry_above_unauthenticated: limits.retry_above_unauthenticated,
                source_max_unauthenticated: per_source.max_unauthenticated,
                max_anonymous: limits.max_anonymous,
                source_max_anonymous: per_source.max_anonymous,
            },
            exempt: per_source.exempt.clone(),
            connections: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            anonymous: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
            sources: DashMap::new(),
            global_rate: quota(limits.retry_above_rate, limits.retry_above_rate)
                .map(governor::RateLimiter::direct),
            source_rate: quota(per_source.handshake_rate, per_source.handshake_burst)
                .map(governor::RateLimiter::dashmap),
        })
    }

    /// The decision for one incoming connection, from `facts` alone.
    ///
    /// Order matters: the hard cap on connections first; then a Retry for
    /// an unvalidated client whenever anything looks like a flood, since a
    /// Retry is cheap and stops forged sources; then the caps that refuse.
    pub fn decide(limits: &Limits, facts: &Facts) -> Decision {
        if facts.connections >= limits.max_connections {
            return Decision::Refuse(Refusal::Connections);
        }
        let source_full =
            !facts.exempt && facts.source_unauthenticated >= limits.source_max_unauthenticated;
        let source_fast = !facts.exempt && facts.over_source_rate;
        if !facts.validated && facts.may_retry {
            if facts.over_global_rate {
                return Decision::Retry(RetryReason::Rate);
            }
            if facts.unauthenticated >= limits.retry_above_unauthenticated {
                return Decision::Retry(RetryReason::Unauthenticated);
            }
            if source_full || source_fast {
                return Decision::Retry(RetryReason::Source);
            }
        }
        if facts.unauthenticated >= limits.max_unauthenticated {
            return Decision::Refuse(Refusal::Unauthenticated);
        }
        if source_full {
            return Decision::Refuse(Refusal::SourceUnauthenticated);
        }
        if source_fast {
            return Decision::Refuse(Refusal::SourceRate);
        }
        Decision::Accept
    }

    /// Decides on a connection from `remote` and, if it is accepted,
    /// returns its ticket. Counts retries and refusals in the metrics.
    pub fn admit(
        self: &Arc<Self>,
        remote: SocketAddr,
        validated: bool,
        may_retry: bool,
    ) -> Result<Ticket, Decision> {
        let source = Source::of(remote);
        let exempt = self.is_exempt(source);
        let over_global_rate = match &self.global_rate {
            Some(limiter) => !validated && limiter.check().is_err(),
            // retry_above_rate = 0: validate every address.
            None => true,
        };
        // A rate check takes a cell when it passes, so it is made once per
        // arrival; an exempt source is not counted at all.
        let over_source_rate = !exempt
            && self
                .source_rate
                .as_ref()
                .is_some_and(|limiter| limiter.check_key(&source).is_err());
        let facts = Facts {
            connections: self.connections.load(Ordering::Relaxed),
            unauthenticated: self.unauthenticated.load(Ordering::Relaxed),
            source_unauthenticated: self
                .sources
                .get(&source)
                .map_or(0, |counts| counts.unauthenticated),
            validated,
            may_retry,
            exempt,
            over_global_rate,
            over_source_rate,
        };
        match Self::decide(&self.limits, &facts) {
            Decision::Accept => {
                self.connections.fetch_add(1, Ordering::Relaxed);
                self.unauthenticated.fetch_add(1, Ordering::Relaxed);
                self.sources.entry(source).or_default().unauthenticated += 1;
                Ok(Ticket {
                    admission: self.clone(),
                    source,
                    exempt,
                    place: Place::Unauthenticated,
                })
            }
            Decision::Retry(reason) => {
                self.retries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("backbone_quic_retries_total", "reason" => reason.label())
                    .increment(1);
                Err(Decision::Retry(reason))
            }
            Decision::Refuse(refusal) => {
                metrics::counter!("backbone_connections_refused_total", "reason" => refusal.label())
                    .increment(1);
                Err(Decision::Refuse(refusal))
            }
        }
    }

    fn is_exempt(&self, source: Source) -> bool {
        self.exempt.iter().any(|net| net.contains(&source.ip()))
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections not yet authenticated (in the QUIC/TLS handshake or
    /// before `Auth`).
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    /// Anonymous sessions.
    pub fn anonymous(&self) -> usize {
        self.anonymous.load(Ordering::Relaxed)
    }

    /// QUIC Retry packets asked for so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Sources holding at least one place (for tests: the map must not
    /// grow with history).
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// Forgets the rate state of sources that have not connected lately, so
    /// the limiter's memory follows active sources.
    pub fn forget_idle_sources(&self) {
        if let Some(limiter) = &self.source_rate {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    fn release(&self, source: Source, place: Place) {
        match place {
            Place::Unauthenticated => {
                self.unauthenticated.fetch_sub(1, Ordering::Relaxed);
            }
            Place::Anonymous => {
                self.anonymous.fetch_sub(1, Ordering::Relaxed);
            }
            Place::Authenticated => return,
        }
        self.sources.remove_if_mut(&source, |_, counts| {
            match place {
                Place::Unauthenticated => counts.unauthenticated -= 1,
                Place::Anonymous => counts.anonymous -= 1,
                Place::Authenticated => {}
            }
            counts.unauthenticated == 0 && counts.anonymous == 0
        });
    }
}

/// Which kind of place a ticket holds besides its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Unauthenticated,
    Anonymous,
    Authenticated,
}

/// Why a connection may not become an anonymous session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnonymousRefusal {
    /// `limits.max_anonymous` reached.
    #[error("the broker serves its most anonymous sessions; retry later")]
    Full,
    /// `limits.per_source.max_anonymous` reached for this source.
    #[error("this address holds its most anonymous sessions; close some first")]
    SourceFull,
}

impl AnonymousRefusal {
    /// The `reason` label of `backbone_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            AnonymousRefusal::Full => "anonymous",
            AnonymousRefusal::SourceFull => "source_anonymous",
        }
    }
}

/// One accepted connection's places; gives them back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    source: Source,
    exempt: bool,
    place: Place,
}

impl Ticket {
    /// The connection's source.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Whether the source is exempt from per-source limits.
    pub fn exempt(&self) -> bool {
        self.exempt
    }

    /// The connection authenticated: it no longer counts as unauthenticated.
    pub fn authenticated(&mut self) {
        if self.place != Place::Authenticated {
            self.admission.release(self.source, self.place);
            self.place = Place::Authenticated;
        }
    }

    /// The connection asks for an anonymous session: it moves from the
    /// unauthenticated places to the anonymous ones if both caps allow.
    pub fn anonymous(&mut self) -> Result<(), AnonymousRefusal> {
        let admission = &self.admission;
        let limits = &admission.limits;
        let taken =
            admission
                .anonymous
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
                    (count < limits.max_anonymous).then_some(count + 1)
                });
        if taken.is_err() {
            return Err(AnonymousRefusal::Full);
        }
        let mut counts = admission.sources.entry(self.source).or_default();
        if !self.exempt && counts.anonymous >= limits.source_max_anonymous {
            drop(counts);
            admission.anonymous.fetch_sub(1, Ordering::Relaxed);
            return Err(AnonymousRefusal::SourceFull);
        }
        counts.anonymous += 1;
        drop(counts);
        admission.release(self.source, self.place);
        self.place = Place::Anonymous;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.source, self.place);
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 100,
            max_unauthenticated: 20,
            retry_above_unauthenticated: 5,
            source_max_unauthenticated: 3,
            max_anonymous: 4,
            source_max_anonymous: 2,
        }
    }

    fn fresh() -> Facts {
        Facts {
            may_retry: true,
            ..Facts::default()
        }
    }

    #[test]
    fn a_quiet_broker_accepts_without_a_retry() {
        assert_eq!(Admission::decide(&limits(), &fresh()), Decision::Accept);
    }

    #[test]
    fn many_unauthenticated_connections_make_unvalidated_clients_retry_and_validated_ones_pass() {
        let facts = Facts {
            unauthenticated: 5,
            ..fresh()
        };
        assert_eq!(
            Admission::decide(&limits(), &facts),
            Decision::Retry(RetryReason::Unauthenticated)
        );
        let validated = Facts {
            validated: true,
            may_retry: false,
            ..facts
        };
        assert_eq!(Admission::decide(&limits(), &validated), Decision::Accept);
        let full = Facts {
            unauthenticated: 20,
            ..validated
        };
        assert_eq!(
            Admission::decide(&limits(), &full),
            Decision::Refuse(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn a_busy_source_is_asked_to_retry_and_refused_only_once_validated() {
        let busy = Facts {
            source_unauthenticated: 3,
            ..fresh()
        };
        assert_eq!(
            Admission::decide(&limits(), &busy),
            Decision::Retry(RetryReason::Source)
        );
        let validated = Facts {
            validated: true,
            may_retry: false,
            ..busy
        };
        assert_eq!(
            Admission::decide(&limits(), &validated),
            Decision::Refuse(Refusal::SourceUnauthenticated)
        );
        let fast = Facts {
            over_source_rate: true,
            ..fresh()
        };
        assert_eq!(
            Admission::decide(&limits(), &fast),
            Decision::Retry(RetryReason::Source)
        );
        let fast_validated = Facts {
            validated: true,
            may_retry: false,
            ..fast
        };
        assert_eq!(
            Admission::decide(&limits(), &fast_validated),
            Decision::Refuse(Refusal::SourceRate)
        );
    }

    #[test]
    fn an_exempt_source_is_held_only_to_the_broker_wide_limits() {
        let facts = Facts {
            source_unauthenticated: 50,
            over_source_rate: true,
            exempt: true,
            ..fresh()
        };
        assert_eq!(Admission::decide(&limits(), &facts), Decision::Accept);
        let full = Facts {
            connections: 100,
            ..facts
        };
        assert_eq!(
            Admission::decide(&limits(), &full),
            Decision::Refuse(Refusal::Connections)
        );
    }

    #[test]
    fn the_global_rate_asks_unvalidated_clients_to_retry() {
        let facts = Facts {
            over_global_rate: true,
            ..fresh()
        };
        assert_eq!(
            Admission::decide(&limits(), &facts),
            Decision::Retry(RetryReason::Rate)
        );
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a = Source::of("[2001:db8:1:2:aaaa::1]:5".parse().expect("addr"));
        let b = Source::of("[2001:db8:1:2:bbbb::9]:6".parse().expect("addr"));
        let c = Source::of("[2001:db8:1:3::1]:6".parse().expect("addr"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = Source::of("[::ffff:192.0.2.7]:1".parse().expect("addr"));
        assert_eq!(mapped, Source::of("192.0.2.7:9".parse().expect("addr")));
    }

    fn admission(adjust: impl FnOnce(&mut Config)) -> Arc<Admission> {
        let mut config = Config::default();
        config.limits.max_unauthenticated = 20;
        config.limits.retry_above_unauthenticated = 20;
        config.limits.max_anonymous = 3;
        config.limits.per_source.max_unauthenticated = 4;
        config.limits.per_source.max_anonymous = 2;
        adjust(&mut config);
        Admission::new(&config)
    }

    #[test]
    fn tickets_move_between_places_and_give_everything_back() {
        let admission = admission(|_| {});
        let here: SocketAddr = "192.0.2.1:1000".parse().expect("addr");
        let mut first = admission.admit(here, false, true).expect("accepted");
        let mut second = admission.admit(here, false, true).expect("accepted");
        assert_eq!(
            (admission.connections(), admission.unauthenticated()),
            (2, 2)
        );
        first.authenticated();
        assert_eq!(admission.unauthenticated(), 1);
        second.anonymous().expect("room");
        assert_eq!((admission.unauthenticated(), admission.anonymous()), (0, 1));
        drop(first);
        drop(second);
        assert_eq!(
            (
                admission.connections(),
                admission.unauthenticated(),
                admission.anonymous()
            ),
            (0, 0, 0)
        );
        assert_eq!(admission.tracked_sources(), 0, "no entry is left behind");
    }

    #[test]
    fn anonymous_sessions_are_capped_per_source_and_in_total() {
        let admission = admission(|_| {});
        let a: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:1".parse().expect("addr");
        let mut tickets = Vec::new();
        for _ in 0..2 {
            let mut ticket = admission.admit(a, false, true).expect("accepted");
            ticket.anonymous().expect("room");
            tickets.push(ticket);
        }
        let mut third = admission.admit(a, false, true).expect("accepted");
        assert_eq!(third.anonymous(), Err(AnonymousRefusal::SourceFull));
        // The refused one still counts as unauthenticated, and nothing leaked.
        assert_eq!((admission.unauthenticated(), admission.anonymous()), (1, 2));
        let mut other = admission.admit(b, false, true).expect("accepted");
        other.anonymous().expect("another source has room");
        let mut fourth = admission.admit(b, false, true).expect("accepted");
        assert_eq!(fourth.anonymous(), Err(AnonymousRefusal::Full));
        drop((third, fourth, other, tickets));
        assert_eq!((admission.anonymous(), admission.tracked_sources()), (0, 0));
    }

    #[test]
    fn a_source_over_its_unauthenticated_cap_is_retried_then_refused() {
        let admission = admission(|_| {});
        let here: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let held: Vec<_> = (0..4)
            .map(|_| admission.admit(here, false, true).expect("accepted"))
            .collect();
        assert!(matches!(
            admission.admit(here, false, true),
            Err(Decision::Retry(RetryReason::Source))
        ));
        assert!(matches!(
            admission.admit(here, true, false),
            Err(Decision::Refuse(Refusal::SourceUnauthenticated))
        ));
        let elsewhere: SocketAddr = "192.0.2.9:1".parse().expect("addr");
        assert!(admission.admit(elsewhere, false, true).is_ok());
        drop(held);
    }

    #[test]
    fn an_exempt_network_skips_the_per_source_limits() {
        let admission = admission(|config| {
            config.limits.per_source.exempt = vec!["192.0.2.0/24".parse().expect("net")];
        });
        let here: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let mut held = Vec::new();
        for _ in 0..10 {
            let mut ticket = admission.admit(here, false, true).expect("accepted");
            if held.len() < 3 {
                ticket
                    .anonymous()
                    .expect("only the broker-wide cap applies");
            }
            held.push(ticket);
        }
    }
}
