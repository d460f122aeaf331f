//! Where each primary key's row versions live in a shard, without a copy
//! of the key.
//!
//! The segments hold every row's key already; the index is keyed by a
//! 64-bit digest of the key (the integer itself for integer keys, SipHash
//! of a string key) and holds only addresses. A lookup checks the key at
//! each address it finds, so two string keys with one digest share an
//! entry and are still told apart. An entry costs 24 bytes (digest and an
//! inline address, or a pointer to a list for keys with several versions)
//! where a map from the key itself to a small vector cost 48 and a heap
//! block per string key; at a million rows that was about 50 bytes a row.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use vectorflow_core::Pk;

/// A row version's place: its segment's position in the shard, and its row there.
pub type RowAddress = (u32, u32);

/// The addresses of the versions whose keys share one digest, oldest first.
#[derive(Debug)]
enum Versions {
    /// Most keys: one version held.
    One(RowAddress),
    /// A boxed slice, so an entry stays 16 bytes beside its digest (a key
    /// gains versions one upsert at a time: a copy per push is cheap).
    Many(Box<[RowAddress]>),
}

impl Versions {
    fn push(&mut self, address: RowAddress) {
        match self {
            Versions::One(first) => *self = Versions::Many(Box::new([*first, address])),
            Versions::Many(list) => *list = list.iter().copied().chain([address]).collect(),
        }
    }

    fn as_slice(&self) -> &[RowAddress] {
        match self {
            Versions::One(address) => std::slice::from_ref(address),
            Versions::Many(list) => list,
        }
    }
}

/// Every version of a key a shard holds, by key.
#[derive(Debug, Default)]
pub struct KeyIndex {
    versions: HashMap<u64, Versions>,
}

impl KeyIndex {
    pub fn clear(&mut self) {
        self.versions.clear();
    }

    /// Adds a version of `pk` at `address` (after the ones added before).
    pub fn insert(&mut self, pk: &Pk, address: RowAddress) {
        match self.versions.entry(digest(pk)) {
            std::collections::hash_map::Entry::Occupied(mut entry) => entry.get_mut().push(address),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Versions::One(address));
            }
        }
    }

    /// The addresses of `pk`'s versions, oldest first; `key_at` reads the
    /// key stored at an address (the index keeps none).
    pub fn get<'a>(
        &'a self,
        pk: &'a Pk,
        key_at: impl Fn(RowAddress) -> &'a Pk + 'a,
    ) -> impl DoubleEndedIterator<Item = RowAddress> + 'a {
        let candidates = self.versions.get(&digest(pk)).map_or(&[][..], Versions::as_slice);
        candidates.iter().copied().filter(move |&address| key_at(address) == pk)
    }
}

/// The table's key for `pk`: unique for integer keys; for string keys a
/// keyed hash, so no input makes many keys share one entry cheaply.
fn digest(pk: &Pk) -> u64 {
    match pk {
        Pk::Int(value) => *value as u64,
        Pk::Str(text) => {
            let mut hasher = std::hash::DefaultHasher::new();
            text.hash(&mut hasher);
            hasher.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_back_in_order_and_only_for_their_own_key() {
        let keys = [Pk::Int(7), Pk::Int(-7), Pk::Str("a".into()), Pk::Str("b".into())];
        let mut stored: HashMap<RowAddress, Pk> = HashMap::new();
        let mut index = KeyIndex::default();
        for (i, key) in keys.iter().enumerate() {
            for version in 0..=i as u32 {
                let address = (version, i as u32);
                index.insert(key, address);
                stored.insert(address, key.clone());
            }
        }
        for (i, key) in keys.iter().enumerate() {
            let found: Vec<RowAddress> = index.get(key, |address| &stored[&address]).collect();
            assert_eq!(found, (0..=i as u32).map(|v| (v, i as u32)).collect::<Vec<_>>(), "{key:?}");
            assert_eq!(index.get(key, |address| &stored[&address]).next_back(), Some((i as u32, i as u32)));
        }
        assert_eq!(index.get(&Pk::Int(8), |address| &stored[&address]).count(), 0);
        index.clear();
        assert_eq!(index.get(&keys[0], |address| &stored[&address]).count(), 0);
    }

    #[test]
    fn keys_sharing_a_digest_are_told_apart_by_the_stored_key() {
        // The integer 5 and a string whose digest is 5 would share an
        // entry; simulate it with two keys inserted under one digest.
        let mut index = KeyIndex::default();
        let (five, other) = (Pk::Int(5), Pk::Str("five".into()));
        index.versions.insert(5, Versions::One((0, 0)));
        index.versions.get_mut(&5).unwrap().push((0, 1));
        let stored = |address: RowAddress| if address.1 == 0 { &five } else { &other };
        assert_eq!(index.get(&five, stored).collect::<Vec<_>>(), vec![(0, 0)]);
        assert_eq!(std::mem::size_of::<(u64, Versions)>(), 24);
    }
}
