//! NATS's auth callout, answered with Tally's API keys: one credential system for HTTP and
//! NATS.
//!
//! A client that is not one of Tally's services connects with an API key as its token.
//! nats-server sends Tally a signed authorization request (`$SYS.REQ.USER.AUTH`) holding
//! the token and a public key it made for this connection; Tally authenticates the key as
//! the HTTP API does and answers with a user JWT, signed by the callout key the server was
//! configured to trust, carrying the key role's permissions
//! ([`tally_core::access::for_key`]) for the key's customers. Refusals are answered too,
//! with the reason, so the server logs it.
//!
//! The user expires after [`ApiConfig::nats_session_secs`](crate::ApiConfig) (60 s at
//! most), or when the key does if sooner: the server then closes the connection, the
//! client reconnects and is asked about again, so a revoked or expired key loses NATS
//! within that bound.

use std::time::Duration;

use async_nats::Client;
use chrono::Utc;
use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use futures::StreamExt;
use nkeys::KeyPair;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tally_core::access::{AUTH_CALLOUT_SUBJECT, KeyAccess, Permissions, for_key};
use tokio_util::sync::CancellationToken;

use crate::keys::{ApiKeys, KeyRecord, Role};

/// The account the issued users belong to: the server's global account, where Tally's
/// streams live.
const ACCOUNT: &str = "$G";
const QUEUE: &str = "tally-auth";

/// What a key of `role` may do on NATS, if anything.
pub fn key_access(role: Role) -> Option<KeyAccess> {
    match role {
        Role::Ingest => Some(KeyAccess::Events),
        Role::Sdk => Some(KeyAccess::Application),
        Role::Notifications => Some(KeyAccess::Notifications),
        Role::Portal => Some(KeyAccess::Portal),
        Role::Admin | Role::Provisioning | Role::Billing | Role::Analyst => None,
    }
}

/// Answers the server's authorization requests until `cancel`.
pub struct Callout {
    keys: ApiKeys,
    issuer: KeyPair,
    session: Duration,
}

impl Callout {
    /// `issuer`: the key the server trusts for the callout (`callout.nk`); `session`: how
    /// long an issued user lasts at most.
    pub fn new(keys: ApiKeys, issuer: KeyPair, session: Duration) -> Callout {
        Callout {
            keys,
            issuer,
            session,
        }
    }

    /// Subscribes (the server has the subscription when this returns) and answers each
    /// request until `cancel`.
    pub async fn serve(
        self,
        client: Client,
        cancel: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::Error> {
        let mut requests = client
            .queue_subscribe(AUTH_CALLOUT_SUBJECT, QUEUE.to_owned())
            .await?;
        client.flush().await?;
        Ok(tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = requests.next() => r,
                };
                let Some(request) = request else { break };
                let Some(reply) = request.reply else { continue };
                if request
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get("Nats-Server-Xkey").is_some())
                {
                    tracing::error!(
                        "the server encrypts its auth callout requests (xkey); Tally's callout \
                         is configured without it: remove `xkey` from auth_callout"
                    );
                    continue;
                }
                match self.answer(&request.payload).await {
                    Some(response) => {
                        if let Err(e) = client.publish(reply, response.into()).await {
                            tracing::warn!(error = %e, "cannot answer an authorization request");
                        }
                    }
                    None => tracing::warn!("an unreadable authorization request was ignored"),
                }
            }
        }))
    }

    /// The signed response to one request; `None` when the request is not a valid one
    /// signed by a server.
    async fn answer(&self, payload: &[u8]) -> Option<String> {
        let request = Request::decode(payload)?;
        let decision = match request.token() {
            None => Err("no API key: connect with a Tally API key as the token".to_owned()),
            Some(token) => match self.keys.authenticate(token).await {
                Ok(Ok(record)) => self.user(&request, &record),
                Ok(Err(rejected)) => {
                    metrics::counter!(tally_core::metrics::AUTH_FAILURES,
                        "reason" => rejected.reason(), "transport" => "nats")
                    .increment(1);
                    Err(rejected.to_string())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the API keys for an authorization request");
                    Err("the API keys cannot be read now".to_owned())
                }
            },
        };
        let mut nats = json!({"type": "authorization_response", "version": 2});
        match decision {
            Ok(user) => nats["jwt"] = Value::String(user),
            Err(error) => {
                tracing::info!(client = %request.client, %error, "NATS connection refused");
                nats["error"] = Value::String(error);
            }
        }
        let claims = json!({
            "iat": request.server_now.unwrap_or(Utc::now().timestamp()),
            "iss": self.issuer.public_key(),
            "sub": request.user_nkey,
            "aud": request.server_id,
            "nats": nats,
        });
        encode(claims, &self.issuer)
    }

    /// The user JWT for a connection authenticated with `record`.
    fn user(&self, request: &Request, record: &KeyRecord) -> Result<String, String> {
        let access = key_access(record.role).ok_or_else(|| {
            format!(
                "a {} key has no NATS access; use an sdk, ingest, notifications or portal key",
                record.role
            )
        })?;
        let permissions = for_key(access, &record.id, &record.customers);
        let now = Utc::now();
        // The session, and the key's time left, counted from the server's clock. In whole
        // seconds rounded up: a JWT's times are whole seconds and the server's `iat` is
        // rounded down, so a key with 1.9 s left would otherwise get a user that has
        // expired before the server reads it.
        let mut left_ms = i64::try_from(self.session.as_millis()).unwrap_or(i64::MAX);
        if let Some(at) = record.expires_at {
            left_ms = left_ms.min((at - now).num_milliseconds());
        }
        let session = (left_ms.max(1) + 999) / 1000;
        let issued = request.server_now.unwrap_or(now.timestamp());
        let expires = issued + session;
        tracing::debug!(key = %record.id, role = %record.role, client = %request.client, "NATS connection authorized");
        let claims = json!({
            "iat": issued,
            "exp": expires,
            "iss": self.issuer.public_key(),
            "sub": request.user_nkey,
            "aud": ACCOUNT,
            "name": record.id,
            "nats": user_permissions(&permissions),
        });
        encode(claims, &self.issuer).ok_or_else(|| "cannot sign the user".to_owned())
    }
}

