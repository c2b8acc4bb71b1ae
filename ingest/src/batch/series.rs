//! The in-memory map from (house, device, metric) to `series_id`, bounded,
//! and the limit on how many new series a device may create.
//!
//! Looking a series up costs no allocation: the key is built in a reused
//! buffer. Ids are created by the sink in bulk for the keys this cache does
//! not know; the cache itself does no IO.

use std::collections::HashMap;

use lru::LruCache;

/// Series a writer remembers unless told otherwise (`--series-cache-size`):
/// about 100 bytes each, so some 20 MB per writer.
pub const DEFAULT_CAPACITY: usize = 200_000;

/// Ids of the series this worker has seen, the least recently used
/// forgotten past `capacity`. Eviction waits for [`SeriesCache::trim`], so
/// that the series of the chunk being encoded stay put even when the chunk
/// names more series than the cache holds.
#[derive(Debug)]
pub struct SeriesCache {
    /// `house \0 device \0 metric` -> id. NUL cannot occur in the parts
    /// (the decoder rejects it), so the joined key is unambiguous.
    ids: LruCache<String, i32>,
    capacity: usize,
    /// Reused to build lookup keys.
    scratch: String,
    /// Counted lookups (see [`SeriesCache::lookup`]), since the last `take_stats`.
    stats: CacheStats,
}

/// What the cache did since it was last asked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Series found in the cache.
    pub hits: u64,
    /// Series not in the cache: read or created in the database.
    pub misses: u64,
    /// Series forgotten to stay within the capacity.
    pub evictions: u64,
}

/// A series the database must create or look up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub house: String,
    pub device: String,
    pub metric: String,
}

impl Default for SeriesCache {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl SeriesCache {
    /// A cache keeping at most `capacity` series between chunks (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        SeriesCache {
            ids: LruCache::unbounded(),
            capacity: capacity.max(1),
            scratch: String::new(),
            stats: CacheStats::default(),
        }
    }

    /// Forgets every id (the server they came from is no longer the primary).
    pub fn clear(&mut self) {
        self.ids.clear();
    }

    /// The id of a known series.
    pub fn get(&mut self, house: &str, device: &str, metric: &str) -> Option<i32> {
        join(&mut self.scratch, house, device, metric);
        self.ids.get(self.scratch.as_str()).copied()
    }

    /// Like [`SeriesCache::get`], counted as a hit or a miss: the lookup of
    /// each sample as its chunk arrives, for the hit rate.
    pub fn lookup(&mut self, house: &str, device: &str, metric: &str) -> Option<i32> {
        let found = self.get(house, device, metric);
        match found {
            Some(_) => self.stats.hits += 1,
            None => self.stats.misses += 1,
        }
        found
    }

    /// Records the id of a series.
    pub fn insert(&mut self, key: &SeriesKey, id: i32) {
        let mut joined = String::new();
        join(&mut joined, &key.house, &key.device, &key.metric);
        self.ids.put(joined, id);
    }

    /// Forgets the least recently used series beyond the capacity.
    pub fn trim(&mut self) {
        while self.ids.len() > self.capacity {
            self.ids.pop_lru();
            self.stats.evictions += 1;
        }
    }

    /// The counts since the last call, which restarts them.
    pub fn take_stats(&mut self) -> CacheStats {
        std::mem::take(&mut self.stats)
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

/// How many new series each device may create per clock hour, so that a
/// device putting counters or timestamps into its field names cannot fill
/// the series table (and every writer's cache) without end. Counted per
/// writer: a device's records come through one shard, so one writer.
#[derive(Debug)]
pub struct NewSeriesLimit {
    per_hour: usize,
    /// The hour (since the epoch) the counts are for.
    hour: u64,
    /// (house, device) -> series created this hour.
    created: HashMap<(String, String), usize>,
}

impl NewSeriesLimit {
    pub fn new(per_hour: usize) -> Self {
        NewSeriesLimit {
            per_hour,
            hour: 0,
            created: HashMap::new(),
        }
    }

    /// The limit per device and hour.
    pub fn per_hour(&self) -> usize {
        self.per_hour
    }

    /// Whether the device may create `count` more series in `hour` (hours
    /// since the epoch); if so they are counted. Counts restart every hour.
    pub fn try_take(&mut self, house: &str, device: &str, count: usize, hour: u64) -> bool {
        if hour != self.hour {
            self.hour = hour;
            self.created.clear();
        }
        let created = self
            .created
            .entry((house.to_string(), device.to_string()))
            .or_default();
        if *created + count > self.per_hour {
            return false;
        }
        *created += count;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(h: &str, d: &str, m: &str) -> SeriesKey {
        SeriesKey {
            house: h.into(),
            device: d.into(),
            metric: m.into(),
        }
    }

    #[test]
    fn keys_do_not_run_into_each_other() {
        let mut cache = SeriesCache::default();
        cache.insert(&key("h", "ab", "c"), 1);
        cache.insert(&key("h", "a", "bc"), 2);
        assert_eq!(cache.get("h", "ab", "c"), Some(1));
        assert_eq!(cache.get("h", "a", "bc"), Some(2));
        assert_eq!(cache.get("", "hab", "c"), None);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_at_trim() {
        let mut cache = SeriesCache::with_capacity(2);
        for (i, m) in ["a", "b", "c"].iter().enumerate() {
            cache.insert(&key("h", "d", m), i as i32);
        }
        assert_eq!(cache.len(), 3, "nothing is evicted before trim");
        assert_eq!(cache.lookup("h", "d", "a"), Some(0));
        cache.trim();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("h", "d", "b"), None, "b was used least recently");
        assert_eq!(cache.lookup("h", "d", "a"), Some(0));
        assert_eq!(cache.lookup("h", "d", "b"), None);
        assert_eq!(
            cache.take_stats(),
            CacheStats {
                hits: 2,
                misses: 1,
                evictions: 1
            }
        );
        assert_eq!(cache.take_stats(), CacheStats::default());
    }

    #[test]
    fn a_device_gets_its_new_series_per_hour_and_no_more() {
        let mut limit = NewSeriesLimit::new(3);
        assert!(limit.try_take("h", "d", 2, 10));
        assert!(!limit.try_take("h", "d", 2, 10), "2 + 2 is over 3");
        assert!(limit.try_take("h", "d", 1, 10));
        assert!(!limit.try_take("h", "d", 1, 10));
        assert!(limit.try_take("h", "other", 3, 10), "per device");
        assert!(limit.try_take("h2", "d", 3, 10), "per house and device");
        assert!(limit.try_take("h", "d", 3, 11), "a new hour starts afresh");
    }
}
