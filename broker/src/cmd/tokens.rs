//! Tokens: create, get (here or relayed to the owning node), delete.
//!
//! A token lives on the node that owns its creator's slot, and its id was
//! drawn in that slot (see `backbone_protocol::token`), so every node finds
//! it by routing the id like an address. A `GetToken` for a token another
//! node holds is relayed there as a [`PeerGetToken`], the way card lookups
//! are; the owner alone checks passwords and counts failures.
//!
//! Token ids are bearer secrets: nothing here logs one (their `Debug` is
//! redacted anyway), nor contents or verifiers.

use std::sync::Arc;

use backbone_protocol::ErrorCode;
use backbone_protocol::bytes::{Blob, PasswordVerifier, TokenId};
use backbone_protocol::fleet::{PeerFrame, PeerGetToken, PeerTokenResult};
use backbone_protocol::frame::{
    CreateToken, DeleteToken, Done, ErrorFrame, GetToken, TokenContent, TokenCreated,
};
use backbone_protocol::{Address, Frame};
use tracing::warn;

use crate::fleet::Route;
use crate::shared::Shared;
use crate::store::{StoredToken, TokenAttempt};

/// Why a token fetch failed: a stable code and a message for people.
type Refusal = (ErrorCode, String);

fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Frame {
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(ErrorFrame::new(request_id, code, message))
}

fn refused(request_id: u64, (code, message): Refusal, retry_after_ms: Option<u32>) -> Frame {
    let mut frame = ErrorFrame::new(request_id, code, message);
    frame.retry_after_ms = retry_after_ms;
    metrics::counter!("backbone_errors_total", "code" => code.name()).increment(1);
    Frame::Error(frame)
}

/// Runs blocking storage work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        (
            ErrorCode::Internal,
            format!("blocking task failed: {error}"),
        )
    })
}

fn storage(error: crate::store::StoreError) -> Refusal {
    warn!(%error, "token storage failed");
    (ErrorCode::StorageFailure, error.to_string())
}

/// Stores a token for `owner` (an authenticated session's identity, served
/// on its home node) and answers `TokenCreated` once it is durable.
pub async fn create(shared: &Arc<Shared>, owner: Address, create: CreateToken) -> Frame {
    let limits = &shared.config.limits;
    let id = create.request_id;
    if create.content.0.len() as u64 > limits.token_max_bytes.as_u64() {
        metrics::counter!("backbone_tokens_refused_total", "reason" => "too_large").increment(1);
        return error_frame(
            id,
            ErrorCode::EnvelopeTooLarge,
            format!("token content exceeds {}", limits.token_max_bytes),
        );
    }
    if create.ttl_secs == 0 {
        return error_frame(id, ErrorCode::InvalidTtl, "ttl must be at least one second");
    }
    if !matches!(shared.fleet.route(&owner), Route::Local) || shared.fleet.is_importing(&owner) {
        return refused(
            id,
            (
                ErrorCode::ShardUnavailable,
                "this identity's slot is moving between nodes; retry shortly".into(),
            ),
            Some(shared.fleet.retry_after_ms()),
        );
    }
    let ttl_ms = (u64::from(create.ttl_secs) * 1000).min(limits.max_ttl.as_millis() as u64);
    let now = (shared.clock)();
    let max = limits.max_tokens_per_identity;
    let store = shared.directory.clone();
    let content = create.content.0;
    let verifier_hash = create.password_verifier.map(|verifier| verifier.hash());
    // Drawing the id takes a few thousand hashes: blocking work too.
    let stored = blocking(move || {
        let token = StoredToken {
            id: TokenId::random_in_slot_of(&owner),
            owner,
            created_at_ms: now,
            expires_at_ms: now + ttl_ms,
            content: content.to_vec(),
            verifier_hash,
            failed_attempts: 0,
            locked: false,
        };
        // Flushed before `TokenCreated`: the id may be handed out at once.
        let stored = store.put_token(&token, max, now)?;
        store.sync()?;
        Ok::<_, crate::store::StoreError>(stored.then_some((token.id, token.expires_at_ms)))
    })
    .await;
    match stored {
        Ok(Ok(Some((token_id, expires_at_ms)))) => {
            metrics::counter!("backbone_tokens_created_total").increment(1);
            Frame::TokenCreated(TokenCreated {
                request_id: id,
                token_id,
                expires_at_ms,
            })
        }
        Ok(Ok(None)) => {
            metrics::counter!("backbone_tokens_refused_total", "reason" => "quota").increment(1);
            error_frame(
                id,
                ErrorCode::QuotaExceeded,
                format!("this identity already holds {max} tokens; delete some first"),
            )
        }
        Ok(Err(error)) => refused(id, storage(error), None),
        Err(refusal) => refused(id, refusal, None),
    }
}