/// The `nats` part of a user JWT. An empty allow list would allow everything: it is a deny
/// of everything instead.
fn user_permissions(p: &Permissions) -> Value {
    let list = |subjects: &[String]| {
        if subjects.is_empty() {
            json!({"deny": [">"]})
        } else {
            json!({"allow": subjects})
        }
    };
    let mut nats = json!({
        "pub": list(&p.publish),
        "sub": list(&p.subscribe),
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    });
    if p.responses {
        nats["resp"] = json!({"max": 1, "ttl": 0});
    }
    nats
}

/// A JWT as NATS writes them: header, claims with `jti` the hash of the claims, and an
/// Ed25519 signature of both by `key`.
fn encode(mut claims: Value, key: &KeyPair) -> Option<String> {
    let body = serde_json::to_vec(&claims).ok()?;
    claims["jti"] = Value::String(BASE32_NOPAD.encode(&Sha256::digest(&body)));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).ok()?);
    let signed = format!("{header}.{body}");
    let signature = key.sign(signed.as_bytes()).ok()?;
    Some(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// What Tally reads of an authorization request.
struct Request {
    /// The server's clock when it asked (`iat`): the user's expiry is set by it, so a clock
    /// apart from Tally's neither shortens nor stretches the session.
    server_now: Option<i64>,
    server_id: String,
    user_nkey: String,
    token: Option<String>,
    password: Option<String>,
    /// For logs: the client's address and connection id.
    client: String,
}

impl Request {
    /// Reads a request JWT and checks that a server signed it.
    fn decode(payload: &[u8]) -> Option<Request> {
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            /// When the server made the request, by its clock.
            iat: Option<i64>,
            nats: Nats,
        }
        #[derive(Deserialize)]
        struct Nats {
            server_id: ServerId,
            user_nkey: String,
            #[serde(default)]
            connect_opts: ConnectOpts,
            #[serde(default)]
            client_info: ClientInfo,
        }
        #[derive(Deserialize)]
        struct ServerId {
            id: String,
        }
        #[derive(Deserialize, Default)]
        struct ConnectOpts {
            auth_token: Option<String>,
            pass: Option<String>,
        }
        #[derive(Deserialize, Default)]
        struct ClientInfo {
            host: Option<String>,
            id: Option<u64>,
        }
        let text = std::str::from_utf8(payload).ok()?.trim();
        let (signed, signature) = text.rsplit_once('.')?;
        let (_, body) = signed.split_once('.')?;
        let claims: Claims =
            serde_json::from_slice(&BASE64URL_NOPAD.decode(body.as_bytes()).ok()?).ok()?;
        if !claims.iss.starts_with('N') {
            return None;
        }
        let server = KeyPair::from_public_key(&claims.iss).ok()?;
        let signature = BASE64URL_NOPAD.decode(signature.as_bytes()).ok()?;
        server.verify(signed.as_bytes(), &signature).ok()?;
        let info = claims.nats.client_info;
        Some(Request {
            server_now: claims.iat,
            server_id: claims.nats.server_id.id,
            user_nkey: claims.nats.user_nkey,
            token: claims.nats.connect_opts.auth_token,
            password: claims.nats.connect_opts.pass,
            client: format!(
                "{} (cid {})",
                info.host.unwrap_or_default(),
                info.id.unwrap_or_default()
            ),
        })
    }

    /// The API key: the connection's token, or its password for clients that send a user
    /// and password only.
    fn token(&self) -> Option<&str> {
        self.token
            .as_deref()
            .or(self.password.as_deref())
            .filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_is_signed_by_the_issuer_and_names_its_hash() {
        let issuer = KeyPair::new_account();
        let jwt = encode(json!({"sub": "U", "nats": {"type": "user"}}), &issuer).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let signature = BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        let public = KeyPair::from_public_key(&issuer.public_key()).unwrap();
        assert!(public.verify(signed.as_bytes(), &signature).is_ok());
        let claims: Value =
            serde_json::from_slice(&BASE64URL_NOPAD.decode(parts[1].as_bytes()).unwrap()).unwrap();
        assert_eq!(claims["sub"], "U");
        assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 52));
    }

    #[test]
    fn empty_grants_deny_everything() {
        let p = Permissions {
            publish: Vec::new(),
            subscribe: vec!["tally.notify.*.acme".to_owned()],
            responses: false,
        };
        let nats = user_permissions(&p);
        assert_eq!(nats["pub"], json!({"deny": [">"]}));
        assert_eq!(nats["sub"], json!({"allow": ["tally.notify.*.acme"]}));
    }

    #[test]
    fn only_application_roles_reach_nats() {
        assert_eq!(key_access(Role::Sdk), Some(KeyAccess::Application));
        assert_eq!(key_access(Role::Admin), None);
        assert_eq!(key_access(Role::Billing), None);
    }
}
