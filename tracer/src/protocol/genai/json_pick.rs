//! Picks chosen values out of a JSON text fed in pieces, with fixed memory.
//!
//! Model and plugin bodies can be megabytes (prompts, base64 images, tool output), but the
//! facts a span needs (model, token counts, finish reasons, error codes) are a handful of
//! scalars at known paths, anywhere in the text. This scanner walks the text byte by byte,
//! keeps only the path it is at (bounded depth and key length) and the value it is picking,
//! and never stores anything else. Malformed text ends the scan; what was picked before stays.

/// Nesting deeper than this ends the scan.
pub const MAX_DEPTH: usize = 32;
/// Keys longer than this never match (their path is still tracked).
const MAX_KEY: usize = 64;

/// One wanted path: dot-separated keys, `*` for any element of an array, e.g.
/// `choices.*.finish_reason`.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub path: &'static str,
    /// Longest value kept (longer ones are cut at a char boundary and flagged).
    pub max_len: usize,
    /// Keep the raw JSON text of the value (any type) instead of a scalar.
    pub raw: bool,
}

/// A picked value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked {
    /// Index into the wanted list.
    pub want: usize,
    /// Strings unescaped; numbers and booleans as written; `raw` values as JSON text.
    pub value: String,
    pub is_string: bool,
    /// The value was longer than its `max_len`.
    pub cut: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (top level, after `:` or in an array).
    Value,
    /// A key or `}` right after `{`.
    FirstKey,
    /// A key after `,`.
    Key,
    Colon,
    /// `,` or the container's closing bracket.
    CommaOrClose,
    /// The top-level value ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Normal,
    /// Inside a string: key or value.
    Str {
        key: bool,
    },
    Escape {
        key: bool,
    },
    /// `\u` plus this many hex digits still to read.
    Unicode {
        key: bool,
        left: u8,
    },
    /// Inside a number or literal.
    Scalar,
}

#[derive(Debug, Clone)]
struct Frame {
    array: bool,
    /// The current key of an object (None when too long to ever match).
    key: Option<String>,
}

/// What is being kept of the value in progress.
#[derive(Debug, Clone)]
struct Capture {
    want: usize,
    value: Vec<u8>,
    is_string: bool,
    cut: bool,
    /// For raw captures: depth at which the value started.
    raw_depth: Option<usize>,
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct JsonPicker {
    wants: &'static [Want],
    stack: Vec<Frame>,
    expect: Expect,
    lex: Lex,
    key_buf: String,
    key_too_long: bool,
    unicode: u32,
    cap: Option<Capture>,
    dead: bool,
    started: bool,
}

impl JsonPicker {
    pub fn new(wants: &'static [Want]) -> Self {
        Self {
            wants,
            stack: Vec::new(),
            expect: Expect::Value,
            lex: Lex::Normal,
            key_buf: String::new(),
            key_too_long: false,
            unicode: 0,
            cap: None,
            dead: false,
            started: false,
        }
    }

    /// The text stopped being JSON, or nested too deep: nothing more will be picked.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// The top-level value ended.
    pub fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// Whether anything but whitespace was fed.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Bytes were lost: the position in the text is unknown, so picking stops.
    pub fn lose(&mut self) {
        self.dead = true;
        self.cap = None;
    }

    /// Feeds the next piece of text; picked values are pushed to `out` as they end.
    pub fn feed(&mut self, text: &[u8], out: &mut Vec<Picked>) {
        for &b in text {
            if self.dead {
                return;
            }
            self.byte(b, out);
        }
    }

