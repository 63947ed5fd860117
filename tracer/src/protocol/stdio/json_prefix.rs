//! Reads chosen scalar fields out of the start of a JSON object that may be cut off anywhere.
//!
//! Plugin lines are often larger than what the kernel side copies (a tool's output, model
//! credentials), but the fields that name an event come first in both the daemon's and the
//! SDK's serialisation. A full JSON parser would reject the cut-off text; this one keeps what
//! it read before the end. It never panics, never recurses deeper than MAX_DEPTH, and keeps at
//! most MAX_VALUE bytes of a value.

/// Nesting deeper than this ends the scan (the fields of interest are at depth <= 3).
const MAX_DEPTH: usize = 32;
/// Longest value kept; longer ones are cut at a char boundary.
pub const MAX_VALUE: usize = 512;

/// What a scan found: one slot per wanted path, in the caller's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub values: Vec<Option<String>>,
    /// The top-level object was read to its closing brace.
    pub complete: bool,
    /// The text stopped being JSON before it ended (not merely cut off).
    pub invalid: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The input ended: keep what was found.
    End,
    /// Not JSON (or nested too deep).
    Invalid,
}

struct Scanner<'a, 'w> {
    b: &'a [u8],
    i: usize,
    wanted: &'w [&'w str],
    path: Vec<String>,
    values: Vec<Option<String>>,
}

/// Scans `text` (the start of a JSON object) for the dotted `wanted` paths, e.g.
/// `"data.action"`. Values of strings are unescaped; numbers and booleans are kept as
/// written; null is absent. Paths through arrays never match.
pub fn scan(text: &[u8], wanted: &[&str]) -> Scan {
    let mut s = Scanner {
        b: text,
        i: 0,
        wanted,
        path: Vec::new(),
        values: vec![None; wanted.len()],
    };
    s.skip_ws();
    let result = match s.peek() {
        Some(b'{') => s.object(0),
        Some(_) => Err(Stop::Invalid),
        None => Err(Stop::End),
    };
    Scan {
        values: s.values,
        complete: result.is_ok(),
        invalid: result == Err(Stop::Invalid),
    }
}

