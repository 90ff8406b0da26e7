//! Opaque page tokens: the keyset position of the last row served, bound by a keyed MAC to
//! the filters it was served under. A token is refused with other filters, and one not made
//! by a registry of this database (its key is in `dsreg_page_key`, shared by every instance)
//! is refused outright; even a forged one could only move the position, never widen what the
//! caller may see (the tenant scope is applied to every query, not carried in the token).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;
use tonic::Status;
use zeroize::Zeroizing;

use super::status::invalid;

/// The longest token accepted.
const MAX_TOKEN: usize = 1024;
/// Bytes of MAC a token carries.
const MAC_BYTES: usize = 16;

/// The key page tokens are signed with.
#[derive(Clone)]
pub struct PageKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(..)")
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Token<P> {
    p: P,
    m: String,
}

impl PageKey {
    /// A key of these bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The database's key (created by migration V12).
    ///
    /// # Errors
    /// The query failed.
    pub async fn load(
        client: &impl crate::db::repository::GenericClient,
    ) -> Result<Self, crate::db::Error> {
        let row = client
            .query_typed_one("SELECT key FROM dsreg_page_key", &[])
            .await?;
        Ok(Self::new(row.get(0)))
    }

    /// The MAC of a position (as JSON) under `filters` (any stable rendering of them, the
    /// caller included).
    fn mac(&self, position: &[u8], filters: &str) -> String {
        // HMAC takes keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key");
        mac.update(&(filters.len() as u64).to_be_bytes());
        mac.update(filters.as_bytes());
        mac.update(position);
        let tag = mac.finalize().into_bytes();
        URL_SAFE_NO_PAD.encode(&tag[..MAC_BYTES])
    }

    /// Encodes `position` for the listing of `filters`.
    pub fn encode<P: Serialize>(&self, position: &P, filters: &str) -> String {
        // Serialising plain data to JSON cannot fail.
        let p = serde_json::to_value(position).unwrap_or_default();
        let m = self.mac(p.to_string().as_bytes(), filters);
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Token { p, m }).unwrap_or_default())
    }

    /// Decodes a token (`None` for the first page).
    ///
    /// # Errors
    /// INVALID_ARGUMENT on `page_token` when malformed, forged, or issued for other filters
    /// or another caller.
    pub fn decode<P: DeserializeOwned>(
        &self,
        token: &str,
        filters: &str,
    ) -> Result<Option<P>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || {
            invalid(
                "page_token",
                "is not a page token of this listing (or was issued for other filters); start \
                 again without it",
            )
        };
        if token.len() > MAX_TOKEN {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let decoded: Token<serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let expected = self.mac(decoded.p.to_string().as_bytes(), filters);
        // Compared in constant time: the MAC must not be guessable byte by byte.
        let same = expected.len() == decoded.m.len()
            && expected
                .bytes()
                .zip(decoded.m.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(bad());
        }
        serde_json::from_value(decoded.p)
            .map(Some)
            .map_err(|_| bad())
    }
}

/// A page size: 0 means `default`, at most `max`.
///
/// # Errors
/// INVALID_ARGUMENT on `page_size` when negative or over `max`.
pub fn size(value: i32, default: i64, max: i64) -> Result<i64, Status> {
    match i64::from(value) {
        0 => Ok(default),
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(invalid("page_size", format!("is {n}; use 1 to {max}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_filters_forgeries_and_garbage() {
        let key = PageKey::new(vec![7; 32]);
        let f = "org=acme|alice";
        let t = key.encode(&("orders".to_owned(), 7_i64), f);
        assert_eq!(
            key.decode::<(String, i64)>(&t, f).unwrap(),
            Some(("orders".to_owned(), 7))
        );
        assert!(key.decode::<(String, i64)>(&t, "org=other|alice").is_err());
        // Another key (another database) does not accept it.
        assert!(
            PageKey::new(vec![8; 32])
                .decode::<(String, i64)>(&t, f)
                .is_err()
        );
        // A position rewritten without the key is refused.
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"p": ["zzz", 1], "m": "AAAAAAAAAAAAAAAAAAAAAA"}).to_string(),
        );
        assert!(key.decode::<(String, i64)>(&forged, f).is_err());
        assert!(key.decode::<(String, i64)>("!!!", f).is_err());
        assert!(key.decode::<(String, i64)>(&"A".repeat(5000), f).is_err());
        assert_eq!(key.decode::<(String, i64)>("", f).unwrap(), None);
    }

    #[test]
    fn page_sizes_default_and_bound() {
        assert_eq!(size(0, 100, 1000).unwrap(), 100);
        assert_eq!(size(5, 100, 1000).unwrap(), 5);
        assert!(size(-1, 100, 1000).is_err());
        assert!(size(1001, 100, 1000).is_err());
    }
}
