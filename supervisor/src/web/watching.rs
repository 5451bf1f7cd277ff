//! Which SUTs open pages show, so the page's link subscribes to a SUT's output and jobs while
//! someone looks and unsubscribes a while after the last page of it closed. Pure: time is
//! passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use labvisor_protocol::SutName;

/// How long a SUT's output and jobs stay subscribed (and kept) after its last page closed: a
/// reload, or a look at another SUT and back, finds what was kept.
pub const UNWATCH_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Watch {
    pages: usize,
    idle_since: Option<Instant>,
}

/// The SUTs with an open page, or closed less than [`UNWATCH_AFTER`] ago.
#[derive(Debug, Default)]
pub struct Watching {
    suts: BTreeMap<SutName, Watch>,
}

impl Watching {
    /// A page opened `sut`: true when the link must subscribe to it (it was not watched).
    pub fn open(&mut self, sut: &SutName) -> bool {
        match self.suts.get_mut(sut) {
            Some(w) => {
                w.pages += 1;
                w.idle_since = None;
                false
            }
            None => {
                self.suts.insert(
                    sut.clone(),
                    Watch {
                        pages: 1,
                        idle_since: None,
                    },
                );
                true
            }
        }
    }

    /// A page of `sut` closed at `now`.
    pub fn close(&mut self, sut: &SutName, now: Instant) {
        if let Some(w) = self.suts.get_mut(sut) {
            w.pages = w.pages.saturating_sub(1);
            if w.pages == 0 {
                w.idle_since = Some(now);
            }
        }
    }

    /// The SUTs no page has shown for [`UNWATCH_AFTER`] at `now`, forgotten here: the link
    /// unsubscribes from them.
    pub fn expired(&mut self, now: Instant) -> Vec<SutName> {
        let gone: Vec<SutName> = self
            .suts
            .iter()
            .filter(|(_, w)| {
                w.idle_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= UNWATCH_AFTER)
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in &gone {
            self.suts.remove(s);
        }
        gone
    }

    /// How many pages show `sut` now.
    pub fn pages(&self, sut: &SutName) -> usize {
        self.suts.get(sut).map_or(0, |w| w.pages)
    }

    /// Whether the link is subscribed to `sut` (shown, or closed less than
    /// [`UNWATCH_AFTER`] ago).
    pub fn watched(&self, sut: &SutName) -> bool {
        self.suts.contains_key(sut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    #[test]
    fn subscribed_once_while_shown_and_let_go_a_while_after_the_last_page() {
        let mut w = Watching::default();
        let t0 = Instant::now();
        let a = sut("a");
        assert!(w.open(&a), "the first page subscribes");
        assert!(!w.open(&a), "a second page does not");
        w.close(&a, t0);
        assert_eq!(w.pages(&a), 1);
        assert!(
            w.expired(t0 + UNWATCH_AFTER * 2).is_empty(),
            "a page is open"
        );
        w.close(&a, t0);
        assert_eq!(w.pages(&a), 0);
        assert!(w
            .expired(t0 + UNWATCH_AFTER - Duration::from_millis(1))
            .is_empty());
        // Opened again within the grace: still subscribed, nothing to do, nothing expires.
        assert!(!w.open(&a));
        w.close(&a, t0 + UNWATCH_AFTER);
        assert!(w
            .expired(t0 + UNWATCH_AFTER + Duration::from_secs(1))
            .is_empty());
        assert_eq!(w.expired(t0 + UNWATCH_AFTER * 2), vec![a.clone()]);
        assert!(!w.watched(&a));
        assert!(w.expired(t0 + UNWATCH_AFTER * 3).is_empty(), "once");
        assert!(w.open(&a), "subscribed again");
    }

    #[test]
    fn a_close_without_an_open_is_ignored() {
        let mut w = Watching::default();
        w.close(&sut("b"), Instant::now());
        assert!(!w.watched(&sut("b")));
        assert!(w.expired(Instant::now() + UNWATCH_AFTER).is_empty());
    }
}
