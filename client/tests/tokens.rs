//! Tokens end to end: create, fetch (authenticated, anonymous, through
//! another node of a fleet), passwords and lockout, expiry, owner-only
//! delete, the quota and the size limit.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backbone_broker::store::MemoryStore;
use backbone_broker::store::prelude::*;
use backbone_client::transport::RawConnection;
use backbone_client::{ClientError, Credentials, TokenError, TokenFetcher, TokenRef};
use backbone_protocol::bytes::{Blob, TokenId};
use backbone_protocol::fleet::slot_of;
use backbone_protocol::frame::{CreateToken, GetToken};
use backbone_protocol::{ErrorCode, Frame};
use support::{Identity, TestBroker, TestFleet};

const TTL: Duration = Duration::from_secs(3600);

async fn fetcher(broker: &TestBroker) -> TokenFetcher {
    TokenFetcher::connect(broker.connect_config())
        .await
        .expect("an anonymous session opens")
}

/// The token error an operation failed with; panics on success or on any
/// other error.
fn token_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> TokenError {
    match result {
        Err(ClientError::Token(error)) => error,
        other => panic!("expected a token error, got {other:?}"),
    }
}

/// The stored failure count and lock of a token (the broker's clock is
/// the test's, so `now` 0 hides nothing that has not expired).
fn attempts(store: &MemoryStore, id: &TokenId) -> (u32, bool) {
    let token = store.token(id, 0).expect("reads").expect("stored");
    (token.failed_attempts, token.locked)
}

