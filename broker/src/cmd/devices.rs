//! An identity's devices: registering, listing and unregistering them.
//!
//! A device is a key pair of its own, certified by the identity key and
//! registered with the identity's home node; only registered devices pass
//! authentication. Registering and unregistering are served only on a
//! session the identity key itself authenticated (they are
//! [`Access::IdentityKey`](super::Access::IdentityKey) rows of the command
//! table, which [`super::gate`] checks before a request gets here), so a
//! stolen device cannot keep itself registered or remove the owner's other
//! devices.
//!
//! [`unregister`] is the one place that decides what removing a device
//! takes: its certificate (durably, before anything else, so from then on
//! its `Auth` is refused), its open sessions (closed with
//! `DeviceNotRegistered`, their requests in progress finishing first) and
//! its cursor. No record of the removal is kept: the device is refused like
//! any device never registered, and a slot handover has nothing more to
//! carry than the devices still registered.

use std::sync::Arc;

use backbone_protocol::frame::{Devices, Done, ErrorCode, Frame};
use backbone_protocol::{Address, DeviceCertificate, DeviceId};
use tracing::{info, warn};

use crate::cmd::error_frame as refusal;
use crate::shared::Shared;
use crate::shared::live::SESSION_END_SLACK;
use crate::store::run_blocking as blocking;

/// `RegisterDevice`: stores the certificate of a device of `address`,
/// durably, within the `limits.max_devices` of the identity.
pub async fn register(
    shared: &Arc<Shared>,
    address: Address,
    request_id: u64,
    certificate: DeviceCertificate,
) -> Frame {
    if let Err(error) = certificate.verify_for(&address) {
        return refusal(request_id, ErrorCode::InvalidCertificate, error.to_string());
    }
    if certificate.device_key == certificate.identity_key {
        // The identity key authenticates without a certificate; registering
        // it as a device would list a "device" that unregistering could not stop.
        return refusal(
            request_id,
            ErrorCode::InvalidCertificate,
            "the identity key needs no certificate; certify another key",
        );
    }
    let max = shared.config.limits.max_devices;
    let store = shared.directory.clone();
    // Flushed before `Done`: the device may authenticate as soon as it is
    // confirmed, on this node after a crash as well.
    let stored = blocking(move || {
        let stored = store.put_device(&address, &certificate, max)?;
        store.sync()?;
        Ok(stored)
    })
    .await;
    match stored {
        Ok(true) => {
            metrics::counter!("backbone_devices_registered_total").increment(1);
            Frame::Done(Done { request_id })
        }
        Ok(false) => refusal(
            request_id,
            ErrorCode::QuotaExceeded,
            format!("this identity already has {max} devices; unregister one first"),
        ),
        Err(message) => refusal(request_id, ErrorCode::StorageFailure, message),
    }
}

/// `ListDevices`: the certificates registered for `address`.
pub async fn list(shared: &Arc<Shared>, address: Address, request_id: u64) -> Frame {
    let store = shared.directory.clone();
    match blocking(move || store.devices(&address)).await {
        Ok(devices) => Frame::Devices(Devices {
            request_id,
            devices,
        }),
        Err(message) => refusal(request_id, ErrorCode::StorageFailure, message),
    }
}

/// `UnregisterDevice`: removes `device` of `address`, in this order, and
/// answers `Done` once all of it is done:
///
/// 1. The certificate and the cursor are deleted and the deletion flushed.
///    An `Auth` from the device checked from here on is refused with
///    `DeviceNotRegistered`.
/// 2. The device's sessions are closed with `DeviceNotRegistered`, and
///    their requests in progress finish. A session authenticated
///    concurrently is closed too: a session is listed before its device is
///    checked, so one that passed the check before step 1 is listed by now.
/// 3. The device's sessions queued their last cursor moves at the writer
///    as they ended; a writer flush orders them, and the cursor is deleted
///    again, so none of them brings it back.
pub async fn unregister(
    shared: &Arc<Shared>,
    address: Address,
    request_id: u64,
    device: DeviceId,
) -> Frame {
    // 1.
    let store = shared.directory.clone();
    let removed = blocking(move || {
        let removed = store.remove_device(&address, &device)?;
        store.sync()?;
        Ok(removed)
    })
    .await;
    match removed {
        Ok(true) => {}
        Ok(false) => {
            return refusal(
                request_id,
                ErrorCode::NotFound,
                "no such device is registered for this identity",
            );
        }
        Err(message) => return refusal(request_id, ErrorCode::StorageFailure, message),
    }
    // 2.
    let limit = shared.config.server.shutdown_grace + SESSION_END_SLACK;
    let closed = shared
        .sessions
        .close_device(
            &address,
            &device,
            ErrorCode::DeviceNotRegistered,
            "this device was unregistered by its identity",
            limit,
        )
        .await;
    // 3. Only a stray cursor is at stake here (the device is refused
    // already), so a failure is logged rather than reported: the request
    // did what it was asked.
    let store = shared.directory.clone();
    let cleared = match shared.writer.flush().await {
        Ok(()) => {
            blocking(move || {
                store.remove_device(&address, &device)?;
                store.sync()
            })
            .await
        }
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = cleared {
        warn!(%error, "removing an unregistered device's last cursor failed");
    }
    metrics::counter!("backbone_devices_unregistered_total").increment(1);
    info!(%device, sessions_closed = closed, "device unregistered");
    Frame::Done(Done { request_id })
}
