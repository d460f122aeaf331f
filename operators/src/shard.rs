//! One shard of one collection on one worker: its segments, where every row
//! version lives, and the reads it answers at a timestamp.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use vectorflow_core::{CollectionSchema, Pk, Result, Timestamp, Value, VersionId};

use crate::filter::Filter;
use crate::index::IndexParams;
pub use crate::segment::SearchPlan;
use crate::segment::{RowSet, Segment};
use crate::topk::TopK;

/// Shard tuning, the same for every shard of an engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardConfig {
    /// A growing segment seals when it holds this many rows.
    pub seal_rows: usize,
    pub index: IndexParams,
    pub plan: SearchPlan,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig { seal_rows: 16_384, index: IndexParams::default(), plan: SearchPlan::default() }
    }
}

/// One search hit: the key, the internal distance (smaller is closer) and the requested fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub pk: Pk,
    pub distance: f32,
    pub fields: Vec<Value>,
}

/// Counts a shard reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Row versions held, live or retired.
    pub versions: usize,
    /// Versions not retired.
    pub live_rows: usize,
    pub growing_rows: usize,
    pub sealed_segments: usize,
    pub indexed_segments: usize,
}

impl std::ops::AddAssign for ShardStats {
    fn add_assign(&mut self, other: ShardStats) {
        self.versions += other.versions;
        self.live_rows += other.live_rows;
        self.growing_rows += other.growing_rows;
        self.sealed_segments += other.sealed_segments;
        self.indexed_segments += other.indexed_segments;
    }
}

/// Where a row version lives: segment id (its position) and row.
type RowAddress = (u64, u32);

#[derive(Debug)]
pub struct Shard {
    schema: Arc<CollectionSchema>,
    config: ShardConfig,
    /// Segment `i` has id `i`; the last one is the growing segment.
    segments: Vec<Segment>,
    locations: HashMap<VersionId, RowAddress>,
    /// Every version of a key still held, oldest first.
    versions_by_pk: HashMap<Pk, Vec<RowAddress>>,
}

impl Shard {
    pub fn new(schema: Arc<CollectionSchema>, config: ShardConfig) -> Shard {
        let growing = Segment::new(0, &schema);
        Shard { schema, config, segments: vec![growing], locations: HashMap::new(), versions_by_pk: HashMap::new() }
    }

    pub fn schema(&self) -> &Arc<CollectionSchema> {
        &self.schema
    }

