//! Join tokens: what `trellis zone token create` prints and `zone join` reads.
//!
//! Text form:
//! `tj1:<trust domain>:<zone>:<edge 0|1>:<root sha256 hex>:<secret hex>:<addr>,<addr>`
//! for servers (`trellis zone join`), the same with `ta1:` for host agents,
//! so that neither kind of token can be spent on the other's door.
//! The store keeps only the SHA-256 of the secret, so a leaked data
//! directory or snapshot does not leak usable tokens.

use ring::rand::SecureRandom as _;

use crate::error::FedError;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Trust domain of the mesh.
    pub trust_domain: String,
    /// Zone the token admits a server to.
    pub zone: String,
    /// Whether the zone is an edge zone (its servers stay learners).
    pub edge: bool,
    /// SHA-256 of the root certificate (DER), hex.
    pub ca_fingerprint: String,
    /// 32 random bytes, hex. Never logged.
    pub secret: String,
    /// Servers to contact (host:port).
    pub servers: Vec<String>,
    /// Admits a host agent rather than a server.
    pub agent: bool,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("trust_domain", &self.trust_domain)
            .field("zone", &self.zone)
            .field("edge", &self.edge)
            .field("agent", &self.agent)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl JoinToken {
    /// A new token with a fresh random secret.
    pub fn generate(
        trust_domain: &str,
        zone: &str,
        edge: bool,
        ca_fingerprint: &str,
        servers: Vec<String>,
    ) -> Result<Self, FedError> {
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| FedError::Refused("the system random source failed".into()))?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            zone: zone.into(),
            edge,
            ca_fingerprint: ca_fingerprint.into(),
            secret: hex(&secret),
            servers,
            agent: false,
        })
    }

    /// The same token for a host agent.
    pub fn for_agent(mut self) -> Self {
        self.agent = true;
        self
    }

    /// What the store keeps: the hash of the secret.
    pub fn secret_hash(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }

    /// The text form.
    pub fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}:{}",
            if self.agent { "ta1" } else { "tj1" },
            self.trust_domain,
            self.zone,
            u8::from(self.edge),
            self.ca_fingerprint,
            self.secret,
            self.servers.join(",")
        )
    }

    /// Parses the text form, naming the part that is wrong.
    pub fn parse(s: &str) -> Result<Self, FedError> {
        let bad = |what: &str| FedError::Refused(format!("join token: {what}"));
        let all: Vec<&str> = s.trim().splitn(7, ':').collect();
        if all.len() != 7 || !matches!(all[0], "tj1" | "ta1") {
            return Err(bad(
                "not a Trellis join token (it starts with tj1: or ta1: and has 7 parts)",
            ));
        }
        let agent = all[0] == "ta1";
        let trust_domain = all[1].to_string();
        let parts = &all[1..];
        let hex64 = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(parts[3]) {
            return Err(bad("the CA fingerprint is not 64 hex digits"));
        }
        if !hex64(parts[4]) {
            return Err(bad("the secret is not 64 hex digits"));
        }
        let edge = match parts[2] {
            "0" => false,
            "1" => true,
            _ => return Err(bad("the edge flag is not 0 or 1")),
        };
        // The address list is the last part and may itself hold colons.
        let servers: Vec<String> = parts[5]
            .split(',')
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        if servers.is_empty() {
            return Err(bad("it names no server address"));
        }
        Ok(Self {
            trust_domain,
            zone: parts[1].into(),
            edge,
            ca_fingerprint: parts[3].into(),
            secret: parts[4].into(),
            servers,
            agent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let t = JoinToken::generate(
            "trellis.local",
            "west",
            true,
            &sha256_hex(b"root"),
            vec!["127.0.0.1:7400".into()],
        )
        .unwrap();
        let back = JoinToken::parse(&t.encode()).unwrap();
        assert_eq!(back, t);
        let a = t.clone().for_agent();
        assert!(a.encode().starts_with("ta1:"));
        assert_eq!(JoinToken::parse(&a.encode()).unwrap(), a);
        assert_ne!(t.secret_hash(), t.secret);
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug must not print the secret"
        );
        let err = JoinToken::parse("tj1:td:west:2:x:y:z")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fingerprint"), "{err}");
    }
}
