//! Opaque page tokens: the keyset position of the last row served and a fingerprint of the
//! filters it was served under. A token is refused with other filters; a forged one can only
//! move the position, never widen what the caller may see (the tenant scope is applied to
//! every query, not carried in the token).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tonic::Status;

use super::status::invalid;

/// The longest token accepted.
const MAX_TOKEN: usize = 1024;

/// A fingerprint of `filters` (any stable rendering of them).
pub fn fingerprint(filters: &str) -> String {
    let digest = Sha256::digest(filters.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Token<P> {
    p: P,
    f: String,
}

/// Encodes `position` under the filters' fingerprint.
pub fn encode<P: Serialize>(position: &P, fingerprint: &str) -> String {
    let token = Token {
        p: position,
        f: fingerprint.to_owned(),
    };
    // Serialising plain data to JSON cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

/// Decodes a token (`None` for the first page).
///
/// # Errors
/// INVALID_ARGUMENT on `page_token` when malformed or issued under other filters.
pub fn decode<P: DeserializeOwned>(token: &str, fingerprint: &str) -> Result<Option<P>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token", "is not a page token of this listing");
    if token.len() > MAX_TOKEN {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let decoded: Token<P> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if decoded.f != fingerprint {
        return Err(invalid(
            "page_token",
            "was issued for other filters; start again without it",
        ));
    }
    Ok(Some(decoded.p))
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
    fn tokens_round_trip_and_refuse_other_filters_and_garbage() {
        let f = fingerprint("org=acme");
        let t = encode(&("orders".to_owned(), 7_i64), &f);
        assert_eq!(
            decode::<(String, i64)>(&t, &f).unwrap(),
            Some(("orders".to_owned(), 7))
        );
        assert!(decode::<(String, i64)>(&t, &fingerprint("org=other")).is_err());
        assert!(decode::<(String, i64)>("!!!", &f).is_err());
        assert!(decode::<(String, i64)>(&"A".repeat(5000), &f).is_err());
        assert_eq!(decode::<(String, i64)>("", &f).unwrap(), None);
    }

    #[test]
    fn page_sizes_default_and_bound() {
        assert_eq!(size(0, 100, 1000).unwrap(), 100);
        assert_eq!(size(5, 100, 1000).unwrap(), 5);
        assert!(size(-1, 100, 1000).is_err());
        assert!(size(1001, 100, 1000).is_err());
    }
}