    fn growing(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Applies the version changes of one timestamp: `retired` versions get
    /// `delete_ts = ts`; rows of `chunks` whose version is in `added` are
    /// appended with `insert_ts = ts` (others were superseded within `ts`).
    pub fn apply(
        &mut self,
        ts: Timestamp,
        chunks: Vec<(RecordBatch, Vec<VersionId>)>,
        added: &HashSet<VersionId>,
        retired: &[VersionId],
    ) -> Result<()> {
        for version in retired {
            match self.locations.get(version) {
                Some(&(segment, row)) => self.segments[segment as usize].retire(row, ts),
                None => tracing::error!(?version, "retired version not found in its shard"),
            }
        }
        for (batch, versions) in chunks {
            let keep: Vec<u32> =
                (0..versions.len()).filter(|&i| added.contains(&versions[i])).map(|i| i as u32).collect();
            if keep.is_empty() {
                continue;
            }
            let (batch, versions) = if keep.len() == versions.len() {
                (batch, versions)
            } else {
                let kept_versions = keep.iter().map(|&i| versions[i as usize]).collect();
                (vectorflow_core::batch::take_rows(&batch, &keep)?, kept_versions)
            };
            self.append(batch, versions, ts)?;
        }
        Ok(())
    }

    fn append(&mut self, batch: RecordBatch, versions: Vec<VersionId>, ts: Timestamp) -> Result<()> {
        let rows = batch.num_rows();
        let segment_id = (self.segments.len() - 1) as u64;
        let first = self.growing().append(batch, versions.clone(), ts)?;
        for (i, version) in versions.into_iter().enumerate() {
            let address = (segment_id, first + i as u32);
            self.locations.insert(version, address);
            let pk = self.segments[segment_id as usize].pk(address.1).clone();
            self.versions_by_pk.entry(pk).or_default().push(address);
        }
        if self.growing().len() >= self.config.seal_rows {
            self.seal_growing()?;
        }
        tracing::trace!(rows, ts, "appended");
        Ok(())
    }

    /// Seals the growing segment (if it holds rows) and starts a new one.
    pub fn seal_growing(&mut self) -> Result<()> {
        if self.growing().is_empty() {
            return Ok(());
        }
        let params = self.config.index;
        self.growing().seal(params)?;
        let id = self.segments.len() as u64;
        self.segments.push(Segment::new(id, &self.schema));
        Ok(())
    }

    /// Which rows of each segment pass `filter` (`None` without a filter).
    fn allowed(&self, filter: Option<&Filter>) -> Result<Vec<Option<Arc<RowSet>>>> {
        self.segments.iter().map(|segment| filter.map(|f| segment.evaluate(f)).transpose()).collect()
    }

    /// The `k` closest rows visible at `ts` (and passing `filter`) for each
    /// query, with `output_fields`.
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        field: usize,
        queries: &[Vec<f32>],
        k: usize,
        ef: usize,
        ts: Timestamp,
        filter: Option<&Filter>,
        output_fields: &[usize],
    ) -> Result<Vec<Vec<Hit>>> {
        let allowed = self.allowed(filter)?;
        Ok(queries
            .iter()
            .map(|query| {
                let mut top = TopK::new(k);
                for (segment, allowed) in self.segments.iter().zip(&allowed) {
                    for candidate in segment.search(field, query, k, ef, ts, allowed.as_deref(), self.config.plan) {
                        top.push(candidate);
                    }
                }
                top.into_sorted().into_iter().map(|c| self.hit(c.segment, c.row, c.distance, output_fields)).collect()
            })
            .collect())
    }

    fn hit(&self, segment: u64, row: u32, distance: f32, output_fields: &[usize]) -> Hit {
        let segment = &self.segments[segment as usize];
        Hit {
            pk: segment.pk(row).clone(),
            distance,
            fields: output_fields.iter().map(|&f| segment.value(f, row)).collect(),
        }
    }

    /// Rows visible at `ts` that pass `filter`: the first `limit` in key
    /// order (`Pk::order_key`), with `output_fields`.
    pub fn query(
        &self,
        filter: Option<&Filter>,
        ts: Timestamp,
        output_fields: &[usize],
        limit: usize,
    ) -> Result<Vec<(Pk, Vec<Value>)>> {
        let allowed = self.allowed(filter)?;
        let mut matches: Vec<(u64, u64, u32)> = Vec::new();
        for (segment, allowed) in self.segments.iter().zip(&allowed) {
            matches.extend(
                segment
                    .matching_rows(ts, allowed.as_deref())
                    .into_iter()
                    .map(|row| (segment.pk(row).order_key(), segment.id, row)),
            );
        }
        matches.sort_unstable();
        matches.truncate(limit);
        Ok(matches
            .into_iter()
            .map(|(_, segment, row)| {
                let hit = self.hit(segment, row, 0.0, output_fields);
                (hit.pk, hit.fields)
            })
            .collect())
    }

    /// How many rows visible at `ts` pass `filter`.
    pub fn count(&self, filter: Option<&Filter>, ts: Timestamp) -> Result<usize> {
        let allowed = self.allowed(filter)?;
        Ok(self
            .segments
            .iter()
            .zip(&allowed)
            .map(|(segment, allowed)| segment.passing_count(ts, allowed.as_deref()))
            .sum())
    }

