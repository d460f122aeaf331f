//! Hybrid search: several searches (on one or several vector fields) at
//! one timestamp, their hits fused into one ranking (Milvus's
//! `hybrid_search` with an RRF or weighted ranker).

use super::*;

/// Searches one hybrid search may fuse (Milvus allows up to 1024; more
/// than a handful is a request to reject, not to run).
const MAX_SUB_SEARCHES: usize = 16;

impl Engine {
    /// Runs every search of `searches` at one timestamp (the first one's,
    /// chosen by `options`' consistency) and fuses their hits per query
    /// with `options.ranker`: the best `options.k`, fused score first, ties
    /// in key order. A hit's `score` is its fused score.
    pub fn hybrid_search(
        &self,
        collection: &str,
        searches: &[SubSearch],
        options: &HybridOptions,
    ) -> Result<SearchResult> {
        if searches.is_empty() || searches.len() > MAX_SUB_SEARCHES {
            return Err(Error::argument(
                "searches",
                format!("{} searches; a hybrid search fuses 1..={MAX_SUB_SEARCHES}", searches.len()),
            ));
        }
        if options.k == 0 || options.k > 16_384 {
            return Err(Error::argument("k", format!("{} outside 1..=16384", options.k)));
        }
        let nq = searches[0].queries.len();
        if let Some((i, other)) = searches.iter().enumerate().find(|(_, s)| s.queries.len() != nq) {
            return Err(Error::argument(
                format!("searches[{i}].vectors"),
                format!(
                    "{} query vectors where searches[0] has {nq}: every search has one per query",
                    other.queries.len()
                ),
            ));
        }
        check_ranker(&options.ranker, searches.len())?;
        let schema = self.entry(collection)?.schema;
        let mut read_ts = None;
        let mut lists = Vec::with_capacity(searches.len());
        for (i, search) in searches.iter().enumerate() {
            let (_, _, metric) = schema
                .vector_field(search.field.as_deref())
                .map_err(|e| Error::argument(format!("searches[{i}].field"), e.to_string()))?;
            let sub = SearchOptions {
                field: search.field.clone(),
                k: search.k,
                ef: search.ef,
                output_fields: options.output_fields.clone(),
                filter: search.filter.clone(),
                radius: search.radius,
                range_filter: search.range_filter,
                group_by: None,
                partitions: options.partitions.clone(),
                consistency: options.consistency,
                // The searches after the first read where it read.
                as_of: read_ts.or(options.as_of),
                guarantee_ts: options.guarantee_ts,
                timeout: options.timeout,
            };
            let result = self.search(collection, &search.queries, &sub)?;
            read_ts = Some(result.read_ts);
            lists.push((metric, result.hits));
        }
        let mut per_query: Vec<Vec<(Metric, Vec<SearchHit>)>> = (0..nq).map(|_| Vec::new()).collect();
        for (metric, hits) in lists {
            for (query, hits) in per_query.iter_mut().zip(hits) {
                query.push((metric, hits));
            }
        }
        let hits = per_query.into_iter().map(|lists| fuse(lists, &options.ranker, options.k)).collect();
        Ok(SearchResult { hits, read_ts: read_ts.unwrap_or_default() })
    }
}

fn check_ranker(ranker: &Ranker, searches: usize) -> Result<()> {
    match ranker {
        Ranker::Rrf { k } if !(k.is_finite() && *k > 0.0 && *k < 16_384.0) => {
            Err(Error::argument("ranker.k", format!("{k} outside (0, 16384)")))
        }
        Ranker::Weighted { weights, .. } if weights.len() != searches => Err(Error::argument(
            "ranker.weights",
            format!("{} weights for {searches} searches: give one per search", weights.len()),
        )),
        Ranker::Weighted { weights, .. } if weights.iter().any(|w| !w.is_finite()) => {
            Err(Error::argument("ranker.weights", "every weight must be a finite number"))
        }
        _ => Ok(()),
    }
}

