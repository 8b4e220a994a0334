//! The broker's side of the auth handshake, as a sans-IO state machine.
//!
//! [`ServerHandshake`] holds what one connection's handshake has seen and
//! decides, frame by frame, what the broker does next. It does no IO, reads
//! no clock and draws no randomness: the broker passes the fresh nonce and the
//! connection's TLS exporter value in when it creates the machine, and the
//! current time with every frame. The same machine therefore runs in the
//! broker, in unit tests with a virtual clock, and under a fuzzer.
//!
//! States and transitions (every arrow not drawn is a refusal):
//!
//! ```text
//!                 Hello, version 1 in [min, max]
//! AwaitingHello ──────────────────────────────────▶ AwaitingAuth { issued_at_ms }
//!                 → SendChallenge(Challenge)              │
//!                                                         │ Auth, not expired,
//!                                                         │ certificate and signature valid
//!                                                         ▼
//!                                                   Authenticated
//!                 → Authenticated(Verified)
//!
//! AwaitingAuth ── Anonymous, not expired ──▶ Anonymous
//!                 → Anonymous
//!
//! AwaitingHello or AwaitingAuth ── any refusal ──▶ Failed
//! Authenticated, Anonymous or Failed ── any frame ──▶ unchanged, HandshakeError::Ended
//! ```
//!
//! An anonymous session names no identity: the client answers the challenge
//! with `Anonymous` instead of `Auth`, and the broker then accepts only the
//! frames that need no identity (sealed sends, card lookups, pings). The
//! challenge still has to be answered in time, so an anonymous session costs
//! a client the same round trip and deadline as an authenticated one.
//!
//! A refusal moves the machine to [`HandshakeState::Failed`] for good: a
//! client that failed starts over on a new connection with a new nonce. A
//! finished handshake refuses every further frame, so a challenge is answered
//! at most once and a second `Auth` can never authenticate anything. Each
//! refusal maps to a stable wire [`ErrorCode`] through [`HandshakeError::code`].
//!
//! What stays with the broker: reading and decoding frames (in
//! [`crate::Phase::PreAuth`]), the auth deadline, and everything that needs its
//! state after a successful verification (routing to the address's home node,
//! the device registration, the cursor).

use thiserror::Error;

use crate::PROTOCOL_VERSION;
use crate::auth::{self, AuthError, TLS_EXPORTER_LEN};
use crate::bytes::{Nonce, ServerId};
use crate::frame::{Auth, Challenge, ErrorCode, Frame, Hello};
use crate::identity::{Address, CertificateError, DeviceId, SignatureError};

/// What the broker fixes for one connection's handshake.
#[derive(Clone, Debug)]
pub struct HandshakeParams {
    /// The broker's stable id, sent in the challenge and bound into the signature.
    pub server_id: ServerId,
    /// A fresh random nonce, used for this connection only.
    pub nonce: Nonce,
    /// How long the challenge stays valid after it is issued, in milliseconds.
    pub challenge_ttl_ms: u32,
    /// This connection's TLS exporter value (see [`crate::auth`]). It is fixed
    /// for the TLS session, so it is taken once here rather than with every frame.
    pub tls_exporter: [u8; TLS_EXPORTER_LEN],
}

/// Where a handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeState {
    /// Nothing received yet; only `Hello` is acceptable.
    AwaitingHello,
    /// The challenge went out at `issued_at_ms`; only `Auth` is acceptable, and
    /// only until `issued_at_ms + challenge_ttl_ms` inclusive.
    AwaitingAuth {
        /// The time passed with the `Hello` that issued the challenge.
        issued_at_ms: u64,
    },
    /// The `Auth` verified; the handshake is over.
    Authenticated,
    /// The client chose an anonymous session; the handshake is over.
    Anonymous,
    /// A frame was refused; the handshake is over.
    Failed,
}