    /// The version of each key visible at `ts` that this shard holds, with `output_fields`.
    pub fn get(&self, pks: &[Pk], ts: Timestamp, output_fields: &[usize]) -> Vec<(Pk, Vec<Value>)> {
        pks.iter()
            .filter_map(|pk| {
                let addresses = self.versions_by_pk.get(pk)?;
                let &(segment, row) =
                    addresses.iter().rev().find(|(s, r)| self.segments[*s as usize].visible(*r as usize, ts))?;
                let segment = &self.segments[segment as usize];
                Some((pk.clone(), output_fields.iter().map(|&f| segment.value(f, row)).collect()))
            })
            .collect()
    }

    pub fn stats(&self) -> ShardStats {
        let mut stats = ShardStats::default();
        for segment in &self.segments {
            stats.versions += segment.len();
            stats.live_rows += segment.live_rows();
            if segment.is_sealed() {
                stats.sealed_segments += 1;
                stats.indexed_segments += usize::from(segment.is_indexed());
            } else {
                stats.growing_rows += segment.len();
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vectorflow_core::batch::{WriteBatch, WriteKind};
    use vectorflow_core::{FieldSchema, Metric, Row};

    fn schema() -> Arc<CollectionSchema> {
        Arc::new(CollectionSchema::new(
            "t",
            vec![FieldSchema::int64_primary("id", false), FieldSchema::vector("v", 2, Metric::L2)],
        ))
    }

    fn write(schema: &CollectionSchema, ts: Timestamp, rows: &[(i64, [f32; 2])]) -> (RecordBatch, Vec<VersionId>) {
        let rows: Vec<Row> = rows
            .iter()
            .map(|(id, v)| Row::from([("id".into(), Value::Int(*id)), ("v".into(), Value::Vector(v.to_vec()))]))
            .collect();
        let batch = WriteBatch::from_rows(schema, &rows, WriteKind::Upsert).unwrap().batch;
        let versions = (0..rows.len() as u32).map(|row| VersionId { ts, partition: 0, row }).collect();
        (batch, versions)
    }

    #[test]
    fn versions_are_visible_between_insert_and_retire_across_seals() {
        let schema = schema();
        let config = ShardConfig { seal_rows: 2, ..ShardConfig::default() };
        let mut shard = Shard::new(schema.clone(), config);
        let (b1, v1) = write(&schema, 10, &[(1, [0.0, 0.0]), (2, [1.0, 0.0]), (3, [5.0, 5.0])]);
        let added: HashSet<_> = v1.iter().copied().collect();
        shard.apply(10, vec![(b1, v1.clone())], &added, &[]).unwrap();
        let (b2, v2) = write(&schema, 20, &[(1, [9.0, 9.0])]);
        let added2: HashSet<_> = v2.iter().copied().collect();
        shard.apply(20, vec![(b2, v2)], &added2, &[v1[0]]).unwrap();
        shard.apply(30, vec![], &HashSet::new(), &[v1[1]]).unwrap();

        let ids = |ts| -> Vec<Pk> {
            shard
                .search(1, &[vec![0.0, 0.0]], 3, 16, ts, None, &[])
                .unwrap()
                .remove(0)
                .into_iter()
                .map(|h| h.pk)
                .collect()
        };
        assert_eq!(ids(15), vec![Pk::Int(1), Pk::Int(2), Pk::Int(3)]);
        assert_eq!(ids(25), vec![Pk::Int(2), Pk::Int(3), Pk::Int(1)]);
        assert_eq!(ids(35), vec![Pk::Int(3), Pk::Int(1)]);
        assert_eq!(ids(5), Vec::<Pk>::new());
        assert_eq!(shard.get(&[Pk::Int(1)], 25, &[1])[0].1, vec![Value::Vector(vec![9.0, 9.0])]);
        assert!(shard.get(&[Pk::Int(2)], 35, &[]).is_empty());
        assert_eq!(shard.stats().sealed_segments, 1);
    }
}
