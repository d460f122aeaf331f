//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use vectorflow::{
    CollectionSchema, DataType, Engine, EngineConfig, FieldSchema, Metric, Pk, Row, SearchPlan, Value, row,
};

/// `shared/datasets/<name>` beside the repository.
pub fn dataset_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets").join(name)
}

/// An engine whose searches scan exactly, so answers are deterministic.
pub fn exact_engine(dir: &Path, workers: usize, seal_rows: usize) -> Engine {
    let config = EngineConfig {
        workers,
        seal_rows,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, exact_below_fraction: 1.0 },
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens")
}

/// `id` int64, `v` float_vector(2) L2, `tag` varchar(8) nullable.
pub fn small_schema(name: &str) -> CollectionSchema {
    CollectionSchema::new(
        name,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", 2, Metric::L2),
            FieldSchema::new("tag", DataType::VarChar { max_length: 8 }).nullable(),
        ],
    )
}

pub fn small_row(id: i64, v: [f32; 2]) -> Row {
    row([("id", id.into()), ("v", v.to_vec().into())])
}

pub fn pks(hits: &[vectorflow::SearchHit]) -> Vec<Pk> {
    hits.iter().map(|h| h.pk.clone()).collect()
}

pub fn int(v: &Value) -> i64 {
    v.as_i64().expect("an integer")
}

/// An integer key as `i64` (string keys as -1, which no test uses).
pub fn pk_int(pk: &Pk) -> i64 {
    match pk {
        Pk::Int(v) => *v,
        Pk::Str(_) => -1,
    }
}
