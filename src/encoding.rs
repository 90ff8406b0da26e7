//! Decoders for the text encodings the service reads from outside (percent escapes in URLs
//! and headers, hex in webhook signatures), on the field's crates: `percent-encoding` and
//! `base16ct` (constant time). Pure; owns no I/O.
//!
//! Strict means strict: a `%` must be followed by exactly two hex digits and a hex string is
//! made of hex digits only, so signs (`+`, `-`), spaces and other things a number parser lets
//! through are refused.

use std::borrow::Cow;

/// Whether every `%` in `text` starts an escape of two hex digits.
fn escapes_are_well_formed(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit))
    })
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
/// `+` is kept as it is (it means a space only in form bodies, see [`form_decode_lossy`]).
pub fn percent_decode_strict(text: &str) -> Option<String> {
    if !escapes_are_well_formed(text) {
        return None;
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

/// Decodes an `application/x-www-form-urlencoded` name or value for inspection: `+` as a
/// space, well-formed `%XX` escapes as their byte, anything malformed kept as it is, and
/// bytes that are not UTF-8 replaced.
pub fn form_decode_lossy(text: &str) -> String {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The longest hex string [`hex_decode`] reads, in characters (64 bytes decoded).
pub const MAX_HEX_CHARS: usize = 128;

/// Decodes hex (either case), in time independent of the digits; `None` unless `text` is an
/// even number of hex digits, at most [`MAX_HEX_CHARS`].
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() > MAX_HEX_CHARS {
        return None;
    }
    let mut out = [0u8; MAX_HEX_CHARS / 2];
    base16ct::mixed::decode(text, &mut out)
        .ok()
        .map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder written from the grammar alone, as the reference.
    fn reference_percent(text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut chars = text.bytes();
        while let Some(b) = chars.next() {
            if b == b'%' {
                let hi = char::from(chars.next()?).to_digit(16)?;
                let lo = char::from(chars.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            } else {
                out.push(b);
            }
        }
        Some(out)
    }

    fn reference_hex(text: &str) -> Option<Vec<u8>> {
        if !text.len().is_multiple_of(2) || text.len() > MAX_HEX_CHARS {
            return None;
        }
        let digits: Option<Vec<u32>> = text.chars().map(|c| c.to_digit(16)).collect();
        let digits = digits?;
        digits
            .chunks(2)
            .map(|pair| u8::try_from(pair[0] * 16 + pair[1]).ok())
            .collect()
    }

    #[test]
    fn a_sign_is_not_a_hex_digit() {
        assert_eq!(percent_decode_strict("a%+1b"), None);
        assert_eq!(percent_decode_strict("a%-1b"), None);
        assert_eq!(percent_decode_strict("%2"), None);
        assert_eq!(percent_decode_strict("%zz"), None);
        assert_eq!(percent_decode_strict("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode_strict("a+b").as_deref(), Some("a+b"));
        assert_eq!(percent_decode_strict("%ff"), None, "not UTF-8");
        assert_eq!(hex_decode("+f"), None);
        assert_eq!(hex_decode("0+ff"), None);
        assert_eq!(hex_decode(" f"), None);
        assert_eq!(hex_decode("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode(&"a".repeat(MAX_HEX_CHARS + 2)), None);
    }

    #[test]
    fn form_decoding_keeps_what_is_malformed() {
        assert_eq!(form_decode_lossy("pass%77ord"), "password");
        assert_eq!(form_decode_lossy("a+b"), "a b");
        assert_eq!(form_decode_lossy("%+1x%"), "% 1x%");
        assert_eq!(form_decode_lossy("%zz%4"), "%zz%4");
    }

    proptest::proptest! {
        /// Whatever the text, the decoders accept only what the grammar allows, and decode it
        /// to what the grammar says.
        #[test]
        fn arbitrary_text_never_decodes_to_what_a_strict_decoder_refuses(
            text in "([%+\\-0-9a-fA-Fg-z ]|\\PC){0,24}",
        ) {
            let expected = reference_percent(&text).and_then(|b| String::from_utf8(b).ok());
            proptest::prop_assert_eq!(percent_decode_strict(&text), expected);
            proptest::prop_assert_eq!(hex_decode(&text), reference_hex(&text));
        }

        /// What is encoded decodes back, in either case.
        #[test]
        fn encoded_bytes_decode_back(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64), upper: bool) {
            let hex: String = bytes.iter().map(|b| if upper { format!("{b:02X}") } else { format!("{b:02x}") }).collect();
            proptest::prop_assert_eq!(hex_decode(&hex), Some(bytes.clone()));
            if let Ok(text) = String::from_utf8(bytes.clone()) {
                let escaped: String = bytes.iter().map(|b| format!("%{b:02x}")).collect();
                proptest::prop_assert_eq!(percent_decode_strict(&escaped), Some(text.clone()));
                proptest::prop_assert_eq!(form_decode_lossy(&escaped), text);
            }
        }
    }
}
