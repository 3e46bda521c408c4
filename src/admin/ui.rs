//! `GET /ui`: the operator console, one static page (`web/ops.html`: HTML, CSS and script in
//! one file, no framework, nothing fetched from elsewhere) compiled into the binary.
//!
//! The page itself holds no secret and needs no token to load; it asks the operator for the
//! admin token and calls the `/api/v1` endpoints with it like any other client. The
//! Content-Security-Policy lets the page talk to this origin only and run only its own
//! inline script and style (pinned by their SHA-256). This module must not grow into a web
//! server: one page, no paths from the request, nothing read from disk.

use axum::http::header;
use axum::response::IntoResponse;
use base64::Engine as _;
use std::sync::LazyLock;

const PAGE: &str = include_str!("../../web/ops.html");

/// The policy for [`PAGE`]: its own origin for requests, its one `<script>` and one `<style>`
/// by hash, nothing else (no plugins, no framing, no form posts elsewhere).
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'self'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        inline_hash(PAGE, "script"),
        inline_hash(PAGE, "style"),
    )
});

/// `'sha256-…'` of the text inside the page's first `<tag>…</tag>`, or `'none'` without one.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let inner = page
        .find(&open)
        .map(|start| &page[start + open.len()..])
        .and_then(|rest| rest.find(&close).map(|end| &rest[..end]));
    match inner {
        Some(text) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
        }
        None => "'none'".into(),
    }
}

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_pins_the_pages_own_script_and_style() {
        let page = "<style>a{}</style><script>x()</script>";
        let script = inline_hash(page, "script");
        assert_ne!(script, inline_hash("<script>y()</script>", "script"));
        assert!(script.starts_with("'sha256-") && script.ends_with('\''), "{script}");
        assert_eq!(inline_hash("no tags", "script"), "'none'");
        // The shipped page has exactly one of each, so the hash covers all of its code.
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}>")).count(), 1, "{tag}");
            assert_eq!(PAGE.matches(&format!("<{tag} ")).count(), 0, "{tag} with attributes");
        }
        assert!(CSP.contains("default-src 'self'") && !CSP.contains("unsafe"), "{}", *CSP);
    }
}
