//! What a device signs to authenticate.
//!
//! The broker sends a [`crate::frame::Challenge`] with a fresh 32-byte nonce.
//! The device signs, with its own key, the transcript built by
//! [`auth_transcript`]: the nonce, the TLS exporter value of *this*
//! connection (label [`TLS_EXPORTER_LABEL`], no context, 32 bytes), the
//! broker's server id, the identity key and the device key. Binding the TLS
//! exporter means a response relayed onto another TLS session fails, and the
//! nonce is single use, so a replayed response fails as well.

use crate::bytes::{Nonce, ServerId, Signature};
use crate::frame::Auth;
use crate::identity::{CertificateError, PublicKey, SignatureError, domain};
use thiserror::Error;

/// The label passed to the TLS keying-material exporter (RFC 8446, section 7.5).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-backbone-auth-v1";

/// Length of the exporter value bound into the auth transcript.
pub const TLS_EXPORTER_LEN: usize = 32;

/// Builds the signed auth transcript.
pub fn auth_transcript(
    nonce: &Nonce,
    tls_exporter: &[u8; TLS_EXPORTER_LEN],
    server_id: &ServerId,
    identity_key: &PublicKey,
    device_key: &PublicKey,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(nonce.as_bytes());
    out.extend_from_slice(tls_exporter);
    out.extend_from_slice(server_id.as_bytes());
    out.extend_from_slice(identity_key.as_bytes());
    out.extend_from_slice(device_key.as_bytes());
    out
}

/// Why an auth response was rejected.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum AuthError {
    /// The device certificate is invalid or belongs to another identity.
    #[error("invalid device certificate: {0}")]
    Certificate(#[from] CertificateError),
    /// The device's signature over the transcript does not verify.
    #[error("auth signature is invalid: {0}")]
    Signature(#[from] SignatureError),
}

/// The device key an [`Auth`] frame claims: the certified device key, or the
/// identity key itself when the identity authenticates as its own primary device.
pub fn claimed_device_key(auth: &Auth) -> PublicKey {
    auth.device
        .map(|cert| cert.device_key)
        .unwrap_or(auth.identity_key)
}

/// Verifies an auth response against the challenge this connection issued.
///
/// Checks the device certificate (if any) against the identity, then the
/// signature over the transcript. Whether the device is registered, and
/// whether the nonce is still fresh and unused, is the broker's state to check.
pub fn verify_auth(
    auth: &Auth,
    nonce: &Nonce,
    tls_exporter: &[u8; TLS_EXPORTER_LEN],
    server_id: &ServerId,
) -> Result<(), AuthError> {
    if let Some(cert) = &auth.device {
        cert.verify_for(&auth.identity_key.address())?;
    }
    let device_key = claimed_device_key(auth);
    let transcript = auth_transcript(
        nonce,
        tls_exporter,
        server_id,
        &auth.identity_key,
        &device_key,
    );
    device_key.verify(domain::AUTH, &transcript, &auth.signature)?;
    Ok(())
}

/// Signs an auth response: a client-side helper.
pub fn sign_auth(
    identity_key: PublicKey,
    device: &crate::identity::Keypair,
    certificate: Option<crate::identity::DeviceCertificate>,
    nonce: &Nonce,
    tls_exporter: &[u8; TLS_EXPORTER_LEN],
    server_id: &ServerId,
) -> Auth {
    let transcript = auth_transcript(
        nonce,
        tls_exporter,
        server_id,
        &identity_key,
        &device.public(),
    );
    let signature: Signature = device.sign(domain::AUTH, &transcript);
    Auth {
        identity_key,
        device: certificate,
        signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DeviceCertificate, Keypair};

    fn fixture() -> (Keypair, Keypair, Nonce, [u8; 32], ServerId) {
        (
            Keypair::from_secret_bytes([1; 32]),
            Keypair::from_secret_bytes([2; 32]),
            Nonce([3; 32]),
            [4; 32],
            ServerId([5; 32]),
        )
    }

    #[test]
    fn primary_and_certified_devices_authenticate() {
        let (identity, device, nonce, exporter, server) = fixture();
        let primary = sign_auth(
            identity.public(),
            &identity,
            None,
            &nonce,
            &exporter,
            &server,
        );
        assert_eq!(verify_auth(&primary, &nonce, &exporter, &server), Ok(()));

        let cert = DeviceCertificate::issue(&identity, device.public(), 7);
        let secondary = sign_auth(
            identity.public(),
            &device,
            Some(cert),
            &nonce,
            &exporter,
            &server,
        );
        assert_eq!(verify_auth(&secondary, &nonce, &exporter, &server), Ok(()));
        assert_eq!(claimed_device_key(&secondary), device.public());
    }

    #[test]
    fn a_response_for_another_nonce_session_or_server_fails() {
        let (identity, _, nonce, exporter, server) = fixture();
        let auth = sign_auth(
            identity.public(),
            &identity,
            None,
            &nonce,
            &exporter,
            &server,
        );
        let bad = Err(AuthError::Signature(SignatureError::BadSignature));
        assert_eq!(verify_auth(&auth, &Nonce([9; 32]), &exporter, &server), bad);
        assert_eq!(verify_auth(&auth, &nonce, &[9; 32], &server), bad);
        assert_eq!(
            verify_auth(&auth, &nonce, &exporter, &ServerId([9; 32])),
            bad
        );
    }

    #[test]
    fn a_device_cannot_claim_an_identity_it_has_no_certificate_for() {
        let (identity, device, nonce, exporter, server) = fixture();
        let stranger = Keypair::from_secret_bytes([6; 32]);
        let cert = DeviceCertificate::issue(&stranger, device.public(), 7);
        let auth = sign_auth(
            identity.public(),
            &device,
            Some(cert),
            &nonce,
            &exporter,
            &server,
        );
        assert_eq!(
            verify_auth(&auth, &nonce, &exporter, &server),
            Err(AuthError::Certificate(CertificateError::WrongIdentity))
        );
    }
}
