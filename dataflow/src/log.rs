//! The log the dataflow reads and the engine writes: the embedded log, or
//! Kafka topics (one per collection).

use std::sync::Arc;

use vectorflow_connectors::{EmbeddedLog, KafkaLog};
use vectorflow_core::Tso;

pub(crate) enum Log {
    Embedded(Arc<EmbeddedLog>),
    Kafka(Arc<KafkaLog>),
}

impl Log {
    /// The timestamp oracle writes and reads draw from.
    pub fn tso(&self) -> &Tso {
        match self {
            Log::Embedded(log) => log.tso(),
            Log::Kafka(kafka) => kafka.tso(),
        }
    }

    pub fn kafka(&self) -> Option<&Arc<KafkaLog>> {
        match self {
            Log::Kafka(kafka) => Some(kafka),
            Log::Embedded(_) => None,
        }
    }
}
