//! [`SecretString`]: the only type that holds a secret's plaintext. It redacts itself
//! everywhere it could be printed or serialized and wipes its buffer when dropped.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::{Error, MAX_SECRET_BYTES};

/// What every formatting and serialization of a [`SecretString`] shows.
pub const REDACTED: &str = "[redacted]";

/// A secret value in plaintext: at most [`MAX_SECRET_BYTES`], shown as `[redacted]` by
/// `Debug`, `Display` and `serde::Serialize`, zeroized on drop (its whole allocation).
/// [`SecretString::expose`] is the only way to the value; call it where the value is used,
/// never to log or format it.
#[derive(Clone)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `value` (the buffer moves in, no copy is left behind).
    ///
    /// # Errors
    /// [`Error::TooLarge`] over [`MAX_SECRET_BYTES`]; `value` is wiped before returning.
    pub fn new(value: String) -> Result<Self, Error> {
        let value = Zeroizing::new(value);
        if value.len() > MAX_SECRET_BYTES {
            return Err(Error::TooLarge {
                bytes: value.len(),
                limit: MAX_SECRET_BYTES,
            });
        }
        Ok(Self(value))
    }

    /// From decrypted bytes; `None` (and the bytes wiped) when they are not UTF-8.
    pub(crate) fn from_utf8(bytes: Zeroizing<Vec<u8>>) -> Option<Self> {
        let mut bytes = bytes;
        // Moves the buffer out without copying; the empty Vec left behind is harmless.
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(s) => Some(Self(Zeroizing::new(s))),
            Err(e) => {
                e.into_bytes().zeroize();
                None
            }
        }
    }

    /// The plaintext. The only way in: keep the borrow short and never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes (not secret: the ciphertext reveals it too).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<String> for SecretString {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Error> {
        Self::new(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "canary-7d1f0e2b-plaintext";

    #[test]
    fn debug_display_and_serde_never_show_the_value() {
        let secret = SecretString::new(CANARY.to_owned()).unwrap();
        let wrapped = Some(vec![secret.clone()]);
        let outputs = [
            format!("{secret:?}"),
            format!("{secret:#?}"),
            format!("{secret}"),
            format!("{wrapped:?}"),
            serde_json::to_string(&secret).unwrap(),
            serde_json::to_string(&wrapped).unwrap(),
        ];
        for out in &outputs {
            assert!(!out.contains(CANARY), "leaked in {out}");
            assert!(out.contains(REDACTED), "not redacted: {out}");
        }
        assert_eq!(secret.expose(), CANARY);
    }

    #[test]
    fn a_value_over_64_kib_is_refused() {
        let err = SecretString::new("x".repeat(MAX_SECRET_BYTES + 1)).unwrap_err();
        assert!(matches!(
            err,
            Error::TooLarge { bytes, limit } if bytes == MAX_SECRET_BYTES + 1 && limit == MAX_SECRET_BYTES
        ));
        assert!(SecretString::new("x".repeat(MAX_SECRET_BYTES)).is_ok());
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused() {
        assert!(SecretString::from_utf8(Zeroizing::new(vec![0xff, 0xfe])).is_none());
        let ok = SecretString::from_utf8(Zeroizing::new(b"abc".to_vec())).unwrap();
        assert_eq!(ok.expose(), "abc");
    }
}
