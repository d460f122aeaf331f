//! What a server does with the log: a primary writes it and publishes what
//! it read (segments, manifests, offset bindings); a read replica follows
//! what a primary publishes and only serves reads.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes, binds log offsets to times, checkpoints and publishes.
    #[default]
    Primary,
    /// Loads the primary's published segments, follows the same topics
    /// with the primary's offset bindings (so every record has the
    /// primary's time), never writes to the log or the object store, and
    /// serves reads: its answers at a time equal the primary's.
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Role> {
        match text {
            "primary" => Ok(Role::Primary),
            "replica" => Ok(Role::Replica),
            other => Err(crate::Error::argument(
                "role",
                format!("`{}` is not a role: use `primary` or `replica`", crate::quote(other)),
            )),
        }
    }
}
