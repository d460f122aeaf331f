//! Authentication and roles of `vectorflow serve` (`[auth]` in the config).
//!
//! One tower layer ([`AuthLayer`]) sits in front of every gRPC service: it maps
//! the request's method path to the role it needs ([`METHOD_ACCESS`], one
//! table), checks the `authorization` metadata and answers UNAUTHENTICATED or
//! PERMISSION_DENIED itself, so no handler checks anything.
//!
//! The metadata is one of
//! - `Basic base64(user:password)` (HTTP basic, grpcurl `-H`),
//! - `Bearer <token>`,
//! - `base64(user:password)` without a scheme, as pymilvus sends it.
//!
//! Passwords are argon2 PHC strings (`vectorflow hash-password`). Tokens are
//! stored as SHA-256 hex, not argon2: a token is a long random secret, so a
//! slow hash buys nothing against guessing it, while a fast one keeps every
//! bearer call cheap without relying on the cache.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Search, query, get, SQL, list and describe collections, stats.
    Read,
    /// Read, and insert, upsert, delete, flush.
    Write,
    /// Everything, including creating and dropping collections.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// What a gRPC method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials: health checks and reflection, so load balancers and
    /// `grpcurl list` work against a server with auth.
    Open,
    /// Valid credentials of at least this role.
    Needs(Role),
}

/// The one table of who may call what: (service, method or `*`, access).
/// A path not in it needs [`Role::Admin`], so a method added to the proto
/// later is closed until someone classifies it here.
pub const METHOD_ACCESS: &[(&str, &str, Access)] = &[
    ("vectorflow.v1.Vectorflow", "Health", Access::Open),
    ("vectorflow.v1.Vectorflow", "Search", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "HybridSearch", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "Query", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "Get", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "Sql", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "Subscribe", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "ListSinks", Access::Needs(Role::Read)),
    // A sink writes to the server's brokers until it is dropped.
    ("vectorflow.v1.Vectorflow", "CreateSink", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "DropSink", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "ListCollections", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "DescribeCollection", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "GetStats", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "Insert", Access::Needs(Role::Write)),
    ("vectorflow.v1.Vectorflow", "Upsert", Access::Needs(Role::Write)),
    ("vectorflow.v1.Vectorflow", "Delete", Access::Needs(Role::Write)),
    ("vectorflow.v1.Vectorflow", "Flush", Access::Needs(Role::Write)),
    ("vectorflow.v1.Vectorflow", "CreateCollection", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "DropCollection", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "DescribeAlias", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "ListAliases", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "CreateAlias", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "AlterAlias", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "DropAlias", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "ListPartitions", Access::Needs(Role::Read)),
    ("vectorflow.v1.Vectorflow", "CreatePartition", Access::Needs(Role::Admin)),
    ("vectorflow.v1.Vectorflow", "DropPartition", Access::Needs(Role::Admin)),
    // Milvus's protocol (src/milvus): the same roles for the same kinds of call.
    ("milvus.proto.milvus.MilvusService", "GetVersion", Access::Open),
    // Its reasons name failed collections and their causes: readers only.
    ("milvus.proto.milvus.MilvusService", "CheckHealth", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "Connect", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "AllocTimestamp", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "HasCollection", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "DescribeCollection", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "ShowCollections", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "GetCollectionStatistics", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "GetLoadingProgress", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "GetLoadState", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "DescribeIndex", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "Search", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "HybridSearch", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "Query", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "GetFlushState", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "Insert", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "Upsert", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "Delete", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "Flush", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "LoadCollection", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "ReleaseCollection", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "CreateCollection", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "DropCollection", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "CreateIndex", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "DropIndex", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "DescribeAlias", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "ListAliases", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "CreateAlias", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "AlterAlias", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "DropAlias", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "HasPartition", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "ShowPartitions", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "GetPartitionStatistics", Access::Needs(Role::Read)),
    ("milvus.proto.milvus.MilvusService", "LoadPartitions", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "ReleasePartitions", Access::Needs(Role::Write)),
    ("milvus.proto.milvus.MilvusService", "CreatePartition", Access::Needs(Role::Admin)),
    ("milvus.proto.milvus.MilvusService", "DropPartition", Access::Needs(Role::Admin)),
    ("grpc.health.v1.Health", "*", Access::Open),
    ("grpc.reflection.v1.ServerReflection", "*", Access::Open),
    ("grpc.reflection.v1alpha.ServerReflection", "*", Access::Open),
];