impl Scanner<'_, '_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Result<u8, Stop> {
        let c = self.peek().ok_or(Stop::End)?;
        self.i += 1;
        Ok(c)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), Stop> {
        self.skip_ws();
        match self.next()? {
            c if c == want => Ok(()),
            _ => Err(Stop::Invalid),
        }
    }

    /// Index of the wanted path equal to the current path, if any.
    fn wanted_here(&self) -> Option<usize> {
        if self.path.is_empty() {
            return None;
        }
        self.wanted.iter().position(|w| {
            let mut parts = w.split('.');
            self.path.iter().all(|p| parts.next() == Some(p.as_str())) && parts.next().is_none()
        })
    }

    /// Whether some wanted path starts with the current path (worth decoding keys below).
    fn wanted_below(&self) -> bool {
        self.wanted.iter().any(|w| {
            let mut parts = w.split('.');
            self.path.iter().all(|p| parts.next() == Some(p.as_str()))
        })
    }

    fn object(&mut self, depth: usize) -> Result<(), Stop> {
        if depth >= MAX_DEPTH {
            return Err(Stop::Invalid);
        }
        self.expect(b'{')?;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let decode_keys = self.wanted_below();
        loop {
            self.skip_ws();
            if self.next()? != b'"' {
                return Err(Stop::Invalid);
            }
            let key = if decode_keys {
                Some(self.string_body(MAX_VALUE)?)
            } else {
                self.skip_string_body()?;
                None
            };
            self.expect(b':')?;
            // An unmatched key still takes a level, so deeper paths cannot match by accident.
            self.path.push(key.unwrap_or_else(|| "\u{0}".into()));
            let result = self.value(depth + 1);
            self.path.pop();
            result?;
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b'}' => return Ok(()),
                _ => return Err(Stop::Invalid),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), Stop> {
        if depth >= MAX_DEPTH {
            return Err(Stop::Invalid);
        }
        self.expect(b'[')?;
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.path.push("\u{0}[]".into());
            let result = self.value(depth + 1);
            self.path.pop();
            result?;
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b']' => return Ok(()),
                _ => return Err(Stop::Invalid),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), Stop> {
        self.skip_ws();
        let slot = self.wanted_here();
        match self.peek().ok_or(Stop::End)? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => {
                self.i += 1;
                match slot {
                    // The first occurrence of a duplicated key wins: what a cut-off line
                    // shows must not change once more of it is seen.
                    Some(slot) if self.values[slot].is_none() => {
                        let text = self.string_body(MAX_VALUE)?;
                        self.values[slot] = Some(text);
                    }
                    _ => self.skip_string_body()?,
                }
                Ok(())
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'E')
                ) {
                    self.i += 1;
                }
                if self.peek().is_none() {
                    // A number cut off by the end of the capture may be incomplete.
                    return Err(Stop::End);
                }
                let literal = &self.b[start..self.i];
                let valid = matches!(literal, b"true" | b"false" | b"null")
                    || literal
                        .first()
                        .is_some_and(|c| *c == b'-' || c.is_ascii_digit());
                if !valid {
                    return Err(Stop::Invalid);
                }
                // null reads as absent, so it cannot be told from the string "null".
                if let Some(slot) = slot
                    && literal != b"null"
                    && self.values[slot].is_none()
                {
                    self.values[slot] = Some(String::from_utf8_lossy(literal).into_owned());
                }
                Ok(())
            }
            _ => Err(Stop::Invalid),
        }
    }

    /// Skips the rest of a string whose opening quote was read.
    fn skip_string_body(&mut self) -> Result<(), Stop> {
        loop {
            match self.next()? {
                b'"' => return Ok(()),
                b'\\' => {
                    self.next()?;
                }
                _ => {}
            }
        }
    }

    /// Reads the rest of a string whose opening quote was read, unescaped, keeping at most
    /// `keep` bytes. A string cut off by the end of the input is not returned: its value would
    /// be wrong.
    fn string_body(&mut self, keep: usize) -> Result<String, Stop> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.next()?;
            let decoded: Option<char> = match c {
                b'"' => break,
                b'\\' => match self.next()? {
                    b'n' => Some('\n'),
                    b't' => Some('\t'),
                    b'r' => Some('\r'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'u' => Some(self.unicode_escape()?),
                    other => Some(char::from(other)),
                },
                _ => {
                    if out.len() < keep {
                        out.push(c);
                    }
                    None
                }
            };
            if let Some(ch) = decoded
                && out.len() < keep
            {
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
        }
        let mut text = String::from_utf8_lossy(&out).into_owned();
        if text.len() > keep {
            let mut cut = keep;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Ok(text)
    }

    fn hex4(&mut self) -> Result<u32, Stop> {
        let mut v = 0u32;
        for _ in 0..4 {
            let c = self.next()?;
            let d = (c as char).to_digit(16).ok_or(Stop::Invalid)?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, Stop> {
        let first = self.hex4()?;
        if (0xd800..0xdc00).contains(&first) {
            // A high surrogate: a low one should follow as another \u escape.
            if self.peek() == Some(b'\\') && self.b.get(self.i + 1) == Some(&b'u') {
                self.i += 2;
                let second = self.hex4()?;
                if (0xdc00..0xe000).contains(&second) {
                    let code = 0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00);
                    return Ok(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
            }
            return Ok('\u{fffd}');
        }
        Ok(char::from_u32(first).unwrap_or('\u{fffd}'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: [&str; 4] = ["event", "session_id", "data.type", "data.data.message"];

    fn get(scan: &Scan, i: usize) -> Option<&str> {
        scan.values[i].as_deref()
    }

    #[test]
    fn reads_nested_fields_and_unescapes() {
        let line = br#"{"event": "session", "session_id": "s-1", "data": {"type": "error", "data": {"error_type": "X", "message": "bad \"thing\" \u00e9\ud83d\ude00", "args": {}}}}"#;
        let s = scan(line, &WANTED);
        assert!(s.complete && !s.invalid);
        assert_eq!(get(&s, 0), Some("session"));
        assert_eq!(get(&s, 1), Some("s-1"));
        assert_eq!(get(&s, 2), Some("error"));
        assert_eq!(get(&s, 3), Some("bad \"thing\" é😀"));
    }

    #[test]
    fn keeps_what_came_before_a_cut_and_drops_a_cut_value() {
        let line = br#"{"session_id":"abc","event":"request","data":{"type":"tool","credentials":{"k":"vvvv"#;
        let s = scan(line, &WANTED);
        assert!(!s.complete && !s.invalid);
        assert_eq!(get(&s, 0), Some("request"));
        assert_eq!(get(&s, 1), Some("abc"));
        assert_eq!(get(&s, 2), Some("tool"));
        // Cut inside the value itself: not returned.
        let s = scan(br#"{"event":"sess"#, &WANTED);
        assert_eq!(get(&s, 0), None);
    }

    #[test]
    fn paths_do_not_match_through_arrays_or_other_keys() {
        let line = br#"{"x":{"event":"no"},"data":[{"type":"no"}],"event":1.5e3}"#;
        let s = scan(line, &WANTED);
        assert_eq!(get(&s, 0), Some("1.5e3"));
        assert_eq!(get(&s, 2), None);
    }

    #[test]
    fn a_duplicated_key_keeps_its_first_value() {
        // Found by the fuzzer: the whole line and a cut of it must agree.
        let line = br#"{"event":"request","session_id":"s","event":"backwards_response"}"#;
        assert_eq!(get(&scan(line, &WANTED), 0), Some("request"));
        assert_eq!(get(&scan(&line[..30], &WANTED), 0), Some("request"));
    }

    #[test]
    fn not_json_is_invalid() {
        for text in [
            &b"hello"[..],
            b"[1,2]",
            b"{\"a\" 1}",
            b"{\"a\":tru}",
            b"{\"a\":1 x",
        ] {
            let s = scan(text, &WANTED);
            assert!(s.invalid, "{:?}", String::from_utf8_lossy(text));
        }
        assert!(!scan(b"", &WANTED).invalid);
    }

    #[test]
    fn deep_nesting_stops_without_overflowing() {
        let mut text = Vec::new();
        text.extend_from_slice(b"{\"a\":");
        text.extend(std::iter::repeat_n(b'[', 100_000));
        let s = scan(&text, &WANTED);
        assert!(s.invalid);
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let mut text = b"{\"event\":\"".to_vec();
        text.extend(std::iter::repeat_n("é".as_bytes(), 400).flatten());
        text.extend_from_slice(b"\"}");
        let s = scan(&text, &WANTED);
        let v = get(&s, 0).expect("value");
        assert!(v.len() <= MAX_VALUE && v.chars().all(|c| c == 'é'));
    }
}