/// What the broker does after a frame the handshake accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send this challenge to the client and wait for its `Auth`.
    SendChallenge(Challenge),
    /// The client proved it holds the device key; the broker goes on with
    /// routing and the device lookup.
    Authenticated(Verified),
    /// The client opened an anonymous session; the broker confirms it and
    /// serves only frames that need no identity.
    Anonymous,
}

/// Who authenticated: the outcome of a verified `Auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The identity's address, the hash of its identity key.
    pub address: Address,
    /// The device that signed: the certified device, or the identity itself.
    pub device_id: DeviceId,
    /// Whether the device presented a certificate. A certified device must
    /// also be registered for the address, which the broker checks in its
    /// store; the identity's own key needs no registration.
    pub certified: bool,
}

/// Why the handshake refused a frame. Each variant maps to one wire code.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The frame is not the one the state waits for: anything but `Hello`
    /// first (an `Auth` or `Anonymous` before `Hello` included), anything but
    /// `Auth` or `Anonymous` after the challenge (a second `Hello` included).
    /// Code `UnexpectedFrame`.
    #[error("expected {expected}, got tag {tag}")]
    UnexpectedFrame {
        /// The frame the state waits for.
        expected: &'static str,
        /// The tag of the frame that arrived.
        tag: u32,
    },
    /// The client's `Hello` does not include the version this crate speaks.
    /// Code `UnsupportedVersion`.
    #[error(
        "this broker speaks version {PROTOCOL_VERSION} only, the client {min_version}..={max_version}"
    )]
    UnsupportedVersion {
        /// The lowest version the client offered.
        min_version: u8,
        /// The highest version the client offered.
        max_version: u8,
    },
    /// The `Auth` or `Anonymous` arrived after the challenge's time to live.
    /// Code `ChallengeExpired`.
    #[error("challenge expired: answered after {elapsed_ms} ms, valid for {ttl_ms} ms")]
    ChallengeExpired {
        /// Time between the challenge and the answer.
        elapsed_ms: u64,
        /// The challenge's time to live.
        ttl_ms: u32,
    },
    /// The device certificate is invalid or belongs to another identity.
    /// Code `InvalidCertificate`.
    #[error("invalid device certificate: {0}")]
    InvalidCertificate(CertificateError),
    /// The signature does not verify for this nonce, TLS session and server:
    /// a wrong key, or a response signed for another challenge (a replay).
    /// Code `AuthFailed`.
    #[error("auth signature is invalid: {0}")]
    AuthFailed(SignatureError),
    /// The handshake already ended, authenticated, anonymous or failed; its challenge
    /// cannot be answered again. Code `ChallengeReused`, the code a session
    /// answers a `Hello` or `Auth` with after authentication.
    #[error("the handshake has ended (got tag {tag}); challenges are single use")]
    Ended {
        /// The tag of the frame that arrived.
        tag: u32,
    },
}

impl HandshakeError {
    /// The stable wire code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::UnexpectedFrame { .. } => ErrorCode::UnexpectedFrame,
            HandshakeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            HandshakeError::ChallengeExpired { .. } => ErrorCode::ChallengeExpired,
            HandshakeError::InvalidCertificate(_) => ErrorCode::InvalidCertificate,
            HandshakeError::AuthFailed(_) => ErrorCode::AuthFailed,
            HandshakeError::Ended { .. } => ErrorCode::ChallengeReused,
        }
    }
}

impl From<AuthError> for HandshakeError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Certificate(error) => HandshakeError::InvalidCertificate(error),
            AuthError::Signature(error) => HandshakeError::AuthFailed(error),
        }
    }
}

/// The broker's side of one connection's auth handshake.
#[derive(Clone, Debug)]
pub struct ServerHandshake {
    params: HandshakeParams,
    state: HandshakeState,
}

impl ServerHandshake {
    /// A handshake waiting for the client's `Hello`.
    pub fn new(params: HandshakeParams) -> Self {
        Self {
            params,
            state: HandshakeState::AwaitingHello,
        }
    }

    /// Where the handshake stands.
    pub fn state(&self) -> HandshakeState {
        self.state
    }