/// Deletes a token of `owner`. A token that does not exist, has been
/// deleted, or belongs to someone else is answered alike with `NotFound`,
/// so the answer tells a non-owner nothing about the token.
pub async fn delete(shared: &Arc<Shared>, owner: Address, delete: DeleteToken) -> Frame {
    let id = delete.request_id;
    let store = shared.directory.clone();
    let token_id = delete.token_id;
    // Flushed before `Done`: a deletion must survive a crash.
    let deleted = blocking(move || {
        let deleted = store.delete_token(&owner, &token_id)?;
        store.sync()?;
        Ok::<_, crate::store::StoreError>(deleted)
    })
    .await;
    match deleted {
        Ok(Ok(true)) => {
            metrics::counter!("backbone_tokens_deleted_total").increment(1);
            Frame::Done(Done { request_id: id })
        }
        Ok(Ok(false)) => error_frame(id, ErrorCode::NotFound, "no such token of yours"),
        Ok(Err(error)) => refused(id, storage(error), None),
        Err(refusal) => refused(id, refusal, None),
    }
}

/// Answers a `GetToken`, for authenticated and anonymous sessions alike:
/// here when this node holds the token's slot, else relayed to the node
/// that does.
pub async fn get(shared: &Arc<Shared>, get: GetToken) -> Frame {
    let id = get.request_id;
    let result = match shared.fleet.route(&get.token_id.route_address()) {
        Route::Local => fetch_local(shared, get.token_id, get.password_verifier).await,
        Route::Remote(node) => {
            let node = node.name.clone();
            fetch_remote(shared, &node, get.token_id, get.password_verifier).await
        }
    };
    match result {
        Ok((content, expires_at_ms)) => Frame::TokenContent(TokenContent {
            request_id: id,
            content: Blob::from(content),
            expires_at_ms,
        }),
        Err((ErrorCode::ShardUnavailable, message)) => refused(
            id,
            (ErrorCode::ShardUnavailable, message),
            Some(shared.fleet.retry_after_ms()),
        ),
        Err(refusal) => refused(id, refusal, None),
    }
}

