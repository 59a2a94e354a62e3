//! Counts how often texts holding a watched marker pass a point (a parse, a tokenization).
//!
//! The tests that hold a job's prompts to one parse per submit watch a marker only their
//! own prompts contain, so other tests rendering in the same process never move the count.
//! One slot, no history: the cost in a server is one uncontended lock per prompt.

use std::sync::Mutex;

pub struct TextCounter {
    watch: Mutex<Option<(String, u64)>>,
}

impl TextCounter {
    pub const fn new() -> Self {
        TextCounter {
            watch: Mutex::new(None),
        }
    }

    /// Starts counting the texts that contain `marker`, from zero.
    pub fn watch(&self, marker: &str) {
        *self.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some((marker.to_owned(), 0));
    }

    /// The texts counted since [`TextCounter::watch`] (0 when nothing is watched).
    pub fn count(&self) -> u64 {
        self.watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |(_, n)| *n)
    }

    /// Counts `text` when it contains the watched marker.
    pub fn note(&self, text: &str) {
        let mut slot = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((marker, n)) = slot.as_mut() {
            if text.contains(marker.as_str()) {
                *n += 1;
            }
        }
    }
}

impl Default for TextCounter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::TextCounter;

    #[test]
    fn counts_only_the_watched_marker_from_zero() {
        let c = TextCounter::new();
        c.note("before any watch");
        assert_eq!(c.count(), 0);
        c.watch("zq7");
        c.note("a zq7 apple");
        c.note("a pear");
        c.note("zq7");
        assert_eq!(c.count(), 2);
        c.watch("zq7");
        assert_eq!(c.count(), 0);
    }
}
