//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(secret,
//! "{webhook-id}.{webhook-timestamp}.{body}")).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const WHSEC_PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the webhook secret is empty; set it to `whsec_` + base64 or to a long random string")]
    Empty,
    #[error("the webhook secret starts with `whsec_` but the rest is not valid base64: {0}")]
    BadBase64(base64::DecodeError),
}

/// Signs outgoing deliveries with the server's secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    /// `whsec_<base64>` is decoded as Standard Webhooks libraries do; any other
    /// string is used as raw key bytes.
    pub fn from_secret(secret: &str) -> Result<Self, SecretError> {
        Ok(Self {
            key: secret_key(secret)?,
        })
    }

    /// The value of the `webhook-signature` header.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        format!(
            "v1,{}",
            BASE64.encode(mac(&self.key, msg_id, timestamp, body))
        )
    }
}

fn secret_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let key = match secret.strip_prefix(WHSEC_PREFIX) {
        Some(b64) => BASE64.decode(b64).map_err(SecretError::BadBase64)?,
        None => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(key)
}

fn mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(msg_id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is {0} s away from now, more than the tolerance")]
    StaleTimestamp(i64),
    #[error("no v1 signature in webhook-signature matches the body")]
    NoMatch,
    #[error(transparent)]
    Secret(#[from] SecretErrorKind),
}

/// [`SecretError`] without its non-comparable payload, so [`VerifyError`] can
/// be compared in tests.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the webhook secret is unusable: {0}")]
pub struct SecretErrorKind(String);

/// Verifies a received delivery, as a receiver would: the timestamp must be
/// within `tolerance_s` of `now` (replay protection) and one of the
/// space-separated `v1,` signatures must match. Comparison is constant-time.
pub fn verify(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    signature_header: &str,
    now: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    let skew = now - timestamp;
    if skew.abs() > tolerance_s {
        return Err(VerifyError::StaleTimestamp(skew));
    }
    let key = secret_key(secret).map_err(|e| SecretErrorKind(e.to_string()))?;
    for candidate in signature_header.split_whitespace() {
        let Some(b64) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = BASE64.decode(b64) else {
            continue;
        };
        let mut m = HmacSha256::new_from_slice(&key).expect("HMAC accepts keys of any length");
        m.update(msg_id.as_bytes());
        m.update(b".");
        m.update(timestamp.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        if m.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification's test vectors.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let s = Signer::from_secret(SPEC_SECRET).unwrap();
        assert_eq!(s.sign(SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes()), SPEC_SIG);
    }

    #[test]
    fn verify_accepts_the_right_signature_among_several() {
        let header = format!("v1,bm9wZQ== {SPEC_SIG}");
        let r = verify(
            SPEC_SECRET,
            SPEC_ID,
            SPEC_TS,
            SPEC_BODY.as_bytes(),
            &header,
            SPEC_TS + 10,
            300,
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn verify_detects_tampering() {
        let v = |id: &str, ts: i64, body: &str, sig: &str| {
            verify(SPEC_SECRET, id, ts, body.as_bytes(), sig, SPEC_TS, 300)
        };
        assert_eq!(
            v(SPEC_ID, SPEC_TS, r#"{"test": 1}"#, SPEC_SIG),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            v("msg_other", SPEC_TS, SPEC_BODY, SPEC_SIG),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            v(SPEC_ID, SPEC_TS - 1, SPEC_BODY, SPEC_SIG),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            v(SPEC_ID, SPEC_TS, SPEC_BODY, "v2,abc"),
            Err(VerifyError::NoMatch)
        );
        let other = Signer::from_secret("whsec_b3RoZXJzZWNyZXQ=").unwrap();
        let forged = other.sign(SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes());
        assert_eq!(
            v(SPEC_ID, SPEC_TS, SPEC_BODY, &forged),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn verify_rejects_old_timestamps() {
        let r = verify(
            SPEC_SECRET,
            SPEC_ID,
            SPEC_TS,
            SPEC_BODY.as_bytes(),
            SPEC_SIG,
            SPEC_TS + 301,
            300,
        );
        assert_eq!(r, Err(VerifyError::StaleTimestamp(301)));
    }

    #[test]
    fn secrets_without_prefix_are_raw_bytes_and_bad_ones_are_refused() {
        let raw = Signer::from_secret("plain secret").unwrap();
        let sig = raw.sign("id", 1, b"x");
        assert!(verify("plain secret", "id", 1, b"x", &sig, 1, 5).is_ok());
        assert!(matches!(Signer::from_secret(""), Err(SecretError::Empty)));
        assert!(matches!(
            Signer::from_secret("whsec_"),
            Err(SecretError::Empty)
        ));
        assert!(matches!(
            Signer::from_secret("whsec_***"),
            Err(SecretError::BadBase64(_))
        ));
    }
}