/// The access a request path (`/package.Service/Method`) needs.
pub fn required_access(path: &str) -> Access {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Access::Needs(Role::Admin);
    };
    METHOD_ACCESS
        .iter()
        .find(|(s, m, _)| *s == service && (*m == method || *m == "*"))
        .map_or(Access::Needs(Role::Admin), |(_, _, access)| *access)
}

/// The method a request path names, as a metrics label: `/service/Method`
/// for a method of [`METHOD_ACCESS`], `/service/*` for the services served
/// whole (health, reflection), `None` for anything else, so what a client
/// sends cannot make labels without end.
pub fn method_label(path: &str) -> Option<String> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (known_service, known_method, _) =
        METHOD_ACCESS.iter().find(|(s, m, _)| *s == service && (*m == method || *m == "*"))?;
    Some(format!("/{known_service}/{known_method}"))
}

/// Why a call is refused, or why `[auth]` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "missing credentials: this server requires the `authorization` metadata \
         (`Basic base64(user:password)`, `Bearer <token>` or `base64(user:password)`)"
    )]
    Missing,
    #[error("malformed `authorization` metadata: {0}")]
    Malformed(&'static str),
    /// Unknown user, wrong password and unknown token look the same to the
    /// client, so the answer does not tell which user names exist.
    #[error("invalid credentials")]
    Invalid,
    #[error("permission denied: role `{have}` may not call {path} (it needs the `{need}` role)")]
    Forbidden { have: Role, need: Role, path: String },
    #[error("[auth]: {0}")]
    Config(String),
}

impl AuthError {
    pub fn status(&self) -> tonic::Status {
        match self {
            AuthError::Forbidden { .. } => tonic::Status::permission_denied(self.to_string()),
            AuthError::Config(_) => tonic::Status::internal(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

/// Credentials parsed from the `authorization` metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Basic { user: String, password: String },
    Bearer(String),
}

/// Standard base64, with or without padding: clients differ.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Parses the three accepted forms of the `authorization` value.
pub fn parse_authorization(value: &str) -> Result<Credential, AuthError> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    // The scheme is case-insensitive (RFC 9110).
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = rest.trim();
        if token.is_empty() {
            return Err(AuthError::Malformed("empty bearer token"));
        }
        return Ok(Credential::Bearer(token.to_string()));
    }
    // `Basic <b64>`, or pymilvus' bare `<b64>`.
    let encoded = if scheme.eq_ignore_ascii_case("basic") { rest.trim() } else { value };
    if encoded.is_empty() {
        return Err(AuthError::Malformed("empty credentials"));
    }
    let decoded = BASE64.decode(encoded).map_err(|_| AuthError::Malformed("user:password is not valid base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| AuthError::Malformed("user:password is not UTF-8"))?;
    // A user name cannot hold `:` (RFC 7617); a password can.
    let (user, password) = text.split_once(':').ok_or(AuthError::Malformed("expected base64 of user:password"))?;
    if user.is_empty() {
        return Err(AuthError::Malformed("empty user name"));
    }
    Ok(Credential::Basic { user: user.to_string(), password: password.to_string() })
}

/// The PHC string (argon2id, the crate's default cost) of `password`, for
/// `password_hash` in `[[auth.users]]`.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Config(format!("hashing the password: {e}")))
}

/// The SHA-256 hex of `token`, for `token_hash` in `[[auth.tokens]]`.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Compares without an early exit, so the time taken does not tell how many
/// leading bytes of a guessed token were right.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A user of `[[auth.users]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    /// argon2 PHC string, from `vectorflow hash-password`.
    pub password_hash: String,
    pub role: Role,
}

/// A token of `[[auth.tokens]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// SHA-256 hex of the token, from `vectorflow hash-password --token`.
    pub token_hash: String,
    pub role: Role,
}

/// How many verified credentials are remembered.
pub const CACHE_CAPACITY: usize = 1024;

/// Checks credentials against the configured users and tokens.
pub struct Authenticator {
    users: HashMap<String, (String, Role)>,
    tokens: Vec<([u8; 32], Role)>,
    /// Verified `authorization` values → role, keyed by SHA-256 of a
    /// per-process secret and the value: argon2 takes tens of milliseconds
    /// per check, far too slow per call; the secret keeps the keys from
    /// being a fast unsalted hash of the password in memory.
    cache: Mutex<HashMap<[u8; 32], Role>>,
    cache_secret: [u8; 32],
}