    /// The text ended: a number at the very end is complete.
    pub fn finish(&mut self, out: &mut Vec<Picked>) {
        if !self.dead && self.lex == Lex::Scalar {
            self.end_scalar(false, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Picked>) {
        if let Some(c) = &mut self.cap
            && c.raw_depth.is_some()
        {
            push_raw(c, b, self.wants[c.want].max_len);
        }
        match self.lex {
            Lex::Str { key } => match b {
                b'"' => {
                    self.lex = Lex::Normal;
                    if key {
                        self.expect = Expect::Colon;
                    } else {
                        self.value_ended(out);
                    }
                }
                b'\\' => self.lex = Lex::Escape { key },
                _ => self.str_byte(key, b),
            },
            Lex::Escape { key } => {
                self.lex = Lex::Str { key };
                let c = match b {
                    b'n' => '\n',
                    b't' => '\t',
                    b'r' => '\r',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'u' => {
                        self.unicode = 0;
                        self.lex = Lex::Unicode { key, left: 4 };
                        return;
                    }
                    b'"' | b'\\' | b'/' => char::from(b),
                    _ => return self.die(),
                };
                self.str_char(key, c);
            }
            Lex::Unicode { key, left } => {
                let Some(d) = char::from(b).to_digit(16) else {
                    return self.die();
                };
                self.unicode = self.unicode * 16 + d;
                if left > 1 {
                    self.lex = Lex::Unicode {
                        key,
                        left: left - 1,
                    };
                } else {
                    self.lex = Lex::Str { key };
                    // Surrogate halves are not paired up: a replacement char is enough here.
                    let c = char::from_u32(self.unicode).unwrap_or('\u{fffd}');
                    self.str_char(key, c);
                }
            }
            Lex::Scalar => {
                if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-') {
                    if let Some(c) = &mut self.cap
                        && c.raw_depth.is_none()
                    {
                        push_char(c, char::from(b), self.wants[c.want].max_len);
                    }
                } else {
                    self.end_scalar(true, out);
                    self.byte_normal(b, out);
                }
            }
            Lex::Normal => self.byte_normal(b, out),
        }
    }

    fn byte_normal(&mut self, b: u8, out: &mut Vec<Picked>) {
        if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            return;
        }
        self.started = true;
        match self.expect {
            Expect::Value => self.value_start(b, out),
            Expect::FirstKey | Expect::Key => match b {
                b'"' => {
                    self.key_buf.clear();
                    self.key_too_long = false;
                    self.lex = Lex::Str { key: true };
                }
                b'}' if self.expect == Expect::FirstKey => self.close(false, out),
                _ => self.die(),
            },
            Expect::Colon => {
                if b != b':' {
                    return self.die();
                }
                let key = (!self.key_too_long).then(|| std::mem::take(&mut self.key_buf));
                if let Some(top) = self.stack.last_mut() {
                    top.key = key;
                }
                self.expect = Expect::Value;
            }
            Expect::CommaOrClose => {
                let array = self.stack.last().is_some_and(|f| f.array);
                match b {
                    b',' => {
                        self.expect = if array { Expect::Value } else { Expect::Key };
                    }
                    b']' if array => self.close(true, out),
                    b'}' if !array => self.close(false, out),
                    _ => self.die(),
                }
            }
            Expect::Done => {}
        }
    }

