//! Bounds on work in progress. A request that would go over them is refused at once
//! with 503, so a burst costs the provider a retry instead of costing us memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    requests: Arc<Semaphore>,
    max_requests: usize,
    /// Counted in KiB so that a large budget fits the semaphore's u32 requests.
    kib: Arc<Semaphore>,
}

/// Held for as long as the request is in flight.
pub struct Admitted {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Admission {
    pub fn new(max_requests: usize, max_bytes: usize) -> Admission {
        Admission {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            kib: Arc::new(Semaphore::new(max_bytes.div_ceil(1024))),
        }
    }

    /// A place for one more request, before its body is read.
    pub fn admit(&self) -> Option<Admitted> {
        let request = self.requests.clone().try_acquire_owned().ok()?;
        Some(Admitted {
            _request: request,
            _bytes: None,
        })
    }

    /// Room for the body just read, held with the request.
    pub fn hold_body(&self, admitted: &mut Admitted, bytes: usize) -> bool {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        match self.kib.clone().try_acquire_many_owned(kib) {
            Ok(permit) => {
                admitted._bytes = Some(permit);
                true
            }
            Err(_) => false,
        }
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_the_request_limit_and_frees_on_drop() {
        let admission = Admission::new(2, 1 << 20);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        assert!(admission.admit().is_none());
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert!(admission.admit().is_some());
    }

    #[test]
    fn refuses_beyond_the_byte_budget() {
        let admission = Admission::new(10, 100 * 1024);
        let mut a = admission.admit().unwrap();
        assert!(admission.hold_body(&mut a, 60 * 1024));
        let mut b = admission.admit().unwrap();
        assert!(!admission.hold_body(&mut b, 60 * 1024), "60 + 60 KiB > 100 KiB");
        drop(a);
        assert!(admission.hold_body(&mut b, 60 * 1024));
    }
}
