//! Fail points: named places before every write, sync, rename and delete of
//! the stores, where a test can make the n-th next storage call fail with
//! [`StoreError::Injected`]. In builds other than tests the check is empty
//! and the struct holds nothing.

use super::StoreError;

/// Test-armed failures (see the module documentation).
#[derive(Debug, Default)]
pub struct FailPoints {
    #[cfg(test)]
    armed: std::sync::Mutex<Armed>,
}

#[cfg(test)]
#[derive(Debug, Default)]
struct Armed {
    /// Fail the call after this many more succeed.
    countdown: Option<u32>,
    /// Only fail at this site, if set.
    only: Option<&'static str>,
    /// Set when an armed failure fired; taken by [`FailPoints::take_fired`].
    fired: Option<&'static str>,
    /// Every site passed, for tests that every fail point is reachable.
    passed: std::collections::BTreeSet<&'static str>,
}

impl FailPoints {
    /// Passes the fail point `site`: in test builds, fails if a test armed a
    /// failure that is due here.
    #[cfg_attr(not(test), allow(clippy::unused_self, unused_variables))]
    #[inline]
    pub fn check(&self, site: &'static str) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let mut armed = self.armed.lock().expect("fail points");
            armed.passed.insert(site);
            if armed.only.is_some_and(|only| only != site) {
                return Ok(());
            }
            match armed.countdown {
                Some(0) => {
                    armed.countdown = None;
                    armed.fired = Some(site);
                    return Err(StoreError::Injected);
                }
                Some(n) => armed.countdown = Some(n - 1),
                None => {}
            }
        }
        Ok(())
    }

    /// Arms a failure: the call after `calls` more succeed fails, at any
    /// fail point or only at `only`.
    #[cfg(test)]
    pub fn fail_after(&self, calls: u32, only: Option<&'static str>) {
        let mut armed = self.armed.lock().expect("fail points");
        armed.only = only;
        armed.countdown = Some(calls);
    }

    /// Disarms any armed failure.
    #[cfg(test)]
    pub fn disarm(&self) {
        let mut armed = self.armed.lock().expect("fail points");
        armed.only = None;
        armed.countdown = None;
    }

    /// The site where an armed failure fired since the last call, if any.
    #[cfg(test)]
    pub fn take_fired(&self) -> Option<&'static str> {
        self.armed.lock().expect("fail points").fired.take()
    }

    /// Every site passed so far.
    #[cfg(test)]
    pub fn passed(&self) -> std::collections::BTreeSet<&'static str> {
        self.armed.lock().expect("fail points").passed.clone()
    }
}
