//! Cluster mode: several processes running one timely dataflow. Every
//! process names the same `processes` (timely's exchange addresses, in
//! process order) and its own place in them; collections shard over every
//! worker of every process.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The exchange address (`host:port`) of every process, in process
    /// order: process `I` listens on `processes[I]`, the others connect to it.
    pub processes: Vec<String>,
    /// This process's index in `processes`.
    pub process: usize,
    /// timely's exchange has neither authentication nor encryption: an
    /// address beyond loopback is refused unless this says the network
    /// between the processes admits nobody else.
    pub private_network: bool,
}

impl ClusterConfig {
    /// Whether this names a cluster (an empty `processes` runs one process).
    pub fn is_cluster(&self) -> bool {
        !self.processes.is_empty()
    }

    /// Every worker of the cluster, with `workers` per process.
    pub fn total_workers(&self, workers: usize) -> usize {
        workers * self.processes.len().max(1)
    }

    /// The global indices of this process's workers.
    pub fn local_workers(&self, workers: usize) -> Range<usize> {
        let first = self.process * workers;
        first..first + workers
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        if !self.is_cluster() {
            return Ok(());
        }
        if self.process >= self.processes.len() {
            return Err(Error::argument(
                "cluster.process",
                format!(
                    "is {}, but `cluster.processes` names {} processes (0 to {})",
                    self.process,
                    self.processes.len(),
                    self.processes.len() - 1
                ),
            ));
        }
        for (i, address) in self.processes.iter().enumerate() {
            let setting = || format!("cluster.processes[{i}]");
            let Some((host, port)) = address.rsplit_once(':') else {
                return Err(Error::argument(setting(), format!("`{address}` is not host:port")));
            };
            if port.parse::<u16>().is_err() {
                return Err(Error::argument(setting(), format!("`{address}`: `{port}` is not a port")));
            }
            // Names are not resolved here (in a StatefulSet the peers'
            // names appear as their pods start): only an address literal
            // or `localhost` counts as loopback.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !self.private_network && !loopback {
                return Err(Error::argument(
                    setting(),
                    format!(
                        "`{address}` is beyond loopback, and the exchange between processes has no authentication: \
                         run the processes on a private network and set `cluster.private_network = true`"
                    ),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(repeated) = self.processes.iter().find(|a| !seen.insert(a.as_str())) {
            return Err(Error::argument("cluster.processes", format!("`{repeated}` is named twice")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(processes: &[&str], process: usize) -> ClusterConfig {
        ClusterConfig { processes: processes.iter().map(|s| s.to_string()).collect(), process, private_network: false }
    }

    #[test]
    fn workers_are_numbered_process_by_process() {
        let config = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 1);
        assert_eq!(config.total_workers(2), 6);
        assert_eq!(config.local_workers(2), 2..4);
        assert!(config.validate().is_ok());
        assert_eq!(ClusterConfig::default().total_workers(3), 3);
        assert_eq!(ClusterConfig::default().local_workers(3), 0..3);
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let message = |config: ClusterConfig| config.validate().unwrap_err().to_string();
        assert!(message(cluster(&["127.0.0.1:1", "127.0.0.1:2"], 2)).contains("cluster.process"));
        assert!(message(cluster(&["127.0.0.1:1", "127.0.0.1:1"], 0)).contains("named twice"));
        assert!(message(cluster(&["127.0.0.1:1", "no-port"], 0)).contains("cluster.processes[1]"));
        assert!(message(cluster(&["127.0.0.1:1", "127.0.0.1:http"], 0)).contains("not a port"));
        assert!(cluster(&["localhost:1", "[::1]:2"], 0).validate().is_ok());
        assert!(message(cluster(&["127.0.0.1:1", "vf-1.vf:2101"], 0)).contains("private_network"));
        let beyond = cluster(&["127.0.0.1:1", "10.1.2.3:2101"], 0);
        assert!(message(beyond.clone()).contains("private_network"));
        assert!(ClusterConfig { private_network: true, ..beyond }.validate().is_ok());
    }
}
