//! The one place that decides what of a captured body or prompt may leave the host.
//!
//! Values of JSON fields (and form fields) named like secrets are replaced, whatever their
//! type; `Bearer`/`Basic` credentials inside any string are replaced too. Input may be cut
//! anywhere (captures are prefixes): a cut inside a secret value still yields the marker.

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Whether a field or header called `name` holds a secret: api keys, passwords, secrets,
/// credentials, cookies, authorization and anything ending in "token" (but not token
/// counts such as `max_tokens` or `prompt_tokens`).
pub fn is_secret_name(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const PARTS: [&str; 10] = [
        "password",
        "passwd",
        "secret",
        "apikey",
        "credential",
        "authorization",
        "cookie",
        "privatekey",
        "accesskey",
        "signature",
    ];
    PARTS.iter().any(|p| n.contains(p)) || n.ends_with("token") || n == "auth"
}

/// A body prefix made safe to export, or None when it is not text.
pub fn redact_body(body: &[u8]) -> Option<String> {
    let text = utf8_prefix(body)?;
    let trimmed = text.trim_start();
    let out = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        redact_json(text)
    } else if trimmed.starts_with("data:") || trimmed.starts_with("event:") {
        redact_sse(text)
    } else {
        redact_form(text)
    };
    Some(redact_inline(&out))
}

/// Text of a prefix whose last char may be cut; None for binary.
fn utf8_prefix(body: &[u8]) -> Option<&str> {
    match std::str::from_utf8(body) {
        Ok(s) => Some(s),
        Err(e) if body.len() - e.valid_up_to() < 4 && e.error_len().is_none() => {
            std::str::from_utf8(&body[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

fn redact_sse(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        match line.strip_prefix("data:") {
            Some(rest) => {
                out.push_str("data:");
                out.push_str(&redact_json(rest));
            }
            None => out.push_str(line),
        }
    }
    out
}

/// `a=b&c=d` pairs (also whatever text merely looks like them).
fn redact_form(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, pair) in text.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if is_secret_name(&percent_decode_lossy(k)) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out
}

fn percent_decode_lossy(s: &str) -> String {
    s.replace("%5F", "_").replace("%5f", "_").replace('+', " ")
}

/// JSON text (maybe cut) with the values of secret-named fields replaced.
pub fn redact_json(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let Some(end) = string_end(b, i) else {
            break;
        };
        // A string followed by `:` is a key.
        let mut j = end + 1;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < b.len() && b[j] == b':' && is_secret_name(&text[i + 1..end].replace('\\', "")) {
            j += 1;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            out.push_str(&text[copied..j]);
            out.push('"');
            out.push_str(REDACTED);
            out.push('"');
            match value_end(b, j) {
                Some(after) => {
                    i = after;
                    copied = after;
                }
                None => return out,
            }
        } else {
            i = end + 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Index of the closing quote of the string opening at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Index just past the JSON value starting at `start`; None if the text ends first.
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match b.get(start)? {
        b'"' => string_end(b, start).map(|e| e + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'"' => i = string_end(b, i)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = b[start..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())?;
            Some(start + len)
        }
    }
}

/// `Bearer x`, `Basic x` and `sk-...`-style keys inside free text.
pub fn redact_inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let hit = ["bearer ", "basic "]
            .iter()
            .filter_map(|p| lower.find(p).map(|i| (i, p.len())))
            .min();
        let Some((at, plen)) = hit else {
            out.push_str(rest);
            return out;
        };
        let cred_start = at + plen;
        let cred_len = rest[cred_start..]
            .bytes()
            .take_while(|c| c.is_ascii_alphanumeric() || b"-._~+/=:".contains(c))
            .count();
        out.push_str(&rest[..cred_start]);
        if cred_len > 0 {
            out.push_str(REDACTED);
        }
        rest = &rest[cred_start + cred_len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for s in [
            "api_key",
            "X-Api-Key",
            "openai_api_key",
            "password",
            "client_secret",
            "credentials",
            "access_token",
            "token",
            "Authorization",
            "Set-Cookie",
            "X-Inner-Api-Key",
            "Proxy-Authorization",
        ] {
            assert!(is_secret_name(s), "{s}");
        }
        for s in [
            "max_tokens",
            "prompt_tokens",
            "completion_tokens",
            "model",
            "key_words",
            "tokenizer",
        ] {
            assert!(!is_secret_name(s), "{s}");
        }
    }

    #[test]
    fn json_values_of_any_type() {
        let j = r#"{"a":1,"api_key":"sk-1","credentials":{"x":"y","n":[1,{"z":"}"}]},"password" : 12,"t":{"token":null},"ok":"Bearer abc.def"}"#;
        let r = redact_body(j.as_bytes()).unwrap();
        assert_eq!(
            r,
            r#"{"a":1,"api_key":"[REDACTED]","credentials":"[REDACTED]","password" : "[REDACTED]","t":{"token":"[REDACTED]"},"ok":"Bearer [REDACTED]"}"#
        );
        for s in ["sk-1", "\"y\"", "12", "abc.def"] {
            assert!(!r.contains(s), "{s} in {r}");
        }
    }

    #[test]
    fn cut_inside_a_secret() {
        let r = redact_json(r#"{"m":"x","credentials":{"openai_api_key":"sk-abcd"#);
        assert_eq!(r, r#"{"m":"x","credentials":"[REDACTED]""#);
        let r = redact_json(r#"{"m":"x","api_key":"sk-ab"#);
        assert_eq!(r, r#"{"m":"x","api_key":"[REDACTED]""#);
        // A cut key: nothing after it is known to be safe or not, and nothing follows.
        assert_eq!(redact_json(r#"{"m":"x","api_"#), r#"{"m":"x","api_"#);
    }

    #[test]
    fn escaped_quotes_do_not_hide_keys() {
        let r = redact_json(r#"{"s":"a\"b","secret":"v\"w","n":1}"#);
        assert_eq!(r, r#"{"s":"a\"b","secret":"[REDACTED]","n":1}"#);
    }

    #[test]
    fn sse_form_and_binary() {
        let r = redact_body(b"data: {\"token\":\"t1\"}\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(r, "data: {\"token\":\"[REDACTED]\"}\n\ndata: [DONE]\n\n");
        let r = redact_body(b"user=a&password=hunter2&api%5Fkey=k").unwrap();
        assert_eq!(r, "user=a&password=[REDACTED]&api%5Fkey=[REDACTED]");
        assert_eq!(redact_body(&[0xff, 0xfe, 0x00, 0x41]), None);
        // A multi-byte char cut at the end is dropped, not a reason to give up.
        assert_eq!(
            redact_body("é".as_bytes().get(..1).unwrap()),
            Some(String::new())
        );
    }
}
