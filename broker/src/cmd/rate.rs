//! The rate limits of the command table ([`super::Rate`]) and an anonymous
//! session's request budgets, each refusing with
//! [`Refusal::RateLimited`] and the time until one more would pass.

use std::num::NonZeroU32;

use backbone_protocol::Frame;
use governor::clock::Clock as _;

use super::{Caller, Rate, Refusal};
use crate::admission::Source;
use crate::shared::Shared;

/// Checks (and spends) the rate `rate` names for `frame` from `caller`.
/// Only an identity's rates are checked here: a sealed send's is checked
/// on the recipient's node, an anonymous session's budgets by the session.
pub(super) fn check(
    shared: &Shared,
    caller: &Caller,
    rate: Rate,
    frame: &Frame,
) -> Result<(), Refusal> {
    let Caller::Identity {
        address, source, ..
    } = caller
    else {
        return Ok(());
    };
    match (rate, frame) {
        (Rate::EnvelopeCopies, Frame::Send(send)) => {
            let Some(limiter) = &shared.send_limiter else {
                return Ok(());
            };
            let limits = &shared.config.limits;
            // A send with too many recipients is refused by its handler; it
            // costs at most as many copies as a valid one.
            let copies = send.recipients.len().clamp(1, limits.max_recipients.max(1));
            let copies = NonZeroU32::new(copies as u32).unwrap_or(NonZeroU32::MIN);
            match limiter.check_key_n(address, copies) {
                Ok(Err(not_until)) => Err(Refusal::RateLimited {
                    limit: format!("{} envelope copies per second", limits.send_rate),
                    retry_after: not_until.wait_time_from(limiter.clock().now()),
                }),
                // More copies than the burst can ever hold: the burst is the
                // operator's bound on one send, so such a send passes.
                Ok(Ok(())) | Err(_) => Ok(()),
            }
        }
        (Rate::RelationshipRequests, _) => {
            if let Some(limiter) = &shared.relationship_limiter
                && let Err(not_until) = limiter.check_key(address)
            {
                return Err(Refusal::RateLimited {
                    limit: format!(
                        "{} relationship requests per minute",
                        shared.config.relationships.requests_per_minute
                    ),
                    retry_after: not_until.wait_time_from(limiter.clock().now()),
                });
            }
            // Identities are free, so one host could ask in the names of
            // many: the requests of all identities connected from one source
            // share a budget.
            if let (Some(limiter), Some(source)) = (&shared.source_relationship_limiter, source)
                && let Err(not_until) = limiter.check_key(source)
            {
                return Err(Refusal::RateLimited {
                    limit: format!(
                        "{} relationship requests per minute from this address",
                        shared
                            .config
                            .limits
                            .per_source
                            .relationship_requests_per_minute
                    ),
                    retry_after: not_until.wait_time_from(limiter.clock().now()),
                });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The request budgets of an anonymous session: its own
/// (`limits.anonymous_rate`) and the one it shares with every anonymous
/// session of its source (`limits.per_source.anonymous_rate`). File
/// streams count as requests.
pub struct AnonymousBudget {
    connection: Option<governor::DefaultDirectRateLimiter>,
    /// The session's source, unless it is exempt.
    source: Option<Source>,
}

impl AnonymousBudget {
    /// The budgets of a new anonymous session from `source` (`None` when
    /// it is exempt from per-source limits).
    pub fn new(shared: &Shared, source: Option<Source>) -> Self {
        Self {
            connection: shared.anonymous_quota.map(governor::RateLimiter::direct),
            source,
        }
    }

    /// Spends one request of the budgets, or refuses it if it is over one.
    pub fn spend(&self, shared: &Shared) -> Result<(), Refusal> {
        let limits = &shared.config.limits;
        if let Some(limiter) = &self.connection
            && let Err(not_until) = limiter.check()
        {
            return Err(Refusal::RateLimited {
                limit: format!(
                    "{} requests per second on this anonymous connection",
                    limits.anonymous_rate
                ),
                retry_after: not_until.wait_time_from(limiter.clock().now()),
            });
        }
        if let (Some(limiter), Some(source)) = (&shared.source_anonymous_limiter, &self.source)
            && let Err(not_until) = limiter.check_key(source)
        {
            return Err(Refusal::RateLimited {
                limit: format!(
                    "{} anonymous requests per second from this address",
                    limits.per_source.anonymous_rate
                ),
                retry_after: not_until.wait_time_from(limiter.clock().now()),
            });
        }
        Ok(())
    }
}
