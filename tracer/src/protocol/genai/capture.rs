//! What the user allowed to leave the host besides metadata: `--capture-bodies[=N]` and
//! `--capture-genai-content`. Set once at start-up, read by every parser; default off.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Largest body prefix `--capture-bodies` may ask for.
pub const MAX_BODY_CAPTURE: usize = 64 * 1024;
/// Body prefix captured by a bare `--capture-bodies`.
pub const DEFAULT_BODY_CAPTURE: usize = 4096;

static BODY_BYTES: AtomicUsize = AtomicUsize::new(0);
static CONTENT: AtomicBool = AtomicBool::new(false);

/// Sets the body prefix to export (0: none, capped at [`MAX_BODY_CAPTURE`]) and whether
/// prompts and completions are exported.
pub fn configure(body_bytes: usize, content: bool) {
    BODY_BYTES.store(body_bytes.min(MAX_BODY_CAPTURE), Ordering::Relaxed);
    CONTENT.store(content, Ordering::Relaxed);
}

/// Bytes of each body to export (0: bodies are not exported).
pub fn body_bytes() -> usize {
    BODY_BYTES.load(Ordering::Relaxed)
}

/// Whether prompts and completions are exported.
pub fn content() -> bool {
    CONTENT.load(Ordering::Relaxed)
}