impl Authenticator {
    /// Checks every hash now, so a typo fails at startup, not at the first call.
    pub fn new(users: &[UserEntry], tokens: &[TokenEntry]) -> Result<Authenticator, AuthError> {
        if users.is_empty() && tokens.is_empty() {
            return Err(AuthError::Config(
                "auth is enabled but lists no users and no tokens, so no call could succeed".into(),
            ));
        }
        let mut by_name = HashMap::new();
        for user in users {
            PasswordHash::new(&user.password_hash).map_err(|e| {
                AuthError::Config(format!(
                    "user `{}`: password_hash is not a PHC string ({e}); make one with `vectorflow hash-password`",
                    user.name
                ))
            })?;
            if by_name.insert(user.name.clone(), (user.password_hash.clone(), user.role)).is_some() {
                return Err(AuthError::Config(format!("user `{}` is listed twice", user.name)));
            }
        }
        let tokens = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| {
                unhex(&token.token_hash).map(|hash| (hash, token.role)).ok_or_else(|| {
                    AuthError::Config(format!(
                        "tokens[{i}]: token_hash is not 64 hex digits (SHA-256); \
                         make one with `vectorflow hash-password --token`"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut cache_secret = [0u8; 32];
        OsRng.fill_bytes(&mut cache_secret);
        Ok(Authenticator { users: by_name, tokens, cache: Mutex::new(HashMap::new()), cache_secret })
    }

    fn cache_key(&self, value: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.cache_secret);
        hasher.update(value.as_bytes());
        hasher.finalize().into()
    }

    /// The role of an `authorization` value verified before, if any (cheap).
    pub fn cached(&self, value: &str) -> Option<Role> {
        let key = self.cache_key(value);
        self.cache.lock().ok()?.get(&key).copied()
    }

    fn remember(&self, value: &str, role: Role) {
        let key = self.cache_key(value);
        if let Ok(mut cache) = self.cache.lock() {
            // Bounded: when full, start over. Costs one argon2 check per
            // active credential, and needs no bookkeeping per hit.
            if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&key) {
                cache.clear();
            }
            cache.insert(key, role);
        }
    }

    #[cfg(test)]
    fn cache_len(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// The role of the caller presenting `value` (the `authorization`
    /// metadata). May run argon2: call it off the async workers.
    pub fn verify(&self, value: Option<&str>) -> Result<Role, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        if let Some(role) = self.cached(value) {
            return Ok(role);
        }
        let role = match parse_authorization(value)? {
            Credential::Bearer(token) => {
                let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                // Every entry is compared, so the time does not tell which one matched.
                self.tokens
                    .iter()
                    .fold(None, |found, (h, role)| if constant_time_eq(h, &hash) { Some(*role) } else { found })
            }
            Credential::Basic { user, password } => match self.users.get(&user) {
                Some((phc, role)) => verify_password(phc, &password).then_some(*role),
                None => {
                    // Spend the time a wrong password costs, so response time
                    // does not tell which user names exist.
                    if let Some((phc, _)) = self.users.values().next() {
                        let _ = verify_password(phc, &password);
                    }
                    None
                }
            },
        };
        let role = role.ok_or(AuthError::Invalid)?;
        self.remember(value, role);
        Ok(role)
    }
}

fn verify_password(phc: &str, password: &str) -> bool {
    // The PHC string was checked in `Authenticator::new`; it carries its own parameters.
    PasswordHash::new(phc).is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
}

/// Checks one request: Ok when it may go on.
pub fn authorize(auth: &Authenticator, path: &str, value: Option<&str>) -> Result<(), AuthError> {
    let Access::Needs(need) = required_access(path) else {
        return Ok(());
    };
    let have = auth.verify(value)?;
    if have < need {
        return Err(AuthError::Forbidden { have, need, path: path.to_string() });
    }
    Ok(())
}

/// The tower layer of `vectorflow serve`; without an authenticator (auth
/// off) it passes every request through.
#[derive(Clone, Default)]
pub struct AuthLayer {
    auth: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    pub fn new(auth: Option<Arc<Authenticator>>) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.auth.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::ready_service::take_ready(&mut self.inner);
        let Some(auth) = self.auth.clone() else {
            return Box::pin(inner.call(request));
        };
        let path = request.uri().path().to_string();
        // Open methods ignore the metadata entirely: a health check never fails on credentials.
        if required_access(&path) == Access::Open {
            return Box::pin(inner.call(request));
        }
        let value = match request.headers().get(http::header::AUTHORIZATION).map(|v| v.to_str()) {
            None => None,
            Some(Ok(value)) => Some(value.to_string()),
            Some(Err(_)) => {
                let status = AuthError::Malformed("not ASCII").status();
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        Box::pin(async move {
            let verdict = match &value {
                // A cache hit is cheap; argon2 is not, and would stall this async worker.
                None => Err(AuthError::Missing),
                Some(v) if auth.cached(v).is_some() => authorize(&auth, &path, Some(v)),
                Some(_) => {
                    let (auth, path) = (auth.clone(), path.clone());
                    tokio::task::spawn_blocking(move || authorize(&auth, &path, value.as_deref()))
                        .await
                        .unwrap_or_else(|e| Err(AuthError::Config(format!("credential check failed: {e}"))))
                }
            };
            match verdict {
                Ok(()) => inner.call(request).await,
                Err(error) => {
                    tracing::debug!(path, "refused: {error}");
                    Ok(error.status().into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{Algorithm, Params, Version};

    /// A PHC string with a tiny cost, so tests (debug builds) stay fast; the
    /// string carries its parameters, so verification uses the same ones.
    fn cheap_hash(password: &str) -> String {
        let params = Params::new(64, 1, 1, None).expect("valid argon2 parameters");
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .expect("hashing")
            .to_string()
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn metrics_labels_are_known_methods_only() {
        assert_eq!(
            method_label("/vectorflow.v1.Vectorflow/Search").as_deref(),
            Some("/vectorflow.v1.Vectorflow/Search")
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check").as_deref(), Some("/grpc.health.v1.Health/*"));
        for made_up in ["/vectorflow.v1.Vectorflow/Nope", "/x/y", "/", "", "/vectorflow.v1.Vectorflow"] {
            assert_eq!(method_label(made_up), None, "{made_up}");
        }
    }

    fn authenticator() -> Authenticator {
        let user = |name: &str, role| UserEntry { name: name.into(), password_hash: cheap_hash(name), role };
        Authenticator::new(
            &[user("reader", Role::Read), user("writer", Role::Write), user("root", Role::Admin)],
            &[TokenEntry { token_hash: hash_token("s3cret-token"), role: Role::Write }],
        )
        .expect("a valid configuration")
    }

    #[test]
    fn role_table() {
        let needs = |path: &str| required_access(path);
        for method in ["Search", "Query", "Get", "Sql", "ListCollections", "DescribeCollection", "GetStats"] {
            assert_eq!(needs(&format!("/vectorflow.v1.Vectorflow/{method}")), Access::Needs(Role::Read), "{method}");
        }
        for method in ["Insert", "Upsert", "Delete", "Flush"] {
            assert_eq!(needs(&format!("/vectorflow.v1.Vectorflow/{method}")), Access::Needs(Role::Write), "{method}");
        }
        for method in ["CreateCollection", "DropCollection", "SomethingNew"] {
            assert_eq!(needs(&format!("/vectorflow.v1.Vectorflow/{method}")), Access::Needs(Role::Admin), "{method}");
        }
        assert_eq!(needs("/vectorflow.v1.Vectorflow/Health"), Access::Open);
        assert_eq!(needs("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(needs("/grpc.health.v1.Health/Watch"), Access::Open);
        assert_eq!(needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Access::Open);
        assert_eq!(needs("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), Access::Open);
        assert_eq!(needs("/other.Service/Health"), Access::Needs(Role::Admin));
        assert_eq!(needs("garbage"), Access::Needs(Role::Admin));
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin);
    }

    #[test]
    fn header_forms() {
        let basic = Credential::Basic { user: "ann".into(), password: "p:w d".into() };
        assert_eq!(parse_authorization(&format!("Basic {}", b64("ann:p:w d"))), Ok(basic.clone()));
        assert_eq!(parse_authorization(&format!("basic {}", b64("ann:p:w d"))), Ok(basic.clone()));
        // pymilvus: bare base64, with or without padding.
        assert_eq!(parse_authorization(&b64("ann:p:w d")), Ok(basic.clone()));
        assert_eq!(parse_authorization(b64("ann:p:w d").trim_end_matches('=')), Ok(basic));
        assert_eq!(parse_authorization("Bearer abc.def"), Ok(Credential::Bearer("abc.def".into())));
        assert_eq!(parse_authorization("Bearer   "), Err(AuthError::Malformed("empty bearer token")));
        assert_eq!(parse_authorization("Basic"), Err(AuthError::Malformed("empty credentials")));
        assert!(matches!(parse_authorization("Basic !!!not base64"), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_authorization("%%%"), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_authorization(&b64("no colon")), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_authorization(&b64(":password")), Err(AuthError::Malformed(_))));
        assert!(matches!(parse_authorization(""), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn verification_and_roles() {
        let auth = authenticator();
        let basic = |user: &str, password: &str| format!("Basic {}", b64(&format!("{user}:{password}")));
        assert_eq!(auth.verify(None), Err(AuthError::Missing));
        assert_eq!(auth.verify(Some(&basic("reader", "reader"))), Ok(Role::Read));
        assert_eq!(auth.verify(Some(&b64("root:root"))), Ok(Role::Admin), "pymilvus form");
        assert_eq!(auth.verify(Some(&basic("reader", "wrong"))), Err(AuthError::Invalid));
        assert_eq!(auth.verify(Some(&basic("nobody", "reader"))), Err(AuthError::Invalid));
        assert_eq!(auth.verify(Some("Bearer s3cret-token")), Ok(Role::Write));
        assert_eq!(auth.verify(Some("Bearer other")), Err(AuthError::Invalid));
        assert!(matches!(auth.verify(Some("Basic ***")), Err(AuthError::Malformed(_))));

        let search = "/vectorflow.v1.Vectorflow/Search";
        let insert = "/vectorflow.v1.Vectorflow/Insert";
        let drop = "/vectorflow.v1.Vectorflow/DropCollection";
        assert_eq!(authorize(&auth, search, None), Err(AuthError::Missing));
        assert_eq!(authorize(&auth, "/grpc.health.v1.Health/Check", None), Ok(()));
        assert_eq!(authorize(&auth, search, Some(&basic("reader", "reader"))), Ok(()));
        let denied = authorize(&auth, insert, Some(&basic("reader", "reader")));
        assert_eq!(denied, Err(AuthError::Forbidden { have: Role::Read, need: Role::Write, path: insert.into() }));
        assert_eq!(denied.map_err(|e| e.status().code()), Err(tonic::Code::PermissionDenied));
        assert_eq!(authorize(&auth, insert, Some(&basic("writer", "writer"))), Ok(()));
        assert!(authorize(&auth, drop, Some(&basic("writer", "writer"))).is_err());
        assert_eq!(authorize(&auth, drop, Some(&basic("root", "root"))), Ok(()));
        assert_eq!(AuthError::Invalid.status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn successes_are_cached_and_the_cache_is_bounded() {
        let auth = authenticator();
        let good = format!("Basic {}", b64("writer:writer"));
        assert_eq!(auth.cached(&good), None);
        assert_eq!(auth.verify(Some(&good)), Ok(Role::Write));
        assert_eq!(auth.cached(&good), Some(Role::Write));
        let _ = auth.verify(Some(&format!("Basic {}", b64("writer:wrong"))));
        assert_eq!(auth.cache_len(), 1, "failures are not cached");
        for i in 0..CACHE_CAPACITY + 10 {
            auth.remember(&format!("key {i}"), Role::Read);
            assert!(auth.cache_len() <= CACHE_CAPACITY);
        }
    }

    #[test]
    fn bad_configurations_fail_early() {
        let none = Authenticator::new(&[], &[]).err();
        assert!(matches!(none, Some(AuthError::Config(_))));
        let user = UserEntry { name: "a".into(), password_hash: "plaintext".into(), role: Role::Read };
        let error = Authenticator::new(&[user], &[]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("hash-password"), "{error}");
        let token = TokenEntry { token_hash: "abc".into(), role: Role::Read };
        assert!(Authenticator::new(&[], &[token]).is_err());
        let hashed = hash_password("pw").expect("hashing");
        assert!(hashed.starts_with("$argon2id$"), "{hashed}");
        assert!(verify_password(&hashed, "pw") && !verify_password(&hashed, "pW"));
        assert_eq!(hash_token("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
