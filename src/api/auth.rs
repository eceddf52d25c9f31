//! Who may call: bearer tokens on TCP, peer credentials on the Unix socket.
//!
//! Tokens are configured as SHA-256 hashes. A presented token is hashed and compared with
//! every configured hash in constant time (no early exit), so timing reveals neither which
//! hash nor how much of it matched. On the Unix socket the kernel tells us the peer's uid
//! and gid (`SO_PEERCRED`); root and members of `api.socket_group` are let in.
//!
//! A token of `api.token_sha256` may do everything; one of `[[api.tokens]]` holds scopes,
//! and may expire or be bound to source networks. A route needs one scope, read off its
//! method and path (`Scope::for_route`): a valid token is then refused for an expiry
//! (401 `EXPIRED_API_KEY`), its source address (403 `IP_NOT_ALLOWED`) or a missing scope
//! (403 `INSUFFICIENT_SCOPE`), in that order, before any handler runs.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::UnixPeer;
use crate::config::ApiConfig;
use crate::errors::ErrorCode;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    VpsRead,
    VpsWrite,
    VpsDelete,
    Console,
    Metrics,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "vps:read" => Scope::VpsRead,
            "vps:write" => Scope::VpsWrite,
            "vps:delete" => Scope::VpsDelete,
            "console" => Scope::Console,
            "metrics" => Scope::Metrics,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::VpsRead => "vps:read",
            Scope::VpsWrite => "vps:write",
            Scope::VpsDelete => "vps:delete",
            Scope::Console => "console",
            Scope::Metrics => "metrics",
            Scope::Admin => "admin",
        }
    }

    /// The scope a protected route needs: `/metrics` needs `metrics`, a console ticket
    /// `console`, other reads `vps:read`, deletions `vps:delete`, every other change
    /// `vps:write`.
    pub fn for_route(method: &axum::http::Method, path: &str) -> Scope {
        use axum::http::Method;
        if path == "/metrics" {
            Scope::Metrics
        } else if path.ends_with("/console") {
            Scope::Console
        } else if method == Method::GET || method == Method::HEAD {
            Scope::VpsRead
        } else if method == Method::DELETE {
            Scope::VpsDelete
        } else {
            Scope::VpsWrite
        }
    }
}

/// One accepted token.
#[derive(Clone)]
struct TokenEntry {
    name: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
    expires: Option<chrono::DateTime<chrono::Utc>>,
    /// Empty: any source.
    allowed: Vec<ipnetwork::IpNetwork>,
}

impl TokenEntry {
    fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// Accepted tokens, decoded once.
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

impl TokenSet {
    /// `api.token_sha256` (every scope) and `[[api.tokens]]` (validated by the config
    /// loader; bad hashes are skipped).
    pub fn from_config(hashes: &[String], tokens: &[crate::config::TokenConfig]) -> TokenSet {
        let decode = |h: &str| -> Option<[u8; 32]> { hex::decode(h).ok()?.try_into().ok() };
        let mut entries: Vec<TokenEntry> = hashes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                Some(TokenEntry {
                    name: format!("token_sha256[{i}]"),
                    hash: decode(h)?,
                    scopes: vec![Scope::Admin],
                    expires: None,
                    allowed: Vec::new(),
                })
            })
            .collect();
        entries.extend(tokens.iter().filter_map(|t| {
            Some(TokenEntry {
                name: t.name.clone(),
                hash: decode(&t.sha256)?,
                scopes: t.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                expires: t.expires_at.as_deref().and_then(crate::time::parse),
                allowed: t
                    .allowed_ips
                    .iter()
                    .filter_map(|n| n.parse().ok())
                    .collect(),
            })
        }));
        TokenSet { entries }
    }

    /// The entry whose hash is the token's: every hash is compared, in constant time.
    fn find(&self, token: &str) -> Option<&TokenEntry> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&presented)) && found.is_none() {
                found = Some(e);
            }
        }
        found
    }
}

/// SHA-256 hex of a token, as written in `api.token_sha256`.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Which local users may use the Unix socket.
#[derive(Clone, Default)]
pub struct SocketPolicy {
    pub group: Option<(nix::unistd::Gid, Vec<String>)>,
}

impl SocketPolicy {
    pub fn from_group(name: &str) -> SocketPolicy {
        if name.is_empty() {
            return SocketPolicy::default();
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => SocketPolicy {
                group: Some((g.gid, g.mem)),
            },
            _ => {
                tracing::warn!(group = name, "api.socket_group does not exist; root only");
                SocketPolicy::default()
            }
        }
    }

    pub fn allows(&self, peer: &UnixPeer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        let Some((gid, members)) = &self.group else {
            return false;
        };
        if peer.gid == gid.as_raw() {
            return true;
        }
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
            .ok()
            .flatten()
            .is_some_and(|u| members.contains(&u.name) || u.gid == *gid)
    }
}

/// Who may call, as the router was built with it from `[api]`.
#[derive(Clone, Default)]
pub struct Auth {
    pub tokens: TokenSet,
    pub socket: SocketPolicy,
}

impl Auth {
    pub fn from_config(api: &ApiConfig) -> Auth {
        Auth {
            tokens: TokenSet::from_config(&api.token_sha256, &api.tokens),
            socket: SocketPolicy::from_group(&api.socket_group),
        }
    }
}