/// The owner node's side of a fetch, also serving [`PeerGetToken`]s: the
/// content and expiry time, or why not.
///
/// Without a verifier, a password-protected token answers `WrongPassword`
/// and nothing is counted (a client that forgot to ask for the password
/// should not spend an attempt). With one, the store compares and counts in
/// one step; the failure that reaches the limit answers `TokenLocked`.
pub async fn fetch_local(
    shared: &Arc<Shared>,
    token_id: TokenId,
    verifier: Option<PasswordVerifier>,
) -> Result<(Vec<u8>, u64), Refusal> {
    let address = token_id.route_address();
    if !matches!(shared.fleet.route(&address), Route::Local) || shared.fleet.is_importing(&address)
    {
        // A slot being imported may not have its tokens yet.
        return Err((
            ErrorCode::ShardUnavailable,
            "this token's slot is moving between nodes; retry shortly".into(),
        ));
    }
    let store = shared.directory.clone();
    let now = (shared.clock)();
    let max_attempts = shared.config.limits.token_password_attempts;
    let outcome = blocking(move || {
        let outcome = match verifier {
            None => match store.token(&token_id, now)? {
                None => Outcome::NotFound,
                Some(token) if token.locked => Outcome::Locked,
                Some(token) if token.verifier_hash.is_some() => Outcome::WrongPassword,
                Some(token) => Outcome::Opened(token),
            },
            Some(verifier) => {
                match store.attempt_token(&token_id, &verifier.hash(), max_attempts, now)? {
                    TokenAttempt::Opened(token) => Outcome::Opened(token),
                    TokenAttempt::Missing => Outcome::NotFound,
                    TokenAttempt::Locked => Outcome::Locked,
                    TokenAttempt::Refused { locked, .. } => {
                        // The failure count must survive a crash, or crashing
                        // the broker would reset it.
                        store.sync()?;
                        if locked {
                            Outcome::Locked
                        } else {
                            Outcome::WrongPassword
                        }
                    }
                }
            }
        };
        Ok::<_, crate::store::StoreError>(outcome)
    })
    .await?
    .map_err(storage)?;
    let refuse = |reason: &'static str, code: ErrorCode, message: &str| {
        metrics::counter!("backbone_tokens_refused_total", "reason" => reason).increment(1);
        Err((code, message.to_owned()))
    };
    match outcome {
        Outcome::Opened(token) => {
            metrics::counter!("backbone_tokens_fetched_total").increment(1);
            Ok((token.content, token.expires_at_ms))
        }
        Outcome::NotFound => refuse(
            "not_found",
            ErrorCode::NotFound,
            "no such token: never created, deleted, or expired",
        ),
        Outcome::Locked => refuse(
            "locked",
            ErrorCode::TokenLocked,
            "too many wrong passwords: this token is locked",
        ),
        Outcome::WrongPassword => refuse(
            "wrong_password",
            ErrorCode::WrongPassword,
            "wrong or missing password for this token",
        ),
    }
}

/// What a fetch on the owner node comes to.
enum Outcome {
    Opened(StoredToken),
    NotFound,
    Locked,
    WrongPassword,
}

/// Relays a fetch to `node`, which holds the token's slot.
async fn fetch_remote(
    shared: &Shared,
    node: &str,
    token_id: TokenId,
    password_verifier: Option<PasswordVerifier>,
) -> Result<(Vec<u8>, u64), Refusal> {
    let Some(links) = shared.fleet.links() else {
        return Err((ErrorCode::Internal, "no fleet links".into()));
    };
    let answer = links
        .request(node, |request_id| {
            PeerFrame::GetToken(PeerGetToken {
                request_id,
                token_id,
                password_verifier,
            })
        })
        .await;
    match answer {
        Ok(PeerFrame::TokenResult(PeerTokenResult {
            result: Ok((content, expires_at_ms)),
            ..
        })) => Ok((content.0.to_vec(), expires_at_ms)),
        Ok(PeerFrame::TokenResult(PeerTokenResult {
            result: Err(code), ..
        })) => {
            let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal);
            Err((
                code,
                format!("token fetch on node {node} failed: {}", code.name()),
            ))
        }
        Ok(_) => Err((
            ErrorCode::Internal,
            "unexpected answer from the owner node".into(),
        )),
        Err(error) => Err((ErrorCode::ShardUnavailable, error.to_string())),
    }
}

/// The peer listener's answer to a relayed fetch.
pub async fn answer_peer(shared: &Arc<Shared>, get: PeerGetToken) -> PeerFrame {
    let result = fetch_local(shared, get.token_id, get.password_verifier)
        .await
        .map(|(content, expires_at_ms)| (Blob::from(content), expires_at_ms))
        .map_err(|(code, _)| code as u16);
    PeerFrame::TokenResult(PeerTokenResult {
        request_id: get.request_id,
        result,
    })
}
