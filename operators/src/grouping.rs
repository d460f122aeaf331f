//! Grouping search (Milvus's `group_by_field`): the best `k` groups of hits
//! by a scalar field's value, each with up to `group_size` of its best hits.
//!
//! Grouping runs over the nearest `n` hits of a plain search. Groups are
//! ranked by their best hit, so once `k` groups appear among the nearest
//! `n` rows no other group can outrank them, and each group's hits among
//! them are its nearest ones. [`group`] says when `n` was enough to rank
//! the groups; the caller searches again with a larger `n` when it was
//! not. A group that must be full (`strict`) and is not is then filled by
//! a search restricted to it ([`GroupKey::condition`]): a small group would
//! otherwise need `n` to reach every row.

use std::collections::HashMap;

use vectorflow_core::{Value, string_literal};

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

    /// A filter expression passing exactly this group's rows of `field`.
    pub fn condition(&self, field: &str) -> String {
        match self {
            GroupKey::Null => format!("{field} is null"),
            GroupKey::Bool(v) => format!("{field} == {v}"),
            GroupKey::Int(v) => format!("{field} == {v}"),
            GroupKey::String(v) => format!("{field} == {}", string_literal(v)),
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

/// One query's groups, best first, each with its hits nearest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Grouped {
    pub groups: Vec<(GroupKey, Vec<Hit>)>,
    /// Whether these are the best groups over every matching row: `k`
    /// were found, or the hits were every matching row.
    pub ranked: bool,
    /// Whether the hits were every matching row (no group can hold more).
    pub all_rows: bool,
}

impl Grouped {
    /// The groups a strict grouping must still fill: not full, when rows
    /// not searched may belong to them.
    pub fn unfilled(&self, grouping: Grouping) -> impl Iterator<Item = usize> + '_ {
        let must = grouping.strict && !self.all_rows;
        self.groups
            .iter()
            .enumerate()
            .filter(move |(_, (_, hits))| must && hits.len() < grouping.group_size)
            .map(|(i, _)| i)
    }

    /// The hits group after group, each with its key.
    pub fn into_hits(self) -> impl Iterator<Item = (GroupKey, Hit)> {
        self.groups.into_iter().flat_map(|(key, hits)| hits.into_iter().map(move |hit| (key.clone(), hit)))
    }
}

/// Groups `hits` (nearest first, each with its key): the best `k` groups
/// by their nearest hit, each with its nearest hits up to `group_size`.
/// `all_rows`: the hits are every matching row.
pub fn group(hits: Vec<(GroupKey, Hit)>, grouping: Grouping, all_rows: bool) -> Grouped {
    let mut groups: Vec<(GroupKey, Vec<Hit>)> = Vec::new();
    let mut position: HashMap<GroupKey, usize> = HashMap::new();
    for (key, hit) in hits {
        match position.get(&key) {
            Some(&i) if groups[i].1.len() < grouping.group_size => groups[i].1.push(hit),
            Some(_) => {}
            None if groups.len() < grouping.k => {
                position.insert(key.clone(), groups.len());
                groups.push((key, vec![hit]));
            }
            // A group first seen after `k` others is outranked by them.
            None => {}
        }
    }
    let ranked = all_rows || groups.len() == grouping.k;
    Grouped { groups, ranked, all_rows }
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

    fn keys_and_pks(grouped: Grouped) -> Vec<(GroupKey, Pk)> {
        grouped.into_hits().map(|(key, hit)| (key, hit.pk)).collect()
    }

    #[test]
    fn groups_rank_by_their_nearest_hit_and_keep_their_nearest_hits() {
        // Rows nearest first belong to groups 7, 7, 3, 7, 3, 9, 3.
        let grouped = group(hits(&[7, 7, 3, 7, 3, 9, 3]), Grouping { k: 2, group_size: 2, strict: true }, false);
        assert!(grouped.ranked && grouped.unfilled(Grouping { k: 2, group_size: 2, strict: true }).count() == 0);
        let expect = [(7, 0), (7, 1), (3, 2), (3, 4)].map(|(g, pk)| (GroupKey::Int(g), Pk::Int(pk)));
        assert_eq!(keys_and_pks(grouped), expect);
    }

    #[test]
    fn ranking_needs_k_groups_and_strict_groups_short_of_hits_are_unfilled() {
        let candidates = hits(&[1, 1, 2]);
        let strict = Grouping { k: 2, group_size: 2, strict: true };
        let grouped = group(candidates.clone(), strict, false);
        assert!(grouped.ranked);
        assert_eq!(
            grouped.unfilled(strict).collect::<Vec<_>>(),
            vec![1],
            "group 2 holds one hit: more rows may be its"
        );
        assert_eq!(group(candidates.clone(), strict, true).unfilled(strict).count(), 0, "every row was searched");
        let loose = Grouping { strict: false, ..strict };
        assert_eq!(group(candidates.clone(), loose, false).unfilled(loose).count(), 0);
        assert!(!group(candidates, Grouping { k: 3, group_size: 1, strict: false }, false).ranked, "only two groups");
    }

    #[test]
    fn a_group_s_condition_passes_its_rows() {
        assert_eq!(GroupKey::Int(-3).condition("doc"), "doc == -3");
        assert_eq!(GroupKey::String("a\"b".into()).condition("tag"), r#"tag == "a\"b""#);
        assert_eq!(GroupKey::Null.condition("tag"), "tag is null");
    }

    #[test]
    fn floats_and_vectors_do_not_group() {
        assert_eq!(GroupKey::of(&Value::Float(1.0)), None);
        assert_eq!(GroupKey::of(&Value::String("a".into())), Some(GroupKey::String("a".into())));
    }
}
