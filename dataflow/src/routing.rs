//! Where a key lives: its shard (the worker that holds its rows) and its
//! embedded-log partition. The one place placement is computed.
//!
//! Sealed segments are persisted per shard, so placement is a stored
//! format and must not change with a dependency's version. Differential's
//! `hashed()` documents the opposite ("not a persistent format"), so
//! placement uses [`PLACEMENT`]: XXH64 (seed 0, a published algorithm with
//! fixed test vectors) over this byte encoding of the key:
//!
//! ```text
//! collection id   u64 little-endian
//! Pk::Int(v)      0x00, v as i64 little-endian
//! Pk::Str(s)      0x01, s.len() as u64 little-endian, the UTF-8 bytes of s
//! ```
//!
//! and the shard is that hash modulo the shard count. Manifests record the
//! placement their segments were cut with; recovery splits segments cut
//! with another placement (or another shard count) by key.
//!
//! Differential's upsert arrangement still exchanges keys by its own hash;
//! that placement lives only in memory (it is rebuilt at every start), and
//! its changes are exchanged back to the key's shard before they meet the
//! key's rows.

use std::hash::Hasher;

use twox_hash::XxHash64;
use vectorflow_core::{CollectionId, Pk};

/// The placement this build computes, as manifests record it.
pub const PLACEMENT: &str = "xxh64-v1";

/// The stable 64-bit hash of a key (see the module documentation).
pub fn key_hash(collection: CollectionId, pk: &Pk) -> u64 {
    let mut hasher = XxHash64::with_seed(0);
    hasher.write(&u64::from(collection).to_le_bytes());
    match pk {
        Pk::Int(value) => {
            hasher.write(&[0]);
            hasher.write(&value.to_le_bytes());
        }
        Pk::Str(text) => {
            hasher.write(&[1]);
            hasher.write(&(text.len() as u64).to_le_bytes());
            hasher.write(text.as_bytes());
        }
    }
    hasher.finish()
}

/// The shard (worker) among `shards` that holds the key's rows.
pub fn shard_of(collection: CollectionId, pk: &Pk, shards: usize) -> usize {
    (key_hash(collection, pk) % shards.max(1) as u64) as usize
}

/// The embedded-log partition among `partitions` the key's writes go to.
/// The same hash as [`shard_of`]: with as many partitions as workers, a
/// partition's keys are all held by the worker that reads it.
pub fn partition_of(collection: CollectionId, pk: &Pk, partitions: u32) -> u32 {
    (key_hash(collection, pk) % u64::from(partitions.max(1))) as u32
}

/// The partition among `partitions` a partition-key value's rows go to
/// (the key hashed as a key of no collection, so every collection agrees).
pub fn key_partition_of(value: &Pk, partitions: usize) -> usize {
    (key_hash(0, value) % partitions.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if this fails, placement changed and every stored
    /// segment would be resharded at load. Bump [`PLACEMENT`] instead.
    #[test]
    fn placement_is_pinned() {
        assert_eq!(key_hash(1, &Pk::Int(42)), key_hash(1, &Pk::Int(42)));
        let pinned = [
            key_hash(1, &Pk::Int(0)),
            key_hash(1, &Pk::Int(42)),
            key_hash(7, &Pk::Str("doc-1".into())),
            key_hash(7, &Pk::Str(String::new())),
        ];
        assert_eq!(pinned, PINNED);
        // The encoding separates types and lengths.
        assert_ne!(key_hash(1, &Pk::Int(0)), key_hash(1, &Pk::Str(String::new())));
        assert_ne!(key_hash(1, &Pk::Int(5)), key_hash(2, &Pk::Int(5)));
    }

    #[test]
    fn shards_spread_keys_evenly() {
        let mut counts = [0usize; 4];
        for key in 0..40_000 {
            counts[shard_of(3, &Pk::Int(key), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        assert_eq!(partition_of(3, &Pk::Int(17), 4) as usize, shard_of(3, &Pk::Int(17), 4));
    }

    /// Computed with the reference C implementation (libxxhash through
    /// python-xxhash 4.1.0) over the encoding above.
    const PINNED: [u64; 4] = [13047344884484907481, 13606498532651866437, 18248773700838665089, 7129505656525778573];
}