#[tokio::test]
async fn a_token_is_fetched_anonymously_and_by_any_identity_and_the_broker_holds_only_ciphertext() {
    let store = Arc::new(MemoryStore::new());
    let broker = TestBroker::start_with_store(store.clone()).await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let content = b"wifi: backbone / hunter2".to_vec();
    let reference = alice_client
        .create_token(&content, TTL, None)
        .await
        .expect("creates");
    assert!(!reference.has_password());
    // The shared text round-trips.
    let reference: TokenRef = reference.to_text().parse().expect("parses");

    let anonymous = fetcher(&broker).await;
    assert_eq!(
        anonymous.get(&reference, None).await.expect("gets"),
        content
    );
    let bob_client = bob.connect(&broker).await;
    assert_eq!(
        bob_client.get_token(&reference, None).await.expect("gets"),
        content
    );
    assert_eq!(
        alice_client
            .get_token(&reference, None)
            .await
            .expect("gets"),
        content
    );

    // The broker drew the id in Alice's slot and stores ciphertext only.
    assert_eq!(
        slot_of(&reference.id.route_address()),
        slot_of(&alice.address())
    );
    let stored = store
        .token(&reference.id, 0)
        .expect("reads")
        .expect("stored");
    assert_eq!(stored.owner, alice.address());
    assert_eq!(stored.verifier_hash, None);
    assert!(
        !stored
            .content
            .windows(content.len())
            .any(|window| window == content),
        "the broker holds the plaintext"
    );

    // Another reference with a wrong key finds the token but cannot open it.
    let mut wrong_key = reference;
    wrong_key.key[0] ^= 1;
    assert!(matches!(
        token_error(anonymous.get(&wrong_key, None).await),
        TokenError::Undecryptable
    ));
    // An id nobody created is not found.
    let mut unknown = reference;
    unknown.id = TokenId([7; 32]);
    assert!(matches!(
        token_error(anonymous.get(&unknown, None).await),
        TokenError::NotFound
    ));
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn wrong_passwords_are_counted_and_lock_the_token_for_good() {
    let store = Arc::new(MemoryStore::new());
    let mut broker = TestBroker::start_with_store(store.clone()).await;
    broker.config.limits.token_password_attempts = 3;
    broker.restart().await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let reference = alice_client
        .create_token(b"the door code is 4711", TTL, Some("open sesame"))
        .await
        .expect("creates");
    assert!(reference.has_password());
    let stored = store
        .token(&reference.id, 0)
        .expect("reads")
        .expect("stored");
    assert!(stored.verifier_hash.is_some());
    let anonymous = fetcher(&broker).await;

    // Without a password: refused, and not counted.
    assert!(matches!(
        token_error(anonymous.get(&reference, None).await),
        TokenError::WrongPassword
    ));
    assert_eq!(attempts(&store, &reference.id), (0, false));
    assert_eq!(
        anonymous
            .get(&reference, Some("open sesame"))
            .await
            .expect("the right password opens it"),
        b"the door code is 4711"
    );
    for expected in 1..=2 {
        assert!(matches!(
            token_error(anonymous.get(&reference, Some("open barley")).await),
            TokenError::WrongPassword
        ));
        assert_eq!(attempts(&store, &reference.id), (expected, false));
    }
    // A right password does not reset the count.
    alice_client
        .get_token(&reference, Some("open sesame"))
        .await
        .expect("still opens");
    assert_eq!(attempts(&store, &reference.id), (2, false));
    // The third failure locks it, and then even the right password is refused.
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("open wheat")).await),
        TokenError::Locked
    ));
    assert_eq!(attempts(&store, &reference.id), (3, true));
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("open sesame")).await),
        TokenError::Locked
    ));
    let error = alice_client
        .get_token(&reference, Some("open sesame"))
        .await
        .expect_err("locked");
    assert_eq!(error.code(), Some(ErrorCode::TokenLocked));
    assert_eq!(attempts(&store, &reference.id), (3, true));

    // A password for a token created without one is a local error.
    let plain = alice_client
        .create_token(b"plain", TTL, None)
        .await
        .expect("creates");
    assert!(matches!(
        token_error(anonymous.get(&plain, Some("x")).await),
        TokenError::NoPasswordExpected
    ));

    // The owner can still delete the locked token.
    alice_client
        .delete_token(&reference.id)
        .await
        .expect("deletes");
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("open sesame")).await),
        TokenError::NotFound
    ));
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_password_failure_count_survives_a_restart() {
    let mut broker = TestBroker::start_with(|config| {
        config.limits.token_password_attempts = 2;
    })
    .await;
    let alice = Identity::new();
    let reference = alice
        .connect(&broker)
        .await
        .create_token(b"x", TTL, Some("right"))
        .await
        .expect("creates");
    let anonymous = fetcher(&broker).await;
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("wrong")).await),
        TokenError::WrongPassword
    ));
    anonymous.close().await;
    // The failure count is stored with the token, not kept in memory: after
    // a restart on the same sled store the next failure locks the token.
    broker.restart().await;
    let anonymous = fetcher(&broker).await;
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("wrong again")).await),
        TokenError::Locked
    ));
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_not_found_and_the_sweep_removes_it() {
    let store = Arc::new(MemoryStore::new());
    let mut broker = TestBroker::start_with_store(store.clone()).await;
    broker.config.limits.max_ttl = Duration::from_secs(600);
    broker.restart().await;
    let alice = Identity::new();
    let alice_client = alice.connect(&broker).await;
    let short = alice_client
        .create_token(b"soon gone", Duration::from_secs(60), None)
        .await
        .expect("creates");
    // A TTL above the maximum is capped to it.
    let long = alice_client
        .create_token(b"capped", Duration::from_secs(86_400), None)
        .await
        .expect("creates");
    let created = store.token(&long.id, 0).expect("reads").expect("stored");
    assert_eq!(
        created.expires_at_ms - created.created_at_ms,
        600_000,
        "the TTL is capped at limits.max_ttl"
    );

    let anonymous = fetcher(&broker).await;
    anonymous.get(&short, None).await.expect("not yet expired");
    broker.advance_clock(Duration::from_secs(61));
    assert!(matches!(
        token_error(anonymous.get(&short, None).await),
        TokenError::NotFound
    ));
    anonymous.get(&long, None).await.expect("still there");
    // The sweep (every 50 ms in tests) removes it from the store too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.token(&short.id, 0).expect("reads").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expiry sweep did not remove the token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.token(&long.id, 0).expect("reads").is_some());
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn only_the_owner_deletes_and_a_refusal_does_not_reveal_the_token() {
    let broker = TestBroker::start().await;
    let (alice, mallory) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let mallory_client = mallory.connect(&broker).await;
    let reference = alice_client
        .create_token(b"mine", TTL, None)
        .await
        .expect("creates");

    // Mallory holds the reference but is not the owner: refused exactly as
    // for a token that does not exist, and the token stays.
    assert!(matches!(
        token_error(mallory_client.delete_token(&reference.id).await),
        TokenError::NotFound
    ));
    assert!(matches!(
        token_error(mallory_client.delete_token(&TokenId([3; 32])).await),
        TokenError::NotFound
    ));
    assert_eq!(
        mallory_client
            .get_token(&reference, None)
            .await
            .expect("still there"),
        b"mine"
    );

    alice_client
        .delete_token(&reference.id)
        .await
        .expect("the owner deletes");
    assert!(matches!(
        token_error(mallory_client.get_token(&reference, None).await),
        TokenError::NotFound
    ));
    assert!(matches!(
        token_error(alice_client.delete_token(&reference.id).await),
        TokenError::NotFound
    ));
    broker.shutdown().await;
}

#[tokio::test]
async fn the_quota_and_the_size_limit_refuse_with_typed_errors() {
    let broker = TestBroker::start_with(|config| {
        config.limits.max_tokens_per_identity = 2;
        config.limits.token_max_bytes = bytesize::ByteSize::kib(1);
    })
    .await;
    let (alice, bob) = (Identity::new(), Identity::new());
    let alice_client = alice.connect(&broker).await;
    let first = alice_client
        .create_token(b"1", TTL, None)
        .await
        .expect("creates");
    alice_client
        .create_token(b"2", TTL, None)
        .await
        .expect("creates");
    let error = alice_client
        .create_token(b"3", TTL, None)
        .await
        .expect_err("over the quota");
    assert_eq!(error.code(), Some(ErrorCode::QuotaExceeded), "{error}");
    // The quota is per identity.
    bob.connect(&broker)
        .await
        .create_token(b"bob's", TTL, None)
        .await
        .expect("another identity still creates");
    // Deleting one makes room.
    alice_client.delete_token(&first.id).await.expect("deletes");
    alice_client
        .create_token(b"3", TTL, None)
        .await
        .expect("room again");

    // Sealing adds 17 bytes (version byte and tag): 1007 bytes of content
    // fill the 1 KiB limit exactly, one more is refused.
    let bob_client = bob.connect(&broker).await;
    let at_limit = bob_client
        .create_token(&[7; 1007], TTL, None)
        .await
        .expect("at the limit");
    assert_eq!(
        bob_client.get_token(&at_limit, None).await.expect("gets"),
        vec![7; 1007]
    );
    assert!(matches!(
        token_error(bob_client.create_token(&[7; 1008], TTL, None).await),
        TokenError::TooLarge(_)
    ));
    broker.shutdown().await;
}

#[tokio::test]
async fn raw_refusals_a_zero_ttl_and_token_creation_on_an_anonymous_session() {
    let broker = TestBroker::start().await;
    let alice = Identity::new();
    let mut raw = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    raw.authenticate(&Credentials::primary(&alice.signing))
        .await
        .expect("authenticates");
    raw.send(&Frame::CreateToken(CreateToken {
        request_id: 1,
        ttl_secs: 0,
        content: Blob::from(vec![1]),
        password_verifier: None,
    }))
    .await
    .expect("sends");
    match raw.recv().await.expect("answered") {
        Frame::Error(error) => {
            assert_eq!(error.request_id, 1);
            assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::InvalidTtl));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    raw.close().await;

    // An anonymous session fetches, but cannot create.
    let mut anonymous = RawConnection::connect(&broker.connect_config())
        .await
        .expect("connects");
    anonymous.open_anonymous().await.expect("anonymous");
    anonymous
        .send(&Frame::CreateToken(CreateToken {
            request_id: 2,
            ttl_secs: 60,
            content: Blob::from(vec![1]),
            password_verifier: None,
        }))
        .await
        .expect("sends");
    match anonymous.recv().await.expect("answered") {
        Frame::Error(error) => {
            assert_eq!(error.request_id, 2);
            assert_eq!(
                ErrorCode::from_u16(error.code),
                Some(ErrorCode::NotAuthenticated)
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    anonymous
        .send(&Frame::GetToken(GetToken {
            request_id: 3,
            token_id: TokenId([1; 32]),
            password_verifier: None,
        }))
        .await
        .expect("sends");
    match anonymous.recv().await.expect("answered") {
        Frame::Error(error) => {
            assert_eq!(error.request_id, 3);
            assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::NotFound));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    anonymous.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_token_created_on_one_node_is_fetched_through_another() {
    let fleet = TestFleet::start(2).await;
    let alice = fleet.identity_on(1);
    let alice_client = fleet.connect(&alice, 1).await;
    let reference = alice_client
        .create_token(b"across the fleet", TTL, Some("pw"))
        .await
        .expect("creates");
    // The id routes to Alice's home node.
    assert_eq!(fleet.home_of(&reference.id.route_address()), 1);

    // An anonymous fetcher on node 0: the fetch is relayed to node 1, which
    // checks the password.
    let anonymous = TokenFetcher::connect(fleet.connect_config(0))
        .await
        .expect("anonymous session on node 0");
    assert_eq!(
        anonymous
            .get(&reference, Some("pw"))
            .await
            .expect("gets through node 0"),
        b"across the fleet"
    );
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("not pw")).await),
        TokenError::WrongPassword
    ));
    assert!(matches!(
        token_error(anonymous.get(&reference, None).await),
        TokenError::WrongPassword
    ));
    alice_client
        .delete_token(&reference.id)
        .await
        .expect("deletes");
    assert!(matches!(
        token_error(anonymous.get(&reference, Some("pw")).await),
        TokenError::NotFound
    ));
    anonymous.close().await;
    drop(alice_client);
    fleet.shutdown().await;
}
