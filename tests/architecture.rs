//! The shape of the code, checked: no import circle between the crate's top-level modules,
//! and no operation in `src/vm/` importing another operation (they share `vm/domain.rs`).
//! Read from the source text (outside `#[cfg(test)]` blocks), like an import-graph tool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text without its test module (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Every `crate::<name>` the text names, including inside `use crate::{a, b::c}`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for part in group.split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let top = |p: &Path| -> String {
        let first = p.strip_prefix(&src).unwrap().components().next().unwrap();
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned()
    };
    let modules: BTreeSet<String> = files.iter().map(|f| top(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = top(f);
        if m == "lib" || m == "main" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let deps = graph.entry(m.clone()).or_default();
        for d in crate_paths(without_tests(&text)) {
            if d != m && modules.contains(&d) {
                deps.insert(d);
            }
        }
    }
    graph
}

/// A path from `to` back to `from` through `graph`, if there is one.
fn path_back(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
) -> Option<Vec<String>> {
    let mut stack = vec![vec![to.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap().clone();
        if last == from {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in graph.get(&last).into_iter().flatten() {
            let mut p = path.clone();
            p.push(next.clone());
            stack.push(p);
        }
    }
    None
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let graph = module_graph();
    assert!(
        graph["api"].contains("vm"),
        "the check reads imports at all: {graph:?}"
    );
    for (m, deps) in &graph {
        for d in deps {
            if let Some(back) = path_back(&graph, m, d) {
                panic!("{m} imports {d}, and {} leads back", back.join(" -> "));
            }
        }
    }
}

#[test]
fn operations_never_import_operations() {
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vm");
    let operations = [
        "create",
        "delete",
        "lifecycle",
        "reinstall",
        "resize",
        "snapshots",
        "ips",
        "private_nics",
    ];
    for op in operations {
        let text = std::fs::read_to_string(vm.join(format!("{op}.rs"))).unwrap();
        for other in operations.iter().filter(|o| **o != op) {
            for form in [format!("use super::{other}::"), format!("super::{other}::")] {
                assert!(
                    !without_tests(&text).contains(&form),
                    "vm/{op}.rs reaches into vm/{other}.rs ({form}); share it through vm/domain.rs"
                );
            }
        }
    }
}
