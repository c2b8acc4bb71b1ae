//! The in-memory map from (house, device, metric) to `series_id`.
//!
//! Looking a series up costs no allocation: the key is built in a reused
//! buffer. Ids are created by the sink in bulk for the keys this cache does
//! not know; the cache itself does no IO.

use std::collections::HashMap;

/// Ids of the series this worker has seen.
#[derive(Debug, Default)]
pub struct SeriesCache {
    /// `house \0 device \0 metric` -> id. NUL cannot occur in the parts
    /// (the decoder rejects it), so the joined key is unambiguous.
    ids: HashMap<String, i32>,
    /// Reused to build lookup keys.
    scratch: String,
}

/// A series the database must create or look up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub house: String,
    pub device: String,
    pub metric: String,
}

impl SeriesCache {
    /// The id of a known series.
    pub fn get(&mut self, house: &str, device: &str, metric: &str) -> Option<i32> {
        join(&mut self.scratch, house, device, metric);
        self.ids.get(self.scratch.as_str()).copied()
    }

    /// Records the id of a series.
    pub fn insert(&mut self, key: &SeriesKey, id: i32) {
        let mut joined = String::new();
        join(&mut joined, &key.house, &key.device, &key.metric);
        self.ids.insert(joined, id);
    }

    /// How many series are known.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

fn join(buf: &mut String, house: &str, device: &str, metric: &str) {
    buf.clear();
    buf.push_str(house);
    buf.push('\0');
    buf.push_str(device);
    buf.push('\0');
    buf.push_str(metric);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_do_not_run_into_each_other() {
        let mut cache = SeriesCache::default();
        let key = |h: &str, d: &str, m: &str| SeriesKey {
            house: h.into(),
            device: d.into(),
            metric: m.into(),
        };
        cache.insert(&key("h", "ab", "c"), 1);
        cache.insert(&key("h", "a", "bc"), 2);
        assert_eq!(cache.get("h", "ab", "c"), Some(1));
        assert_eq!(cache.get("h", "a", "bc"), Some(2));
        assert_eq!(cache.get("", "hab", "c"), None);
        assert_eq!(cache.len(), 2);
    }
}