    /// Handles one frame from the client, received at `now_ms`.
    ///
    /// `now_ms` is any monotonic millisecond clock (only differences matter);
    /// the challenge expires when more than its time to live has passed
    /// between the `Hello` and the `Auth`. On a refusal the machine is
    /// [`HandshakeState::Failed`] from then on, unless it had already ended.
    pub fn handle(&mut self, frame: Frame, now_ms: u64) -> Result<HandshakeStep, HandshakeError> {
        let tag = frame.tag();
        let result = match (self.state, frame) {
            (
                HandshakeState::Authenticated | HandshakeState::Anonymous | HandshakeState::Failed,
                _,
            ) => {
                // Already over: refuse without changing the outcome.
                return Err(HandshakeError::Ended { tag });
            }
            (HandshakeState::AwaitingHello, Frame::Hello(hello)) => self.challenge(&hello, now_ms),
            (HandshakeState::AwaitingHello, _) => Err(HandshakeError::UnexpectedFrame {
                expected: "Hello",
                tag,
            }),
            (HandshakeState::AwaitingAuth { issued_at_ms }, Frame::Auth(answer)) => {
                self.verify(&answer, issued_at_ms, now_ms)
            }
            (HandshakeState::AwaitingAuth { issued_at_ms }, Frame::Anonymous(_)) => {
                self.anonymous(issued_at_ms, now_ms)
            }
            (HandshakeState::AwaitingAuth { .. }, _) => Err(HandshakeError::UnexpectedFrame {
                expected: "Auth or Anonymous",
                tag,
            }),
        };
        if result.is_err() {
            self.state = HandshakeState::Failed;
        }
        result
    }

