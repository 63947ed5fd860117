//! Which request paths carry Dify or model-API bodies worth reading.

/// A route whose bodies the inspector reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Dify api -> plugin daemon: `/plugin/{tenant}/dispatch/<kind>/<action>`.
    Dispatch {
        tenant: String,
        kind: String,
        action: String,
    },
    /// OpenAI-compatible `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI-compatible `/v1/completions`.
    Completions,
    /// OpenAI-compatible `/v1/embeddings`.
    Embeddings,
    /// Anthropic `/v1/messages`.
    AnthropicMessages,
    /// dify-sandbox `/v1/sandbox/run`.
    SandboxRun,
}

/// Longest path segment kept (tenant ids are UUIDs; kinds and actions are short words).
const MAX_SEGMENT: usize = 64;

/// The route of a request path (no query string), if it is one of interest.
pub fn route_of(path: &str) -> Option<Route> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if let Some(rest) = path.strip_prefix("/plugin/") {
        let mut parts = rest.split('/');
        let tenant = parts.next()?;
        if parts.next()? != "dispatch" {
            return None;
        }
        let kind = parts.next()?;
        let action = parts.next()?;
        let ok = |s: &str| !s.is_empty() && s.len() <= MAX_SEGMENT;
        if parts.next().is_some() || !ok(tenant) || !ok(kind) || !ok(action) {
            return None;
        }
        return Some(Route::Dispatch {
            tenant: tenant.to_string(),
            kind: kind.to_string(),
            action: action.to_string(),
        });
    }
    // Providers are often mounted under a prefix (`/openai/v1/...`, `/api/v1/...`).
    let ends = |suffix: &str| path.ends_with(suffix);
    if ends("/chat/completions") {
        Some(Route::ChatCompletions)
    } else if ends("/v1/completions") {
        Some(Route::Completions)
    } else if ends("/embeddings") {
        Some(Route::Embeddings)
    } else if ends("/v1/messages") {
        Some(Route::AnthropicMessages)
    } else if ends("/v1/sandbox/run") {
        Some(Route::SandboxRun)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route_of("/plugin/t-1/dispatch/llm/invoke"),
            Some(Route::Dispatch {
                tenant: "t-1".into(),
                kind: "llm".into(),
                action: "invoke".into()
            })
        );
        assert_eq!(route_of("/plugin/t-1/dispatch/llm"), None);
        assert_eq!(route_of("/plugin/t/management/list"), None);
        assert_eq!(
            route_of("/v1/chat/completions?x=1"),
            Some(Route::ChatCompletions)
        );
        assert_eq!(route_of("/openai/v1/embeddings"), Some(Route::Embeddings));
        assert_eq!(route_of("/v1/messages"), Some(Route::AnthropicMessages));
        assert_eq!(route_of("/v1/sandbox/run"), Some(Route::SandboxRun));
        assert_eq!(route_of("/console/api/apps"), None);
    }
}