/// Who called: a token's name, or the socket peer's uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// Who the request comes from, as far as the agent trusts it: `Ok` for an admitted socket
/// peer or a valid bearer token that may be used from the peer's address and holds
/// `scope` (any scope when `None`), else the refusal to answer with.
pub fn authenticate(auth: &Auth, req: &Request, scope: Option<Scope>) -> Result<Caller, ApiError> {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<UnixPeer>>() {
        if auth.socket.allows(peer) {
            return Ok(Caller(format!("uid {}", peer.uid)));
        }
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            format!(
                "uid {} is not root or a member of the admin group",
                peer.uid
            ),
        ));
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ApiError::new(
            ErrorCode::NoApiKey,
            "send Authorization: Bearer <token>",
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or("")
        .trim();
    if token.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoApiKey,
            "send Authorization: Bearer <token>",
        ));
    }
    let Some(entry) = auth.tokens.find(token) else {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "the token is not valid",
        ));
    };
    if entry.expires.is_some_and(|e| chrono::Utc::now() >= e) {
        return Err(ApiError::new(
            ErrorCode::ExpiredApiKey,
            format!("the token {:?} has expired", entry.name),
        ));
    }
    if !entry.allowed.is_empty() {
        let from = req
            .extensions()
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|ConnectInfo(a)| a.ip());
        let from = from.map(|ip| match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        });
        if !from.is_some_and(|ip| entry.allowed.iter().any(|n| n.contains(ip))) {
            return Err(ApiError::new(
                ErrorCode::IpNotAllowed,
                format!(
                    "the token {:?} may not be used from this address",
                    entry.name
                ),
            ));
        }
    }
    if let Some(scope) = scope {
        if !entry.allows(scope) {
            return Err(ApiError::new(
                ErrorCode::InsufficientScope,
                format!(
                    "the token {:?} lacks the scope {:?} this route needs",
                    entry.name,
                    scope.as_str()
                ),
            ));
        }
    }
    Ok(Caller(entry.name.clone()))
}

/// Whether a request on a public route was made by someone the agent trusts (who may then
/// see what strangers may not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted(pub bool);

pub async fn require_auth(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let scope = Scope::for_route(req.method(), &path);
    match authenticate(&auth, &req, Some(scope)) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// On public routes: marks the request `Trusted` when it carries valid credentials, and
/// lets it through either way.
pub async fn note_auth(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let trusted = Trusted(authenticate(&auth, &req, None).is_ok());
    req.extensions_mut().insert(trusted);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_the_scope_its_method_and_path_say() {
        use axum::http::Method;
        for (m, path, want) in [
            (Method::GET, "/v1/vms", Scope::VpsRead),
            (Method::GET, "/v1/vms/{id}/status/stream", Scope::VpsRead),
            (Method::GET, "/v1/node", Scope::VpsRead),
            (Method::POST, "/v1/vms", Scope::VpsWrite),
            (Method::POST, "/v1/vms/{id}/stop", Scope::VpsWrite),
            (
                Method::POST,
                "/v1/vms/{id}/snapshots/{name}/rollback",
                Scope::VpsWrite,
            ),
            (Method::DELETE, "/v1/vms/{id}", Scope::VpsDelete),
            (
                Method::DELETE,
                "/v1/vms/{id}/ips/{address}",
                Scope::VpsDelete,
            ),
            (Method::POST, "/v1/vms/{id}/console", Scope::Console),
            (Method::GET, "/metrics", Scope::Metrics),
        ] {
            assert_eq!(Scope::for_route(&m, path), want, "{m} {path}");
        }
        for s in crate::config::TOKEN_SCOPES {
            assert_eq!(Scope::parse(s).map(Scope::as_str), Some(*s));
        }
    }

    #[test]
    fn admin_holds_every_scope_and_others_only_their_own() {
        let cfg = |name: &str, scopes: &[&str]| crate::config::TokenConfig {
            name: name.into(),
            sha256: hash_token(name),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at: None,
            allowed_ips: Vec::new(),
        };
        let set = TokenSet::from_config(
            &[hash_token("legacy")],
            &[cfg("ops", &["admin"]), cfg("ro", &["vps:read"])],
        );
        let legacy = set.find("legacy").unwrap();
        let ops = set.find("ops").unwrap();
        let ro = set.find("ro").unwrap();
        for s in [
            Scope::VpsWrite,
            Scope::VpsDelete,
            Scope::Metrics,
            Scope::Console,
        ] {
            assert!(legacy.allows(s) && ops.allows(s), "{s:?}");
            assert!(!ro.allows(s), "{s:?}");
        }
        assert!(ro.allows(Scope::VpsRead));
        assert_eq!(ro.name, "ro");
        assert!(set.find("nobody").is_none());
    }

    #[test]
    fn tokens_are_checked_against_their_hashes() {
        let set = TokenSet::from_config(&[hash_token("alpha"), hash_token("beta")], &[]);

        assert!(set.find("alpha").is_some());
        assert!(set.find("beta").is_some());
        assert!(set.find("gamma").is_none());
        assert!(set.find("").is_none());
    }

    #[test]
    fn token_hashes_are_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_empty_token_set_accepts_nothing() {
        assert!(TokenSet::default().find("anything").is_none());
    }

    #[test]
    fn root_is_always_allowed_on_the_socket() {
        let policy = SocketPolicy::default();

        assert!(policy.allows(&UnixPeer { uid: 0, gid: 0 }));
        assert!(!policy.allows(&UnixPeer {
            uid: 1000,
            gid: 1000
        }));
    }
}