    fn challenge(&mut self, hello: &Hello, now_ms: u64) -> Result<HandshakeStep, HandshakeError> {
        if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) {
            return Err(HandshakeError::UnsupportedVersion {
                min_version: hello.min_version,
                max_version: hello.max_version,
            });
        }
        self.state = HandshakeState::AwaitingAuth {
            issued_at_ms: now_ms,
        };
        Ok(HandshakeStep::SendChallenge(Challenge {
            version: PROTOCOL_VERSION,
            server_id: self.params.server_id,
            nonce: self.params.nonce,
            expires_in_ms: self.params.challenge_ttl_ms,
        }))
    }

    fn check_expiry(&self, issued_at_ms: u64, now_ms: u64) -> Result<(), HandshakeError> {
        let elapsed_ms = now_ms.saturating_sub(issued_at_ms);
        let ttl_ms = self.params.challenge_ttl_ms;
        if elapsed_ms > u64::from(ttl_ms) {
            return Err(HandshakeError::ChallengeExpired { elapsed_ms, ttl_ms });
        }
        Ok(())
    }

    fn anonymous(
        &mut self,
        issued_at_ms: u64,
        now_ms: u64,
    ) -> Result<HandshakeStep, HandshakeError> {
        self.check_expiry(issued_at_ms, now_ms)?;
        self.state = HandshakeState::Anonymous;
        Ok(HandshakeStep::Anonymous)
    }

    fn verify(
        &mut self,
        answer: &Auth,
        issued_at_ms: u64,
        now_ms: u64,
    ) -> Result<HandshakeStep, HandshakeError> {
        // Expiry first: a stale answer is refused without spending a signature check.
        self.check_expiry(issued_at_ms, now_ms)?;
        auth::verify_auth(
            answer,
            &self.params.nonce,
            &self.params.tls_exporter,
            &self.params.server_id,
        )?;
        self.state = HandshakeState::Authenticated;
        Ok(HandshakeStep::Authenticated(Verified {
            address: answer.identity_key.address(),
            device_id: auth::claimed_device_key(answer).device_id(),
            certified: answer.device.is_some(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sign_auth;
    use crate::bytes::Signature;
    use crate::frame::{Anonymous, Ping};
    use crate::identity::{DeviceCertificate, Keypair};

    const TTL_MS: u32 = 1000;
    const NONCE: Nonce = Nonce([3; 32]);
    const EXPORTER: [u8; 32] = [4; 32];
    const SERVER: ServerId = ServerId([5; 32]);

    fn identity() -> Keypair {
        Keypair::from_secret_bytes([1; 32])
    }

    fn device() -> Keypair {
        Keypair::from_secret_bytes([2; 32])
    }

    fn handshake() -> ServerHandshake {
        ServerHandshake::new(HandshakeParams {
            server_id: SERVER,
            nonce: NONCE,
            challenge_ttl_ms: TTL_MS,
            tls_exporter: EXPORTER,
        })
    }

    fn hello(min_version: u8, max_version: u8) -> Frame {
        Frame::Hello(Hello {
            min_version,
            max_version,
        })
    }

    fn hello_v1() -> Frame {
        hello(PROTOCOL_VERSION, PROTOCOL_VERSION)
    }

    /// The identity's own key answering `nonce` on `exporter` for `server`.
    fn primary_auth(nonce: &Nonce, exporter: &[u8; 32], server: &ServerId) -> Frame {
        let identity = identity();
        Frame::Auth(sign_auth(
            identity.public(),
            &identity,
            None,
            nonce,
            exporter,
            server,
        ))
    }

    fn valid_primary_auth() -> Frame {
        primary_auth(&NONCE, &EXPORTER, &SERVER)
    }

    /// A handshake that has issued its challenge at time 0.
    fn challenged() -> ServerHandshake {
        let mut handshake = handshake();
        handshake.handle(hello_v1(), 0).expect("Hello is accepted");
        handshake
    }

    /// Runs `frames` (with their times) and returns the last result's code
    /// (or `None` for success) and the final state.
    fn run(frames: Vec<(Frame, u64)>) -> (Option<ErrorCode>, HandshakeState) {
        let mut handshake = handshake();
        let mut last = None;
        for (frame, now_ms) in frames {
            last = handshake
                .handle(frame, now_ms)
                .err()
                .map(|error| error.code());
        }
        (last, handshake.state())
    }

    #[test]
    fn hello_issues_the_challenge_and_a_valid_auth_authenticates_the_primary_device() {
        let mut handshake = handshake();
        assert_eq!(handshake.state(), HandshakeState::AwaitingHello);
        assert_eq!(
            handshake.handle(hello(0, 9), 500),
            Ok(HandshakeStep::SendChallenge(Challenge {
                version: PROTOCOL_VERSION,
                server_id: SERVER,
                nonce: NONCE,
                expires_in_ms: TTL_MS,
            }))
        );
        assert_eq!(
            handshake.state(),
            HandshakeState::AwaitingAuth { issued_at_ms: 500 }
        );
        // Exactly at the time to live is still in time.
        assert_eq!(
            handshake.handle(valid_primary_auth(), 1500),
            Ok(HandshakeStep::Authenticated(Verified {
                address: identity().address(),
                device_id: identity().public().device_id(),
                certified: false,
            }))
        );
        assert_eq!(handshake.state(), HandshakeState::Authenticated);
    }

    #[test]
    fn a_certified_device_authenticates_as_itself() {
        let mut handshake = challenged();
        let certificate = DeviceCertificate::issue(&identity(), device().public(), 7);
        let answer = sign_auth(
            identity().public(),
            &device(),
            Some(certificate),
            &NONCE,
            &EXPORTER,
            &SERVER,
        );
        assert_eq!(
            handshake.handle(Frame::Auth(answer), 10),
            Ok(HandshakeStep::Authenticated(Verified {
                address: identity().address(),
                device_id: device().public().device_id(),
                certified: true,
            }))
        );
    }

    #[test]
    fn frames_out_of_order_are_unexpected() {
        let auth_before_hello = vec![(valid_primary_auth(), 0)];
        let second_hello = vec![(hello_v1(), 0), (hello_v1(), 1)];
        let ping_first = vec![(Frame::Ping(Ping { nonce: 1 }), 0)];
        let ping_instead_of_auth = vec![(hello_v1(), 0), (Frame::Ping(Ping { nonce: 1 }), 1)];
        for frames in [
            auth_before_hello,
            second_hello,
            ping_first,
            ping_instead_of_auth,
        ] {
            assert_eq!(
                run(frames),
                (Some(ErrorCode::UnexpectedFrame), HandshakeState::Failed)
            );
        }
    }

    #[test]
    fn a_hello_without_version_1_is_refused() {
        for (min, max) in [(2, 3), (0, 0), (1, 0), (255, 1)] {
            assert_eq!(
                run(vec![(hello(min, max), 0)]),
                (Some(ErrorCode::UnsupportedVersion), HandshakeState::Failed),
                "{min}..={max}"
            );
        }
    }

    #[test]
    fn an_auth_after_the_time_to_live_is_expired() {
        let mut handshake = challenged();
        assert_eq!(
            handshake.handle(valid_primary_auth(), u64::from(TTL_MS) + 1),
            Err(HandshakeError::ChallengeExpired {
                elapsed_ms: u64::from(TTL_MS) + 1,
                ttl_ms: TTL_MS
            })
        );
        assert_eq!(handshake.state(), HandshakeState::Failed);
    }

    #[test]
    fn an_auth_signed_for_another_challenge_is_refused_as_a_replay() {
        let other_nonce = primary_auth(&Nonce([9; 32]), &EXPORTER, &SERVER);
        let other_session = primary_auth(&NONCE, &[9; 32], &SERVER);
        let other_server = primary_auth(&NONCE, &EXPORTER, &ServerId([9; 32]));
        for answer in [other_nonce, other_session, other_server] {
            let mut handshake = challenged();
            assert_eq!(
                handshake.handle(answer, 1),
                Err(HandshakeError::AuthFailed(SignatureError::BadSignature))
            );
            assert_eq!(handshake.state(), HandshakeState::Failed);
        }
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let Frame::Auth(mut answer) = valid_primary_auth() else {
            unreachable!("valid_primary_auth builds an Auth frame")
        };
        answer.signature = Signature([7; 64]);
        let mut handshake = challenged();
        assert_eq!(
            handshake
                .handle(Frame::Auth(answer), 1)
                .map_err(|e| e.code()),
            Err(ErrorCode::AuthFailed)
        );
    }

    #[test]
    fn a_forged_device_certificate_is_refused() {
        let stranger = Keypair::from_secret_bytes([6; 32]);
        let from_stranger = DeviceCertificate::issue(&stranger, device().public(), 7);
        let mut tampered = DeviceCertificate::issue(&identity(), device().public(), 7);
        tampered.issued_at_ms += 1;
        for (certificate, expected) in [
            (from_stranger, CertificateError::WrongIdentity),
            (
                tampered,
                CertificateError::Signature(SignatureError::BadSignature),
            ),
        ] {
            let answer: Auth = sign_auth(
                identity().public(),
                &device(),
                Some(certificate),
                &NONCE,
                &EXPORTER,
                &SERVER,
            );
            let mut handshake = challenged();
            let refusal = handshake
                .handle(Frame::Auth(answer), 1)
                .expect_err("a forged certificate is refused");
            assert_eq!(refusal, HandshakeError::InvalidCertificate(expected));
            assert_eq!(refusal.code(), ErrorCode::InvalidCertificate);
            assert_eq!(handshake.state(), HandshakeState::Failed);
        }
    }

    #[test]
    fn after_authentication_every_frame_is_refused_and_the_session_stands() {
        let mut handshake = challenged();
        assert!(handshake.handle(valid_primary_auth(), 1).is_ok());
        for frame in [
            valid_primary_auth(),
            hello_v1(),
            Frame::Ping(Ping { nonce: 1 }),
        ] {
            let tag = frame.tag();
            assert_eq!(
                handshake.handle(frame, 2),
                Err(HandshakeError::Ended { tag })
            );
            assert_eq!(handshake.state(), HandshakeState::Authenticated);
        }
        assert_eq!(
            HandshakeError::Ended { tag: 2 }.code(),
            ErrorCode::ChallengeReused
        );
    }

    #[test]
    fn after_a_refusal_even_a_valid_handshake_is_refused() {
        let mut handshake = handshake();
        assert!(handshake.handle(hello(2, 2), 0).is_err());
        for frame in [hello_v1(), valid_primary_auth()] {
            let tag = frame.tag();
            assert_eq!(
                handshake.handle(frame, 1),
                Err(HandshakeError::Ended { tag })
            );
            assert_eq!(handshake.state(), HandshakeState::Failed);
        }

        // A failed Auth cannot be retried with a good one on the same challenge.
        let mut handshake = challenged();
        let wrong = primary_auth(&Nonce([9; 32]), &EXPORTER, &SERVER);
        assert!(handshake.handle(wrong, 1).is_err());
        assert_eq!(
            handshake.handle(valid_primary_auth(), 2),
            Err(HandshakeError::Ended { tag: 2 })
        );
    }

    #[test]
    fn anonymous_after_the_challenge_opens_an_anonymous_session() {
        let mut handshake = challenged();
        // Exactly at the time to live is still in time, as for Auth.
        assert_eq!(
            handshake.handle(Frame::Anonymous(Anonymous {}), u64::from(TTL_MS)),
            Ok(HandshakeStep::Anonymous)
        );
        assert_eq!(handshake.state(), HandshakeState::Anonymous);
        // The session cannot turn into an authenticated one later.
        for frame in [
            valid_primary_auth(),
            Frame::Anonymous(Anonymous {}),
            hello_v1(),
        ] {
            let tag = frame.tag();
            assert_eq!(
                handshake.handle(frame, u64::from(TTL_MS)),
                Err(HandshakeError::Ended { tag })
            );
            assert_eq!(handshake.state(), HandshakeState::Anonymous);
        }
    }

    #[test]
    fn anonymous_before_hello_or_after_the_time_to_live_is_refused() {
        assert_eq!(
            run(vec![(Frame::Anonymous(Anonymous {}), 0)]),
            (Some(ErrorCode::UnexpectedFrame), HandshakeState::Failed)
        );
        assert_eq!(
            run(vec![
                (hello_v1(), 0),
                (Frame::Anonymous(Anonymous {}), u64::from(TTL_MS) + 1)
            ]),
            (Some(ErrorCode::ChallengeExpired), HandshakeState::Failed)
        );
        // After a successful Auth, Anonymous is refused like any other frame.
        assert_eq!(
            run(vec![
                (hello_v1(), 0),
                (valid_primary_auth(), 1),
                (Frame::Anonymous(Anonymous {}), 2)
            ]),
            (
                Some(ErrorCode::ChallengeReused),
                HandshakeState::Authenticated
            )
        );
    }

    #[test]
    fn each_refusal_has_its_wire_code() {
        let cases = [
            (
                HandshakeError::UnexpectedFrame {
                    expected: "Hello",
                    tag: 2,
                },
                ErrorCode::UnexpectedFrame,
            ),
            (
                HandshakeError::UnsupportedVersion {
                    min_version: 2,
                    max_version: 2,
                },
                ErrorCode::UnsupportedVersion,
            ),
            (
                HandshakeError::ChallengeExpired {
                    elapsed_ms: 2,
                    ttl_ms: 1,
                },
                ErrorCode::ChallengeExpired,
            ),
            (
                HandshakeError::InvalidCertificate(CertificateError::WrongIdentity),
                ErrorCode::InvalidCertificate,
            ),
            (
                HandshakeError::AuthFailed(SignatureError::BadSignature),
                ErrorCode::AuthFailed,
            ),
            (HandshakeError::Ended { tag: 0 }, ErrorCode::ChallengeReused),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }
}