    fn value_start(&mut self, b: u8, out: &mut Vec<Picked>) {
        if self.cap.is_none()
            && let Some(want) = self.matching_want()
            // A scalar want meeting a container picks nothing from inside it.
            && (self.wants[want].raw || !matches!(b, b'{' | b'['))
        {
            let raw = self.wants[want].raw;
            self.cap = Some(Capture {
                want,
                value: Vec::new(),
                is_string: b == b'"' && !raw,
                cut: false,
                raw_depth: raw.then_some(self.stack.len()),
            });
            if let Some(c) = &mut self.cap
                && raw
            {
                push_raw(c, b, self.wants[want].max_len);
            }
        }
        match b {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return self.die();
                }
                self.stack.push(Frame {
                    array: b == b'[',
                    key: None,
                });
                self.expect = if b == b'[' {
                    Expect::Value
                } else {
                    Expect::FirstKey
                };
                // An empty array closes before any value.
            }
            b']' if self.stack.last().is_some_and(|f| f.array) => {
                // `[]`: the value we expected is not there.
                self.close(true, out);
            }
            b'"' => self.lex = Lex::Str { key: false },
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                if let Some(c) = &mut self.cap
                    && c.raw_depth.is_none()
                {
                    push_char(c, char::from(b), self.wants[c.want].max_len);
                }
                self.lex = Lex::Scalar;
            }
            _ => self.die(),
        }
    }

    fn close(&mut self, array: bool, out: &mut Vec<Picked>) {
        match self.stack.pop() {
            Some(f) if f.array == array => self.value_ended(out),
            _ => self.die(),
        }
    }

    /// `terminated`: the byte after the scalar was already fed (and copied into a raw value).
    fn end_scalar(&mut self, terminated: bool, out: &mut Vec<Picked>) {
        self.lex = Lex::Normal;
        if let Some(c) = &mut self.cap
            && terminated
            && !c.cut
            && c.raw_depth == Some(self.stack.len())
        {
            // A raw value that is itself a scalar does not include what ended it.
            c.value.pop();
        }
        if let Some(c) = &self.cap
            && c.raw_depth.is_none()
            && c.value == b"null"
        {
            self.cap = None;
        }
        self.value_ended(out);
    }

    /// A value (scalar, string or container) just ended at the current depth.
    fn value_ended(&mut self, out: &mut Vec<Picked>) {
        let finished = match &self.cap {
            Some(c) => match c.raw_depth {
                Some(d) => d == self.stack.len(),
                None => true,
            },
            None => false,
        };
        if finished && let Some(c) = self.cap.take() {
            out.push(Picked {
                want: c.want,
                value: into_text(c.value),
                is_string: c.is_string,
                cut: c.cut,
            });
        }
        self.expect = if self.stack.is_empty() {
            Expect::Done
        } else {
            Expect::CommaOrClose
        };
    }

    fn str_byte(&mut self, key: bool, b: u8) {
        if key {
            if self.key_buf.len() >= MAX_KEY {
                self.key_too_long = true;
            } else {
                // Keys of interest are ASCII; other bytes only need to not match.
                self.key_buf.push(char::from(b));
            }
        } else if let Some(c) = &mut self.cap
            && c.raw_depth.is_none()
        {
            push_byte(c, b, self.wants[c.want].max_len);
        }
    }

    fn str_char(&mut self, key: bool, ch: char) {
        if key {
            if self.key_buf.len() >= MAX_KEY {
                self.key_too_long = true;
            } else {
                self.key_buf.push(ch);
            }
        } else if let Some(c) = &mut self.cap
            && c.raw_depth.is_none()
        {
            push_char(c, ch, self.wants[c.want].max_len);
        }
    }

    fn matching_want(&self) -> Option<usize> {
        self.wants
            .iter()
            .position(|w| path_matches(w.path, &self.stack))
    }

    fn die(&mut self) {
        self.dead = true;
        self.cap = None;
    }
}

fn path_matches(pattern: &str, stack: &[Frame]) -> bool {
    let mut segs = pattern.split('.');
    for frame in stack {
        let Some(seg) = segs.next() else {
            return false;
        };
        let ok = if frame.array {
            seg == "*"
        } else {
            frame.key.as_deref() == Some(seg)
        };
        if !ok {
            return false;
        }
    }
    segs.next().is_none()
}

fn push_char(c: &mut Capture, ch: char, max: usize) {
    let mut buf = [0u8; 4];
    let enc = ch.encode_utf8(&mut buf).as_bytes();
    if c.value.len() + enc.len() > max {
        c.cut = true;
    } else {
        c.value.extend_from_slice(enc);
    }
}

/// String bytes arrive one at a time; multi-byte UTF-8 is rebuilt when the value ends.
fn push_byte(c: &mut Capture, b: u8, max: usize) {
    if c.value.len() >= max {
        c.cut = true;
    } else {
        c.value.push(b);
    }
}

fn push_raw(c: &mut Capture, b: u8, max: usize) {
    push_byte(c, b, max);
}

/// Text of a captured value; a multi-byte char cut by the length limit is dropped.
fn into_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            if bytes.len() - valid < 4 && std::str::from_utf8(&bytes[valid..]).is_err() {
                bytes.truncate(valid);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}
