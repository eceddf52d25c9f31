//! Who may call: bearer tokens on TCP, peer credentials on the Unix socket.
//!
//! Tokens are configured as SHA-256 hashes. A presented token is hashed and compared with
//! every configured hash in constant time (no early exit), so timing reveals neither which
//! hash nor how much of it matched. On the Unix socket the kernel tells us the peer's uid
//! and gid (`SO_PEERCRED`); root and members of `api.socket_group` are let in.

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

/// Accepted token hashes, decoded once.
#[derive(Clone, Default)]
pub struct TokenSet {
    hashes: Vec<[u8; 32]>,
}

impl TokenSet {
    /// From hex SHA-256 strings (validated by the config loader; bad ones are skipped).
    pub fn from_hex(hashes: &[String]) -> TokenSet {
        TokenSet {
            hashes: hashes
                .iter()
                .filter_map(|h| hex::decode(h).ok()?.try_into().ok())
                .collect(),
        }
    }

    pub fn accepts(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0u8);
        for h in &self.hashes {
            found |= h.ct_eq(&presented);
        }
        bool::from(found)
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
            tokens: TokenSet::from_hex(&api.token_sha256),
            socket: SocketPolicy::from_group(&api.socket_group),
        }
    }
}

/// Who the request comes from, as far as the agent trusts it: `Ok` for an admitted socket
/// peer or a valid bearer token, else the refusal to answer with.
pub fn authenticate(auth: &Auth, req: &Request) -> Result<(), ApiError> {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<UnixPeer>>() {
        if auth.socket.allows(peer) {
            return Ok(());
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
    if !auth.tokens.accepts(token) {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "the token is not valid",
        ));
    }
    Ok(())
}

/// Whether a request on a public route was made by someone the agent trusts (who may then
/// see what strangers may not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted(pub bool);

pub async fn require_auth(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    match authenticate(&auth, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// On public routes: marks the request `Trusted` when it carries valid credentials, and
/// lets it through either way.
pub async fn note_auth(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let trusted = Trusted(authenticate(&auth, &req).is_ok());
    req.extensions_mut().insert(trusted);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_against_their_hashes() {
        let set = TokenSet::from_hex(&[hash_token("alpha"), hash_token("beta")]);

        assert!(set.accepts("alpha"));
        assert!(set.accepts("beta"));
        assert!(!set.accepts("gamma"));
        assert!(!set.accepts(""));
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
        assert!(!TokenSet::default().accepts("anything"));
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
