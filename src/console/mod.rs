//! Consoles: tickets, the noVNC page and its files, and the WebSocket proxy to a VM's VNC
//! server (through libvirt's graphics fd, no TCP port) or serial console (a libvirt
//! stream).

pub mod backend;
pub mod proxy;
pub mod sessions;
pub mod tickets;

use std::path::{Component, Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};

pub use sessions::{Session, SessionLimit, Sessions};
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

/// The Content-Security-Policy of a console page: its own inline script and style (by
/// hash) and files from its own origin only, its WebSocket, and framing only by
/// `frame_ancestors`.
pub fn page_policy(page: &str, websocket_origin: &str, frame_ancestors: &[String]) -> String {
    let hash = |open: &str, close: &str| {
        let body = page
            .split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map(|(body, _)| body)
            .unwrap_or("");
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
        )
    };
    format!(
        "default-src 'none'; script-src 'self' {}; style-src 'self' {}; img-src 'self' data: \
         blob:; font-src 'self'; connect-src 'self' {websocket_origin}; frame-ancestors {}; \
         base-uri 'none'; form-action 'none'",
        hash("<script type=\"module\">", "</script>"),
        hash("<style>", "</style>"),
        frame_ancestors.join(" "),
    )
}

/// `ws://host:port` of a WebSocket URL (what `connect-src` names).
pub fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find('/') {
        Some(end) => &url[..start + end],
        None => url,
    }
}

/// The file under `root` that `rel` names, refusing anything that could leave `root`.
pub fn asset_path(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

/// Reads the file `rel` under `root`, never through a symlink and never outside `root`
/// (the kernel checks every component: `openat2` with `RESOLVE_NO_SYMLINKS` and
/// `RESOLVE_BENEATH`). `None` for anything else, missing files included.
pub fn read_asset(root: &Path, rel: &str) -> Option<Vec<u8>> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::Mode;
    use std::io::Read;
    asset_path(root, rel)?;
    let dir = std::fs::File::open(root).ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    let fd = openat2(&dir, rel, how).ok()?;
    let mut file = std::fs::File::from(fd);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut out = Vec::new();
    file.read_to_end(&mut out).ok()?;
    Some(out)
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
    fn assets_behind_symlinks_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("core")).unwrap();
        std::fs::write(dir.path().join("core/rfb.js"), "export default 1;").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("core/link.js")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("core"), dir.path().join("alias")).unwrap();

        assert_eq!(
            read_asset(dir.path(), "core/rfb.js").as_deref(),
            Some(&b"export default 1;"[..])
        );
        assert_eq!(read_asset(dir.path(), "core/link.js"), None);
        assert_eq!(read_asset(dir.path(), "alias/rfb.js"), None);
        assert_eq!(read_asset(dir.path(), "core"), None, "not a file");
        assert_eq!(read_asset(dir.path(), "../outside-secret"), None);
    }

    #[test]
    fn the_page_policy_allows_its_own_script_and_socket_only() {
        let p = page(&"a".repeat(64), "ws://10.0.0.1:8474/v1/console/ws?ticket=x");

        let csp = page_policy(&p, "ws://10.0.0.1:8474", &["'self'".into()]);

        assert!(csp.contains("frame-ancestors 'self'"), "{csp}");
        assert!(
            csp.contains("connect-src 'self' ws://10.0.0.1:8474;"),
            "{csp}"
        );
        assert!(csp.contains("script-src 'self' 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(
            origin("wss://panel.example:443/v1/console/ws?t=1"),
            "wss://panel.example:443"
        );
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
