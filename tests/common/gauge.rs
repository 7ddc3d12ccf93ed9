//! Requests held at the proxy to count how many are in flight at once: the proof that a
//! cap on parallel requests binds.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Requests in flight at once, as the proxy sees them: each matching request counts while
/// it is held at the proxy (by a [`crate::common::Fault::Before`] action calling
/// [`HeldGauge::hold`]). They are held until all `wanted` have arrived (only possible if
/// nothing caps them), or until `cap` are held and no other has come for a second (the
/// cap binds), or 30 s have passed; from then on none is held.
#[derive(Default)]
pub struct HeldGauge {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    held: usize,
    most: usize,
    last_arrival: Option<Instant>,
    released: bool,
}

impl HeldGauge {
    pub fn hold(&self, wanted: usize, cap: usize) {
        const QUIET: Duration = Duration::from_secs(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.held += 1;
        st.most = st.most.max(st.held);
        st.last_arrival = Some(Instant::now());
        self.changed.notify_all();
        loop {
            let quiet_for = st.last_arrival.map_or(Duration::ZERO, |t| t.elapsed());
            if st.held >= wanted || (st.held >= cap && quiet_for >= QUIET) {
                st.released = true;
            }
            if st.released || Instant::now() >= deadline {
                st.released = true;
                self.changed.notify_all();
                break;
            }
            let wait = QUIET
                .saturating_sub(quiet_for)
                .max(Duration::from_millis(10))
                .min(deadline.saturating_duration_since(Instant::now()));
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.held -= 1;
    }

    /// The most requests held at once so far.
    pub fn most_held(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .most
    }
}