/// A search score as the weighted ranker counts it (larger is better).
fn weighted_score(metric: Metric, score: f32, normalize: bool) -> f32 {
    use std::f32::consts::PI;
    match (metric, normalize) {
        (Metric::L2, _) => 1.0 - 2.0 * score.atan() / PI,
        (Metric::COSINE, true) => (1.0 + score) / 2.0,
        (Metric::IP, true) => 0.5 + score.atan() / PI,
        (Metric::IP | Metric::COSINE, false) => score,
    }
}

/// One query's fused hits: each search's hits, best first, with its metric.
fn fuse(lists: Vec<(Metric, Vec<SearchHit>)>, ranker: &Ranker, k: usize) -> Vec<SearchHit> {
    let mut fused: HashMap<Pk, SearchHit> = HashMap::new();
    for (search, (metric, hits)) in lists.into_iter().enumerate() {
        for (rank, hit) in hits.into_iter().enumerate() {
            let contribution = match ranker {
                Ranker::Rrf { k } => 1.0 / (k + rank as f32 + 1.0),
                Ranker::Weighted { weights, normalize } => {
                    weights[search] * weighted_score(metric, hit.score, *normalize)
                }
            };
            fused.entry(hit.pk.clone()).or_insert(SearchHit { score: 0.0, ..hit }).score += contribution;
        }
    }
    let mut hits: Vec<SearchHit> = fused.into_values().collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.pk.order_key().cmp(&b.pk.order_key())));
    hits.truncate(k);
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(pk: i64, score: f32) -> SearchHit {
        SearchHit { pk: Pk::Int(pk), score, fields: BTreeMap::new(), group: None }
    }

    fn keyed(hits: &[SearchHit]) -> Vec<(i64, f32)> {
        hits.iter().map(|h| (if let Pk::Int(k) = h.pk { k } else { -1 }, h.score)).collect()
    }

    #[test]
    fn rrf_sums_reciprocal_ranks_over_the_searches_that_found_a_hit() {
        let lists =
            vec![(Metric::COSINE, vec![hit(1, 0.9), hit(2, 0.8)]), (Metric::L2, vec![hit(2, 0.1), hit(3, 0.2)])];
        let fused = keyed(&fuse(lists, &Ranker::Rrf { k: 60.0 }, 10));
        let two = 1.0 / 62.0 + 1.0 / 61.0;
        assert_eq!(fused, vec![(2, two), (1, 1.0 / 61.0), (3, 1.0 / 62.0)]);
    }

    #[test]
    fn weighted_fusion_normalises_each_metric_as_milvus_does() {
        let lists = vec![(Metric::COSINE, vec![hit(1, 0.9)]), (Metric::L2, vec![hit(1, 1.0), hit(2, 0.0)])];
        let ranker = Ranker::Weighted { weights: vec![0.4, 0.6], normalize: true };
        // COSINE 0.9 → 0.95; L2 1.0 → 1 − 2·atan(1)/π = 0.5; L2 0 → 1.
        let fused = keyed(&fuse(lists, &ranker, 5));
        assert_eq!(fused.iter().map(|h| h.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((fused[0].1 - (0.4 * 0.95 + 0.6 * 0.5)).abs() < 1e-6, "{fused:?}");
        assert!((fused[1].1 - 0.6).abs() < 1e-6, "{fused:?}");
        let ip = vec![(Metric::IP, vec![hit(7, 1.0)])];
        let normalised = keyed(&fuse(ip.clone(), &Ranker::Weighted { weights: vec![1.0], normalize: true }, 1));
        assert!((normalised[0].1 - 0.75).abs() < 1e-6, "IP 1 → 1/2 + atan(1)/π: {normalised:?}");
        let raw = Ranker::Weighted { weights: vec![2.0], normalize: false };
        assert_eq!(keyed(&fuse(ip, &raw, 1)), vec![(7, 2.0)]);
    }

    #[test]
    fn rankers_are_checked_against_the_searches() {
        assert!(check_ranker(&Ranker::Rrf { k: 0.0 }, 2).unwrap_err().to_string().contains("ranker.k"));
        let short = Ranker::Weighted { weights: vec![1.0], normalize: true };
        assert!(check_ranker(&short, 2).unwrap_err().to_string().contains("ranker.weights"));
        assert!(check_ranker(&Ranker::Rrf { k: 60.0 }, 2).is_ok());
    }
}
