//! Credentials in URLs, hidden wherever a URL is shown: error messages, events, the state
//! row, logs and spans. A URL may carry a password in its userinfo (`http://user:pw@host/`)
//! or a token in its query (`?access_token=…`, `&X-Amz-Signature=…`); [`redact_urls`] puts
//! `***` in their place and leaves the rest of the text as it was, so the scheme, host, port
//! and path still say which source failed.
//!
//! Pure text in, text out: no parsing that could fail or normalise, so it works on a bare URL
//! as well as on a message that holds one or several.

use std::borrow::Cow;

/// What replaces a credential.
pub const MASK: &str = "***";

/// Parts of a query or fragment parameter name that mark it as a credential (matched on the
/// lower-cased, percent-decoded name, anywhere in it: `api_key`, `access_token`, `apiKey`,
/// `X-Amz-Signature`, `client_secret`, `passwd`).
const CREDENTIAL_NAMES: &[&str] = &[
    "token",
    "key",
    "secret",
    "passw",
    "pwd",
    "sig",
    "auth",
    "credential",
    "session",
];

/// `text` with the userinfo of every URL in it, and the value of every query or fragment
/// parameter whose name looks like a credential, replaced by [`MASK`]. Text without `://` is
/// returned as it is, without a copy.
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: the letters, digits, `+`, `-` and `.` before `://`.
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let after = at + 3;
        let end = rest[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .map_or(rest.len(), |i| after + i);
        out.push_str(&rest[..scheme_start]);
        if scheme_start == at {
            // `://` with no scheme before it: not a URL, but what follows may still be one.
            out.push_str("://");
            rest = &rest[after..];
            continue;
        }
        out.push_str(&rest[scheme_start..after]);
        redact_after_scheme(&rest[after..end], &mut out);
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// A URL's text, redacted ([`redact_urls`] on one URL), as an owned string.
pub fn redact_url(url: &str) -> String {
    redact_urls(url).into_owned()
}

/// Redacts what follows `scheme://` of one URL into `out`.
fn redact_after_scheme(url: &str, out: &mut String) {
    let authority_end = url.find(['/', '?', '#', '\\']).unwrap_or(url.len());
    let (authority, rest) = url.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            out.push_str(MASK);
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let (before_fragment, fragment) = match rest.find('#') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    match before_fragment.find('?') {
        Some(q) => {
            out.push_str(&before_fragment[..=q]);
            redact_params(&before_fragment[q + 1..], out);
        }
        None => out.push_str(before_fragment),
    }
    if let Some(fragment) = fragment {
        out.push('#');
        redact_params(fragment, out);
    }
}

/// Redacts the values of credential-named `name=value` pairs of a query or fragment.
fn redact_params(params: &str, out: &mut String) {
    for (i, pair) in params.split(['&', ';']).enumerate() {
        if i > 0 {
            // The separator that was there (`&` or `;`), one byte before this pair.
            let offset = pair.as_ptr() as usize - params.as_ptr() as usize - 1;
            out.push_str(&params[offset..=offset]);
        }
        match pair.split_once('=') {
            Some((name, _)) if is_credential_name(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(MASK);
            }
            _ => out.push_str(pair),
        }
    }
}

/// Whether a parameter name looks like a credential's.
pub fn is_credential_name(name: &str) -> bool {
    let decoded = crate::encoding::form_decode_lossy(name).to_ascii_lowercase();
    CREDENTIAL_NAMES.iter().any(|word| decoded.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn userinfo_and_credential_parameters_are_masked() {
        let cases = [
            (
                "GET http://u:hunter2@api.example:8080/items?page=2&token=abc answered 401",
                "GET http://***@api.example:8080/items?page=2&token=*** answered 401",
            ),
            (
                "https://api.example/x?API_KEY=1&access_token=2&sig=3&Signature=4&limit=5",
                "https://api.example/x?API_KEY=***&access_token=***&sig=***&Signature=***&limit=5",
            ),
            (
                "https://s3.example/b?X-Amz-Signature=ab&X-Amz-Credential=cd&x=1",
                "https://s3.example/b?X-Amz-Signature=***&X-Amz-Credential=***&x=1",
            ),
            (
                "https://idp.example/cb#access_token=abc&state=1",
                "https://idp.example/cb#access_token=***&state=1",
            ),
            (
                "http://host/p?apiKey=1;password=2",
                "http://host/p?apiKey=***;password=***",
            ),
            ("http://host/p?api%5Fkey=1", "http://host/p?api%5Fkey=***"),
            ("http://user@host/", "http://***@host/"),
            ("http://a:b@c@host/", "http://***@host/"),
            ("no url here", "no url here"),
            (
                "see <http://h/?token=t> and 'ftp://u:p@f/'",
                "see <http://h/?token=***> and 'ftp://***@f/'",
            ),
            ("://u:p@h", "://u:p@h"),
            ("http://host/path?plain", "http://host/path?plain"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_urls(input), want, "{input}");
        }
    }

    #[test]
    fn text_without_a_url_is_not_copied() {
        assert!(matches!(
            redact_urls("source failed: 401"),
            Cow::Borrowed(_)
        ));
    }

    proptest! {
        /// Whatever the URL's shape and the text around it, the password and the credential
        /// values never survive, and the host always does.
        #[test]
        fn no_credential_survives_any_url_shape(
            scheme in "(http|https|postgres|amqp)",
            user in "[a-z]{0,6}",
            password in "[A-Za-z0-9]{12,20}",
            host in "[a-z]{3,10}(\\.[a-z]{2,5}){0,2}",
            port in proptest::option::of(1u16..),
            path in "(/[a-z0-9._-]{0,8}){0,3}",
            name in "(api_|access_|x-amz-|client_|)(token|key|secret|password|sig|signature|Token|KEY)",
            others in proptest::collection::vec(("[a-z]{1,6}", "[a-z0-9]{0,6}"), 0..3),
            before in "[ a-zA-Z:]{0,10}",
            after in "( [a-z0-9 ]{0,10})?",
            in_fragment in any::<bool>(),
        ) {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let mut params: Vec<String> = others
                .iter()
                .filter(|(k, _)| !is_credential_name(k))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            params.push(format!("{name}={password}Q"));
            let sep = if in_fragment { "#" } else { "?" };
            let url = format!(
                "{scheme}://{user}:{password}@{host}{port}{path}{sep}{}",
                params.join("&")
            );
            let text = format!("{before} {url}{after}");
            let shown = redact_urls(&text);
            prop_assert!(!shown.contains(&password), "{shown}");
            let host_shown = format!("://***@{host}{port}");
            prop_assert!(shown.contains(&host_shown), "{shown}");
            for (k, v) in others.iter().filter(|(k, _)| !is_credential_name(k)) {
                let kept = format!("{k}={v}");
                prop_assert!(shown.contains(&kept), "{shown}");
            }
        }
    }
}
