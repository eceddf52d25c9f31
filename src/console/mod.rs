//! Consoles: tickets, the noVNC page and its files, and the WebSocket proxy to a VM's VNC
//! server (through libvirt's graphics fd, no TCP port) or serial console (a libvirt
//! stream).

pub mod proxy;
pub mod tickets;

use std::path::{Component, Path, PathBuf};

pub use tickets::{ConsoleKind, Grant, TicketError, Tickets};

const PAGE: &str = include_str!("page.html");

/// The console page for `ticket`, connecting to `websocket_url`. The ticket is 64 hex
/// characters (checked before this is called) and the URL is embedded as a JSON string
/// with `<` escaped, so neither can leave its place in the page.
pub fn page(ticket: &str, websocket_url: &str) -> String {
    let url = serde_json::to_string(websocket_url)
        .unwrap_or_else(|_| "\"\"".into())
        .replace('<', "\\u003c");
    PAGE.replace("__TICKET__", ticket)
        .replace("__WEBSOCKET_URL__", &url)
}

/// The file under `root` that `rel` names, refusing anything that could leave `root`.
pub fn asset_path(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

/// Content type by extension; browsers load ES modules only with a JavaScript type.
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "oga" | "ogg" => "audio/ogg",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_stay_inside_the_root() {
        let root = Path::new("/usr/share/novnc");
        assert_eq!(
            asset_path(root, "core/rfb.js"),
            Some(PathBuf::from("/usr/share/novnc/core/rfb.js"))
        );
        for bad in [
            "../etc/passwd",
            "core/../../x",
            "/etc/passwd",
            "",
            "./core/rfb.js",
        ] {
            assert_eq!(asset_path(root, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_page_embeds_the_url_as_a_string() {
        let p = page(
            &"a".repeat(64),
            "ws://h/v1/console/ws?ticket=</script><script>x",
        );
        assert!(p.contains(&format!("./{}/novnc/core/rfb.js", "a".repeat(64))));
        assert!(!p.contains("</script><script>x"));
        assert!(p.contains("\\u003c/script>"));
    }
}
