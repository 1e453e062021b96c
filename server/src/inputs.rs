//! The inputs cache: images stored once under their SHA-256, so a curl
//! script uploads once and asks for many layers with `?input=<id>`.
//!
//! Bounded by total bytes; the least recently used entries go first. Entries
//! are immutable (content-addressed), so a hit is always the same image.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;
use sha2::{Digest, Sha256};

/// Content-addressed image bytes with an LRU byte budget.
pub struct InputCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

struct Inner {
    entries: HashMap<String, (Bytes, u64)>,
    bytes: usize,
    clock: u64,
}

impl InputCache {
    /// A cache holding at most `max_bytes` of images.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
            max_bytes,
        }
    }

    /// The id of `bytes`: lowercase hex SHA-256.
    pub fn id_of(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// The budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Stores `bytes` (evicting the least recently used entries to make room)
    /// and returns its id. `None` when it alone exceeds the budget.
    pub fn insert(&self, bytes: Bytes) -> Option<String> {
        if bytes.len() > self.max_bytes {
            return None;
        }
        let id = Self::id_of(&bytes);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if let Some(entry) = inner.entries.get_mut(&id) {
            entry.1 = now;
            return Some(id);
        }
        while inner.bytes + bytes.len() > self.max_bytes {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    if let Some((b, _)) = inner.entries.remove(&k) {
                        inner.bytes -= b.len();
                    }
                }
                None => break,
            }
        }
        inner.bytes += bytes.len();
        inner.entries.insert(id.clone(), (bytes, now));
        Some(id)
    }

    /// The image stored under `id`, marking it recently used.
    pub fn get(&self, id: &str) -> Option<Bytes> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        inner.entries.get_mut(id).map(|entry| {
            entry.1 = now;
            entry.0.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_entries_are_evicted_first() {
        let cache = InputCache::new(10);
        let a = cache.insert(Bytes::from_static(b"aaaa")).unwrap();
        let b = cache.insert(Bytes::from_static(b"bbbb")).unwrap();
        assert!(cache.get(&a).is_some()); // a is now more recent than b
        let c = cache.insert(Bytes::from_static(b"cccc")).unwrap();
        assert!(cache.get(&b).is_none(), "b was the least recently used");
        assert!(cache.get(&a).is_some() && cache.get(&c).is_some());
        assert!(
            cache.insert(Bytes::from(vec![0u8; 11])).is_none(),
            "over the budget alone"
        );
    }

    #[test]
    fn ids_are_sha256_hex() {
        assert_eq!(
            InputCache::id_of(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
