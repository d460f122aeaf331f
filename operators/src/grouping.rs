//! Grouping search (Milvus's `group_by_field`): the best `k` groups of hits
//! by a scalar field's value, each with up to `group_size` of its best hits.
//!
//! Grouping runs over the nearest `n` hits of a plain search. Groups are
//! ranked by their best hit, so once `k` groups appear among the nearest
//! `n` rows no other group can outrank them, and each group's hits among
//! them are its nearest ones. [`group`] says when `n` was enough; the
//! caller searches again with a larger `n` when it was not.

use std::collections::HashMap;

use vectorflow_core::Value;

use crate::shard::Hit;

/// A group's identity: a scalar field's value. Floats and vectors do not
/// group (equality of computed floats is not a useful grouping).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GroupKey {
    Null,
    Bool(bool),
    Int(i64),
    String(String),
}

impl GroupKey {
    /// The key of a value; `None` for a float or a vector.
    pub fn of(value: &Value) -> Option<GroupKey> {
        match value {
            Value::Null => Some(GroupKey::Null),
            Value::Bool(v) => Some(GroupKey::Bool(*v)),
            Value::Int(v) => Some(GroupKey::Int(*v)),
            Value::String(v) => Some(GroupKey::String(v.clone())),
            Value::Float(_) | Value::Vector(_) => None,
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            GroupKey::Null => Value::Null,
            GroupKey::Bool(v) => Value::Bool(v),
            GroupKey::Int(v) => Value::Int(v),
            GroupKey::String(v) => Value::String(v),
        }
    }
}

/// How a grouping search groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    /// Groups answered.
    pub k: usize,
    /// Hits per group at most.
    pub group_size: usize,
    /// Whether every answered group must hold `group_size` hits when it
    /// has that many rows (Milvus's `strict_group_size`); otherwise a group
    /// holds those of its hits found among the candidates searched.
    pub strict: bool,
}

/// Groups `hits` (nearest first, each with its key): the best `k` groups
/// by their nearest hit, each with its nearest hits up to `group_size`,
/// flattened group after group. The flag says whether this is the answer
/// over every matching row: `all_rows` (the hits are every matching row),
/// or `k` groups were found and, when `strict`, each is full.
pub fn group(hits: Vec<(GroupKey, Hit)>, grouping: Grouping, all_rows: bool) -> (Vec<(GroupKey, Hit)>, bool) {
    let mut order: Vec<GroupKey> = Vec::new();
    let mut members: HashMap<GroupKey, Vec<Hit>> = HashMap::new();
    for (key, hit) in hits {
        match members.get_mut(&key) {
            Some(group) if group.len() < grouping.group_size => group.push(hit),
            Some(_) => {}
            None if order.len() < grouping.k => {
                order.push(key.clone());
                members.insert(key, vec![hit]);
            }
            // A group first seen after `k` others is outranked by them.
            None => {}
        }
    }
    let full = order.len() == grouping.k
        && (!grouping.strict
            || order.iter().all(|key| members.get(key).is_some_and(|g| g.len() >= grouping.group_size)));
    let grouped = order
        .into_iter()
        .flat_map(|key| {
            let group = members.remove(&key).unwrap_or_default();
            group.into_iter().map(move |hit| (key.clone(), hit))
        })
        .collect();
    (grouped, all_rows || full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vectorflow_core::Pk;

    fn hits(groups: &[i64]) -> Vec<(GroupKey, Hit)> {
        groups
            .iter()
            .enumerate()
            .map(|(i, &g)| (GroupKey::Int(g), Hit { pk: Pk::Int(i as i64), distance: i as f32, fields: Vec::new() }))
            .collect()
    }

    fn keys_and_pks(grouped: &[(GroupKey, Hit)]) -> Vec<(GroupKey, Pk)> {
        grouped.iter().map(|(key, hit)| (key.clone(), hit.pk.clone())).collect()
    }

    #[test]
    fn groups_rank_by_their_nearest_hit_and_keep_their_nearest_hits() {
        // Rows nearest first belong to groups 7, 7, 3, 7, 3, 9, 3.
        let (grouped, complete) =
            group(hits(&[7, 7, 3, 7, 3, 9, 3]), Grouping { k: 2, group_size: 2, strict: true }, false);
        let expect = [(7, 0), (7, 1), (3, 2), (3, 4)].map(|(g, pk)| (GroupKey::Int(g), Pk::Int(pk)));
        assert_eq!(keys_and_pks(&grouped), expect);
        assert!(complete, "two full groups among the candidates");
    }

    #[test]
    fn completeness_needs_k_groups_and_with_strict_full_ones() {
        let candidates = hits(&[1, 1, 2]);
        let strict = Grouping { k: 2, group_size: 2, strict: true };
        assert!(!group(candidates.clone(), strict, false).1, "group 2 holds one hit: more rows may be its");
        assert!(group(candidates.clone(), strict, true).1, "every matching row was searched");
        assert!(group(candidates.clone(), Grouping { strict: false, ..strict }, false).1);
        assert!(!group(candidates, Grouping { k: 3, group_size: 1, strict: false }, false).1, "only two groups");
    }

    #[test]
    fn floats_and_vectors_do_not_group() {
        assert_eq!(GroupKey::of(&Value::Float(1.0)), None);
        assert_eq!(GroupKey::of(&Value::String("a".into())), Some(GroupKey::String("a".into())));
    }
}
