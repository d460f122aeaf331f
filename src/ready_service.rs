//! A helper the tower layers of `vectorflow serve` share.

/// The service that `poll_ready` readied, leaving a fresh clone in its
/// place: tower lets a clone be called only after its own `poll_ready`, so
/// the readied one goes into the call's future.
pub fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}
